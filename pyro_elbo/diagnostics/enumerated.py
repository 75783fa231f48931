r"""Draws from a guide for a model whose discrete sites are summed out by enumeration.

A model fitted with Pyro's ``TraceEnum_ELBO`` marks its discrete latent sites for enumeration
(``@config_enumerate`` or ``infer={"enumerate": "parallel"}``) and the guide covers only the
continuous latents ``z``; the discrete ones ``k`` are never in q.  For S draws
``z_s ~ q(z)``, in one vectorized pass (particles in an outer plate at ``dim = -(P+1)``, the
enumeration dims to the left of it, as ``TraceEnum_ELBO`` does):

* ``log p(x, z_s) = log sum_k p(x, k, z_s)``: the model's log-densities, with the discrete
  sites summed out by Pyro's tensor variable elimination
  (:func:`pyro.ops.contract.contract_to_tensor`, Obermeyer et al. 2019, "Tensor variable
  elimination for plated factor graphs", ICML), contracted to the particle plate;
* pointwise ``log p(x_i | z_s) = log sum_{k_i} p(k_i | z_s) p(x_i | k_i, z_s)`` for each observed
  site: its log-density and those of the discrete sites it depends on, contracted to the
  site's own plates (a discrete site shared by several observations, outside their plate, has
  no pointwise likelihood: an error says so);
* the discrete values ``k_s ~ p(k | x, z_s)``, drawn from their exact conditional posterior by
  Pyro's :func:`pyro.infer.infer_discrete` (forward-filter backward-sample); the posterior
  predictive is drawn given ``(z_s, k_s)``.

``log q(z_s)`` comes from the guide as usual, so the importance weights
``log p(x, z_s) - log q(z_s)`` of :func:`pyro_elbo.diagnose` and the q-correction of
:func:`pyro_elbo.loo` are those of the model with the discrete sites marginalized.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import infer_discrete
from pyro.ops.contract import contract_to_tensor
from pyro.ops.packed import unpack
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.particles import PARTICLE_PLATE
from pyro_elbo.engine.traces import side_trace_pair

__all__ = [
    "EnumeratedDraws",
    "enumerated_sites",
    "find_enumerated",
    "prototype",
    "run_enumerated",
]


def enumerated_sites(model_trace, guide_trace) -> list[str]:
    """Latent model sites marked for parallel enumeration and absent from the guide."""
    return [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
        and name not in guide_trace.nodes
    ]


def find_enumerated(model, guide, args, kwargs):
    """``(enumerated site names, guide trace)`` of the pair, from one blocked run that draws no
    random numbers from the caller's stream."""
    model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs)
    return enumerated_sites(model_trace, guide_trace), guide_trace


class EnumeratedDraws(SimpleNamespace):
    """What :func:`run_enumerated` returns, shaped like the engine's ``Particles`` where
    :class:`~pyro_elbo.diagnostics.arviz.to_dict` reads it: ``num_particles``,
    ``model_traces`` (one trace with the discrete draws), ``model_sites[obs]
    .log_prob_unscaled`` (pointwise log-likelihood), ``log_p()`` and ``log_q()``."""

    def log_p(self):
        return self.lp

    def log_q(self):
        return self.lq


def _ordinal(trace, site):
    return frozenset(
        trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
    )


def _frames(site):
    return {f.name for f in site["cond_indep_stack"] if f.vectorized}


def _contract(trace, sites, sum_dims, target):
    tree = OrderedDict()
    for site in sites:
        tree.setdefault(_ordinal(trace, site), []).append(site["packed"]["log_prob"])
    return unpack(contract_to_tensor(tree, sum_dims, target_ordinal=target), trace.symbol_to_dim)


def _per_particle(t, num_particles, nesting):
    """Sum a tensor laid out with the particle plate at ``dim=-(P+1)`` to shape ``(S,)``."""
    t = torch.as_tensor(t)
    if t.dim() < nesting + 1:
        t = t.reshape((1,) * (nesting + 1 - t.dim()) + t.shape)
    t = t.reshape((-1,) + t.shape[t.dim() - nesting - 1 :]).sum(0)  # leading dims of size 1
    return t.reshape(t.shape[0], -1).sum(-1).expand(num_particles)


