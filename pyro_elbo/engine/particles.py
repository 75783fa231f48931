"""The particle engine: the one place that runs a guide and a model for K particles.

Every objective in :mod:`pyro_elbo.objectives` is built on :func:`run_particles`.  It draws K
particles ``z_k ~ q(z)`` from the guide, replays the model on them and returns, for every sample
site, its terms aligned on a common layout::

    term.shape == (K, d_{-P}, ..., d_{-1})

where ``P`` is the model's plate nesting (``max_plate_nesting`` without the particle plate), the
first dim indexes particles and ``d_{-i}`` is the size of the plate at ``dim=-i`` (1 where the site
is not in that plate).  The same layout comes out whether the particles were vectorized in an
outer ``pyro.plate`` (the default) or drawn one after another and stacked.

Per site the engine records the terms of :class:`~pyro_elbo.engine.site_terms.SiteTerms`
(:mod:`pyro_elbo.engine.site_terms`): scaled and unscaled log densities, the score-function
part, log q with the guide's parameters held constant (STL, DReG), and the site's plates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.detach import (
    GAUSSIAN_AUTOGUIDES,  # noqa: F401 - re-exported (fit/initial.py imports it from here)
    detach_auxiliary_sites,
    detaches_auxiliary_exactly,
    graph_leaves,
    log_q_with_constant_params,
    path_derivative_unavailable,
)
from pyro_elbo.engine.handlers import BetaScale, DetachSamples
from pyro_elbo.engine.site_terms import PARTICLE_PLATE, Aligner, SiteTerms, sum_to_frames
from pyro_elbo.engine.traces import side_trace_pair, trace_pair
from pyro_elbo.engine.validation import check_traces

__all__ = [
    "PARTICLE_PLATE",
    "Particles",
    "SiteTerms",
    "guess_plate_nesting",
    "log_q_with_constant_params",
    "path_derivative_unavailable",
    "run_particles",
    "sum_to_frames",
    "trace_pair",
]


@dataclass
class Particles:
    """What one engine run returns: per-site terms for K particles and the raw traces."""

    num_particles: int
    plate_nesting: int
    vectorized: bool
    model_sites: dict[str, SiteTerms]
    guide_sites: dict[str, SiteTerms]
    model_traces: list = field(repr=False)
    guide_traces: list = field(repr=False)
    aligner: Aligner | None = field(default=None, repr=False)

    def align(self, name: str, tensors: list) -> torch.Tensor:
        """Bring one tensor per trace (as computed from the raw traces) to the engine layout."""
        return self.aligner(name, tensors)

    @property
    def latent_sites(self) -> dict[str, SiteTerms]:
        return {n: s for n, s in self.model_sites.items() if not s.is_observed}

    @property
    def observed_sites(self) -> dict[str, SiteTerms]:
        return {n: s for n, s in self.model_sites.items() if s.is_observed}

    def per_particle(self, term: torch.Tensor) -> torch.Tensor:
        """Sum a ``(K, ...)`` term over everything but the particle dim."""
        return term.reshape(self.num_particles, -1).sum(-1)

    def log_p(self, unscaled: bool = False) -> torch.Tensor:
        """log p(x, z_k) per particle, shape ``(K,)``."""
        return self._total(self.model_sites.values(), "log_prob_unscaled" if unscaled else "log_prob")

    def log_q(self, detached_params: bool = False, unscaled: bool = False) -> torch.Tensor:
        """log q(z_k) per particle, shape ``(K,)``; optionally with the guide's params held constant."""
        if detached_params:
            if unscaled:
                raise ValueError("the detached log q is only recorded scaled")
            return self._total(self.guide_sites.values(), "log_prob_detached")
        return self._total(self.guide_sites.values(), "log_prob_unscaled" if unscaled else "log_prob")

    def _total(self, sites, attribute) -> torch.Tensor:
        total = None
        for site in sites:
            term = site.total(attribute)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(self.num_particles)
        return total

    def model_leaves(self) -> list[torch.Tensor]:
        """The trainable tensors log p depends on other than through the guide's draws.

        Found by what log p's autograd graph reaches, not by ``pyro.param`` sites, so it covers
        ``pyro.param``, ``pyro.module``, ``PyroModule`` (also with ``module_local_params``) and a
        plain ``nn.Module`` the model calls.  The guide's graph (its draws and log q) is walked
        first and left out, so a tensor both programs use counts as the guide's.
        """
        seen: set = set()
        guide_roots = []
        for trace in self.guide_traces:
            for node in trace.nodes.values():
                if node["type"] == "sample":
                    guide_roots.append(node["value"])
                    guide_roots.append(node["score_parts"].log_prob)
        graph_leaves(guide_roots, seen)
        model_roots = [
            node["log_prob"]
            for trace in self.model_traces
            for node in trace.nodes.values()
            if node["type"] == "sample"
        ]
        return graph_leaves(model_roots, seen)


