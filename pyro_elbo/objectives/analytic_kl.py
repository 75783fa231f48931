"""Closed-form KL(q(z) || p(z)) per latent site, where it is valid.

ELBO form (2) of MATH.md, ``E_q[log p(x | z)] - KL(q(z) || p(z))``, with the KL of a site taken
from ``torch.distributions.kl_divergence`` when:

* the guide samples the site directly from a reparameterized distribution whose pair with the
  prior is registered in torch, or
* the guide is AutoNormal-style (a ``Delta`` site fed by an auxiliary ``<name>_unconstrained``
  site) **and** the site's support is the real line, so the Delta is the identity and the KL of
  the auxiliary distribution to the prior is the KL of the site.

Everywhere else (constrained sites such as a Gamma or Beta latent under AutoNormal, joint guides
such as AutoMultivariateNormal, unregistered pairs) the site keeps its Monte Carlo terms, whose
Delta ``log_density`` carries the Jacobian.  Pyro's ``TraceMeanField_ELBO`` instead uses
``kl_divergence(Delta, p) = -p.log_prob(v)``, which drops the Jacobian and is biased on
constrained sites (see ``tests/test_elbo.py::test_pyro_trace_mean_field_is_biased``).

The KL of a site is conditional on the other sampled values, so this is exact for mean-field
guides and for guides whose conditionals follow the model's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to, kl_divergence
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from pyro_elbo.engine.particles import Particles

__all__ = ["SiteKL", "analytic_kl_terms"]


@dataclass
class SiteKL:
    """The closed-form KL of one latent site and the guide sites whose terms it replaces."""

    name: str
    replaces_guide_sites: tuple[str, ...]
    kl: torch.Tensor  # (K, *plate dims), scaled and masked


def _is_identity(transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _unwrap(fn):
    while hasattr(fn, "base_dist") and type(fn).__name__ in ("MaskedDistribution",):
        fn = fn.base_dist
    return fn


def _site_kl(name, model_trace, guide_trace):
    """``(guide site names, kl tensor)`` for one site, or ``None`` if not closed form."""
    guide_node = guide_trace.nodes.get(name)
    model_node = model_trace.nodes[name]
    if guide_node is None:
        return None
    q, replaced = guide_node["fn"], (name,)
    if isinstance(_unwrap(q), Delta):
        aux = guide_trace.nodes.get(f"{name}_unconstrained")
        if aux is None or not aux["infer"].get("is_auxiliary"):
            return None
        if not _is_identity(biject_to(model_node["fn"].support)):
            return None  # constrained site: the Jacobian must stay, use Monte Carlo
        q, replaced = aux["fn"], (name, aux["name"])
    if not q.has_rsample:
        return None
    try:
        kl = kl_divergence(q, model_node["fn"])
    except NotImplementedError:
        return None
    return replaced, scale_and_mask(kl, guide_node["scale"], guide_node["mask"])


def analytic_kl_terms(particles: Particles) -> list[SiteKL]:
    """Closed-form KL terms for every latent site where one is valid (others are omitted)."""
    terms = []
    for name in particles.latent_sites:
        per_trace = [
            _site_kl(name, mt, gt) for mt, gt in zip(particles.model_traces, particles.guide_traces)
        ]
        if any(r is None for r in per_trace):
            continue
        replaced = per_trace[0][0]
        if any(not particles.guide_sites[r].reparameterized for r in replaced):
            continue
        expected = particles.model_sites[name].log_prob.shape
        kls = [kl for _, kl in per_trace]
        try:
            kl = particles.align(name, kls)
            kl = kl.expand(torch.broadcast_shapes(kl.shape, expected))
        except (RuntimeError, ValueError):
            continue  # the KL's batch shape does not line up with the site: keep Monte Carlo
        if kl.shape != expected:
            continue
        terms.append(SiteKL(name, replaced, kl))
    return terms