def prototype(model, guide, args, kwargs, nesting):
    """One unvectorized draw ``(model trace with the discrete values drawn, guide trace)``,
    from which :class:`~pyro_elbo.diagnostics.arviz.to_dict` reads shapes and dims."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    sampled = poutine.trace(
        infer_discrete(replayed, first_available_dim=-(nesting + 1), temperature=1)
    ).get_trace(*args, **kwargs)
    return prune_subsample_sites(sampled), prune_subsample_sites(guide_trace)


def run_enumerated(
    model, guide, args, kwargs, num_samples, nesting, log_likelihood=True, draw_discrete=True
):
    """S draws of the pair with the enumerated sites summed out (see the module doc);
    ``draw_discrete=False`` skips drawing the discrete values (for the weights alone).  Call
    under ``torch.no_grad``."""
    plate = pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1))
    guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
    replayed = poutine.replay(plate(model), trace=guide_trace)
    first = -(nesting + 2)
    enum_trace = poutine.trace(poutine.enum(replayed, first_available_dim=first)).get_trace(
        *args, **kwargs
    )
    enum_trace = prune_subsample_sites(enum_trace)
    enum_trace.compute_log_prob()
    enum_trace.pack_tensors()
    guide_trace = prune_subsample_sites(guide_trace)
    guide_trace.compute_log_prob()
    sites = [s for s in enum_trace.nodes.values() if s["type"] == "sample"]
    enumerated = {
        s["name"]: s for s in sites if s["infer"].get("_enumerate_dim") is not None
    }
    sum_dims = set().union(*(enumerated[n]["packed"]["log_prob"]._pyro_dims for n in enumerated))
    sum_dims -= set(enum_trace.plate_to_symbol.values())
    particle = frozenset({enum_trace.plate_to_symbol[PARTICLE_PLATE]})
    lp = _per_particle(_contract(enum_trace, sites, sum_dims, particle), num_samples, nesting)
    lq = torch.zeros(num_samples)
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            lq = lq + _per_particle(site["log_prob"], num_samples, nesting)
    model_sites = {}
    if log_likelihood:
        for site in sites:
            if site["is_observed"] and not site["infer"].get("_deterministic"):
                pointwise = _pointwise(enum_trace, site, enumerated, sum_dims)
                model_sites[site["name"]] = SimpleNamespace(log_prob_unscaled=pointwise)
    traces = []
    if draw_discrete:
        sampled = poutine.trace(
            infer_discrete(replayed, first_available_dim=first, temperature=1)
        ).get_trace(*args, **kwargs)
        traces.append(prune_subsample_sites(sampled))
    return EnumeratedDraws(
        num_particles=num_samples,
        model_traces=traces,
        model_sites=model_sites,
        lp=lp,
        lq=lq,
    )


def _pointwise(trace, site, enumerated, sum_dims):
    """``log sum_k p(k | z) p(x_i | k, z)`` on the observed site's own plates."""
    needed, frontier = {}, set(site["packed"]["log_prob"]._pyro_dims) & sum_dims
    seen = set()
    while frontier:
        symbol = frontier.pop()
        seen.add(symbol)
        for name, other in enumerated.items():
            dims = set(other["packed"]["log_prob"]._pyro_dims)
            if symbol in dims and name not in needed:
                if not _frames(site) <= _frames(other):
                    raise ValueError(
                        f"observed site {site['name']!r} depends on the enumerated site "
                        f"{name!r}, which is outside its plate(s) "
                        f"{sorted(_frames(site) - _frames(other) - {PARTICLE_PLATE})}: one "
                        "discrete value is shared by several observations, so there is no "
                        "pointwise log-likelihood. Pass log_likelihood=False."
                    )
                needed[name] = other
                frontier |= (dims & sum_dims) - seen
    target = _ordinal(trace, site)
    return _contract(trace, [site, *needed.values()], sum_dims, target)