def guess_plate_nesting(model, guide, args, kwargs) -> int:
    """The deepest vectorized plate dim used by model or guide (one unvectorized run, blocked,
    with autograd and on the caller's random stream, as Pyro's ``_guess_max_plate_nesting``)."""
    model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs, grad=True, fork=False)
    dims = [
        frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def run_particles(
    model,
    guide,
    args,
    kwargs,
    *,
    num_particles: int,
    plate_nesting: int,
    vectorize: bool = True,
    detach_params: bool = False,
    detach_samples: bool = False,
    beta: float = 1.0,
    validate: bool = False,
) -> Particles:
    """Run ``guide`` and ``model`` for ``num_particles`` particles and collect per-site terms.

    ``plate_nesting`` is the model's plate nesting P; the particle plate goes at ``dim=-(P+1)``.
    With ``detach_params=True`` each guide site also gets ``log_prob_detached``, log q with the
    guide's parameters held constant (:mod:`pyro_elbo.engine.detach`: the guide replayed once
    more on its detached draws, hidden from SVI; no replay for Pyro's Gaussian autoguides).
    With ``detach_samples=True`` the guide's samples are cut from the graph (the score-function
    estimator).  With ``beta != 1`` the scale of every latent site is multiplied by ``beta``.
    ``validate=True`` checks the structure of the pair first (see :mod:`.validation`).
    """
    user = (model, guide)
    detach = DetachSamples() if detach_samples else None
    # One particle needs no particle plate: the sequential path gives the same layout, and
    # skipping the plate saves a messenger on every site (Trace_ELBO's K=1 cost).
    vectorize = vectorize and num_particles > 1
    if beta != 1.0:
        model, guide = BetaScale(beta)(model), BetaScale(beta)(guide)
    plate = None
    if vectorize:
        plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))
    pairs = [
        _trace_pair(
            model, guide, user, args, kwargs, detach_params, plate, validate, detach, plate_nesting
        )
        for _ in range(1 if vectorize else num_particles)
    ]
    model_traces = [p[0] for p in pairs]
    guide_traces = [p[1] for p in pairs]
    detached = [p[2] for p in pairs]
    align = Aligner(num_particles, plate_nesting, vectorize)
    model_sites = {
        name: SiteTerms(name, [t.nodes[name] for t in model_traces], align, is_guide=False)
        for name, site in model_traces[0].nodes.items()
        if site["type"] == "sample"
    }
    guide_sites = {
        name: SiteTerms(
            name,
            [t.nodes[name] for t in guide_traces],
            align,
            is_guide=True,
            detached_log_probs=[d[name] for d in detached] if detach_params else None,
        )
        for name, site in guide_traces[0].nodes.items()
        if site["type"] == "sample"
    }
    if validate:  # shape errors surface now, naming the site, not at first use
        for site in (*model_sites.values(), *guide_sites.values()):
            site.log_prob  # noqa: B018
    return Particles(
        num_particles=num_particles,
        plate_nesting=plate_nesting,
        vectorized=vectorize,
        model_sites=model_sites,
        guide_sites=guide_sites,
        model_traces=model_traces,
        guide_traces=guide_traces,
        aligner=align,
    )


def _trace_pair(
    model, guide, user, args, kwargs, detach_params, plate, validate, detach, plate_nesting
):
    user_model, user_guide = user
    if plate is not None:
        model, guide = plate(model), plate(guide)
    if detach is not None:
        # outside poutine.trace, so the trace records the detached samples
        with detach:
            model_trace, guide_trace = trace_pair(model, guide, args, kwargs, user)
    else:
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs, user)
    if validate:
        nesting = plate_nesting + (1 if plate is not None else 0)
        check_traces(model_trace, guide_trace, max_plate_nesting=nesting)
    full_guide_trace, guide_trace = guide_trace, prune_subsample_sites(guide_trace)
    # the live log q first: the replay below must not leave its values in a transform's cache
    guide_trace.compute_score_parts()
    detached = None
    if detach_params:
        if detaches_auxiliary_exactly(user_guide):
            shortcut = detach_auxiliary_sites(guide_trace)
            shortcut.compute_log_prob()
            detached = {n: node["log_prob"] for n, node in shortcut.nodes.items()}
        else:
            detached = log_q_with_constant_params(
                guide, full_guide_trace, guide_trace, user_guide, args, kwargs
            )
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    return model_trace, guide_trace, detached
