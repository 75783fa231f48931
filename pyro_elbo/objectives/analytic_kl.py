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

The KL of a site is conditional on the other sampled values, so it is unbiased when the guide
draws every latent the model draws before the site before it too (mean-field guides in the model's
order, and guides whose conditionals follow the model's order).  A site the guide draws *before*
a latent that precedes it in the model, and on which the guide's distribution of that latent
depends (:func:`guide_depends_on`: one replay with the site's value moved), keeps its Monte
Carlo terms, with a one-line warning; a mean-field guide in another order keeps the closed form.

**Masks and scales** are applied as ``Trace.compute_log_prob`` applies them, on each side: the
site's term in the ELBO is ``E_q[m_p log p - m_q log q] = -m_p KL(q || p) + (m_q - m_p) H(q)``
(``m`` the product of the site's mask and any ``.mask()`` of its distribution, ``H`` the
entropy), times the site's scale.  With equal masks this is ``-m KL``; where they differ (a model
that masks a latent, as an ``obs_mask`` model does, with a guide that does not) the entropy term
is added, and a guide distribution without a closed-form entropy keeps Monte Carlo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.distributions import Delta, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to, kl_divergence
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.traces import quietly

__all__ = ["SiteKL", "analytic_kl_terms", "guide_depends_on"]


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
    """``(distribution without its MaskedDistribution wrappers, their mask or None)``."""
    mask = None
    while isinstance(fn, MaskedDistribution):
        mask = _and(mask, fn._mask)
        fn = fn.base_dist
    return fn, mask


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _mask_of(node):
    fn, mask = _unwrap(node["fn"])
    site_mask = node["mask"]
    return fn, _and(None if site_mask is None else torch.as_tensor(site_mask), mask)


def _as_float(mask, like):
    return torch.ones((), dtype=like.dtype) if mask is None else torch.as_tensor(mask).to(like.dtype)


def _site_kl(name, model_trace, guide_trace):
    """``(guide site names, kl tensor)`` for one site, or ``None`` if not closed form."""
    guide_node = guide_trace.nodes.get(name)
    model_node = model_trace.nodes[name]
    if guide_node is None:
        return None
    q, q_mask = _mask_of(guide_node)
    p, p_mask = _mask_of(model_node)
    replaced = (name,)
    if isinstance(q, Delta):
        aux = guide_trace.nodes.get(f"{name}_unconstrained")
        if aux is None or not aux["infer"].get("is_auxiliary"):
            return None
        if not _is_identity(biject_to(p.support)):
            return None  # constrained site: the Jacobian must stay, use Monte Carlo
        (q, q_mask), replaced = _mask_of(aux), (name, aux["name"])
    if not q.has_rsample:
        return None
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        return None
    if not _same_mask(q_mask, p_mask):
        try:
            entropy = q.entropy()
        except NotImplementedError:
            return None
        m_p, m_q = _as_float(p_mask, kl), _as_float(q_mask, kl)
        kl = m_p * kl + (m_p - m_q) * entropy  # -(ELBO term): m_p KL - (m_q - m_p) H
        return replaced, scale_and_mask(kl, guide_node["scale"], None)
    return replaced, scale_and_mask(kl, guide_node["scale"], q_mask)


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return (a is None or bool(torch.as_tensor(a).all())) and (
            b is None or bool(torch.as_tensor(b).all())
        )
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    try:
        return bool((a == b).all())
    except RuntimeError:  # shapes that do not broadcast
        return False


def _drawn_later(name, model_trace, guide_trace) -> list[str]:
    """The latents the model draws before ``name`` that the guide draws after it."""
    guide_order = {n: i for i, n in enumerate(guide_trace.nodes)}
    position = guide_order[name]
    later = []
    for other, node in model_trace.nodes.items():
        if other == name:
            break
        if node["type"] != "sample" or node["is_observed"]:
            continue
        if guide_order.get(other, -1) > position:
            later.append(other)
    return later


def guide_depends_on(guide, args, kwargs, name, others) -> bool:
    """Whether the guide's distribution at any site of ``others`` changes when the value drawn
    at ``name`` does: one guide run and one replay with that value moved (in unconstrained
    space), hidden from SVI, on a forked generator.  True when it cannot tell."""
    import pyro.poutine as poutine

    try:
        with quietly():
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            node = trace.nodes[name]
            transform = biject_to(node["fn"].support)
            moved = trace.copy()
            moved.nodes[name] = {**node, "value": transform(transform.inv(node["value"]) + 0.5)}
            replayed = poutine.trace(poutine.replay(guide, trace=moved)).get_trace(*args, **kwargs)
            for other in others:
                value = trace.nodes[other]["value"]
                before = trace.nodes[other]["fn"].log_prob(value)
                after = replayed.nodes[other]["fn"].log_prob(value)
                if before.shape != after.shape or not torch.allclose(before, after, equal_nan=True):
                    return True
    except Exception:  # noqa: BLE001 - cannot tell: assume it does
        return True
    return False


def analytic_kl_terms(
    particles: Particles, fallbacks: dict | None = None, depends=None
) -> list[SiteKL]:
    """Closed-form KL terms for every latent site where one is valid (others are omitted).

    A site the guide draws before latents that the model draws first keeps Monte Carlo when the
    guide's distribution at those latents depends on it: ``depends(site, others) -> bool``
    (e.g. :func:`guide_depends_on`; without it, always assumed).  ``fallbacks``, when given,
    receives ``{site: reason}`` for them.
    """
    terms = []
    for name in particles.latent_sites:
        per_trace = [
            _site_kl(name, mt, gt) for mt, gt in zip(particles.model_traces, particles.guide_traces)
        ]
        if any(r is None for r in per_trace):
            continue
        later = _drawn_later(name, particles.model_traces[0], particles.guide_traces[0])
        if later and (depends is None or depends(name, later)):
            if fallbacks is not None:
                fallbacks[name] = (
                    f"the guide draws {name!r} before {later[0]!r} (which the model draws first) "
                    f"and draws {later[0]!r} given it, so the KL of {name!r} given the other "
                    "draws would be biased (a non-mean-field guide in another order than the "
                    "model's)"
                )
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
