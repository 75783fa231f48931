"""The particle engine: the one place that runs a guide and a model for K particles.

Every objective in :mod:`pyro_elbo.objectives` is built on :func:`run_particles`.  It draws K
particles ``z_k ~ q(z)`` from the guide, replays the model on them and returns, for every sample
site, its terms aligned on a common layout::

    term.shape == (K, d_{-P}, ..., d_{-1})

where ``P`` is the model's plate nesting (``max_plate_nesting`` without the particle plate), the
first dim indexes particles and ``d_{-i}`` is the size of the plate at ``dim=-i`` (1 where the site
is not in that plate).  The same layout comes out whether the particles were vectorized in an
outer ``pyro.plate`` (the default) or drawn one after another and stacked.

Per site the engine records (see :class:`SiteTerms`):

* ``log_prob``: log density scaled by the site's ``scale`` (subsampling, ``poutine.scale``, beta)
  and masked, as in Pyro's ``Trace.compute_log_prob``;
* ``log_prob_unscaled``: the same, masked but not scaled, for nonlinear objectives (importance
  weights) that must apply the subsampling scale *after* a log-sum-exp;
* for guide sites, the score-function part (``None`` for reparameterized sites);
* for guide sites, when asked, ``log_prob_detached``: log q evaluated on the same samples with the
  guide's parameters held constant (for STL and DReG);
* the plate frames the site lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from pyro.distributions import MaskedDistribution
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.detach import (
    GAUSSIAN_AUTOGUIDES,
    detach_auxiliary_sites,
    graph_leaves,
    log_q_with_constant_params,
    path_derivative_unavailable,
)
from pyro_elbo.engine.handlers import BetaScale, DetachSamples
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
    "trace_pair",
]

#: Name of the outer plate that vectorizes particles.
PARTICLE_PLATE = "_pyro_elbo_particles"


class SiteTerms:
    """The per-particle terms of one sample site, each shaped ``(K, *plate dims)``.

    The terms are brought to the engine layout lazily, on first access, so the common path
    (totals per particle) adds no reshaping to the autograd graph.

    * ``log_prob``: scaled and masked log density;
    * ``log_prob_unscaled``: masked, not scaled;
    * ``log_prob_detached``: (guide sites, when recorded) log q with the guide's parameters held
      constant, scaled and masked;
    * ``score_function``: (guide sites without ``rsample``) the score-function part, else ``None``;
    * ``carries_density``: False for a site whose log-density is 0 by construction (a
      ``pyro.deterministic`` site, a site masked with ``False``).
    """

    def __init__(self, name, nodes, aligner, *, is_guide, detached_log_probs=None):
        first = nodes[0]
        self.name = name
        self.frames = frozenset(f for f in first["cond_indep_stack"] if f.name != PARTICLE_PLATE)
        self.scale = first["scale"]
        self.is_observed = bool(first["is_observed"])
        self.is_auxiliary = bool(first["infer"].get("is_auxiliary", False))
        self.carries_density = not _zero_density(first)
        self._nodes, self._align, self._is_guide = nodes, aligner, is_guide
        self._detached_log_probs = detached_log_probs
        self._cache = {}
        if is_guide:
            self._raw_log_prob = [n["score_parts"].log_prob for n in nodes]
            self.reparameterized = all(
                is_identically_zero(n["score_parts"].score_function) for n in nodes
            )
        else:
            self._raw_log_prob = [n["log_prob"] for n in nodes]
            self.reparameterized = True

    def _aligned(self, key, make_raw):
        if key not in self._cache:
            self._cache[key] = self._align(self.name, make_raw())
        return self._cache[key]

    @property
    def log_prob(self) -> torch.Tensor:
        return self._aligned("log_prob", lambda: self._raw_log_prob)

    @property
    def log_prob_unscaled(self) -> torch.Tensor:
        if isinstance(self.scale, (int, float)) and self.scale == 1.0:
            return self.log_prob  # already masked, and nothing to unscale
        return self._aligned(
            "unscaled", lambda: [_masked_unscaled(n, self._is_guide) for n in self._nodes]
        )

    @property
    def log_prob_detached(self) -> torch.Tensor | None:
        if self._detached_log_probs is None:
            return None
        return self._aligned("detached", lambda: self._detached_log_probs)

    @property
    def score_function(self) -> torch.Tensor | None:
        if self.reparameterized:
            return None
        return self._aligned(
            "score", lambda: [n["score_parts"].score_function for n in self._nodes]
        )

    @property
    def pathwise_part(self) -> torch.Tensor | None:
        """(guide sites with a score-function part) the part of log q that carries a pathwise
        gradient, Pyro's ``score_parts.entropy_term``: nonzero for a reparameterized rejection
        sampler (``ShapeAugmentedGamma``, RSVI of Naesseth et al. 2017), else ``None``."""
        if self.reparameterized or not self._is_guide or all(
            is_identically_zero(n["score_parts"].entropy_term) for n in self._nodes
        ):
            return None
        return self._aligned(
            "pathwise", lambda: [n["score_parts"].entropy_term for n in self._nodes]
        )

    def total(self, attribute: str) -> torch.Tensor:
        """Per-particle sum of a term, shape ``(K,)``, with as few graph nodes as possible."""
        if attribute == "log_prob" and "log_prob" not in self._cache and len(self._nodes) == 1:
            if not self._align.vectorized:  # one sequential particle: a plain sum
                return self._raw_log_prob[0].sum().unsqueeze(0)
        term = getattr(self, attribute)
        if term is None:
            raise RuntimeError(
                f"site {self.name!r} has no {attribute}; run the engine with detach_params=True"
            )
        return term.reshape(term.shape[0], -1).sum(-1)

    def __repr__(self):
        return f"SiteTerms({self.name!r}, frames={sorted(f.name for f in self.frames)})"


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
    aligner: _Aligner | None = field(default=None, repr=False)

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
    align = _Aligner(num_particles, plate_nesting, vectorize)
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
        if type(user_guide) in GAUSSIAN_AUTOGUIDES:
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


class _Aligner:
    """Bring site tensors to the engine's ``(K, d_{-P}, ..., d_{-1})`` layout."""

    def __init__(self, num_particles, plate_nesting, vectorized):
        self.K = num_particles
        self.P = plate_nesting
        self.vectorized = vectorized

    def __call__(self, name, tensors):
        if self.vectorized:
            (t,) = tensors
            t = self._pad(name, t, self.P + 1)
            return t.expand((self.K,) + t.shape[1:])
        if len(tensors) == 1:  # a view, not a copy: keeps the K=1 hot path as cheap as Trace_ELBO
            return self._pad(name, tensors[0], self.P).unsqueeze(0)
        return torch.stack([self._pad(name, t, self.P) for t in tensors])

    def _pad(self, name, t, ndim):
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if t.dim() > ndim and all(size == 1 for size in t.shape[: t.dim() - ndim]):
            t = t.reshape(t.shape[t.dim() - ndim :])  # a size-1 batch dim without a plate
        if t.dim() > ndim:
            raise ValueError(
                f"site {name!r}: invalid log_prob shape {tuple(t.shape)}, with more batch dims "
                f"than the {self.P} plate dim(s) of the model. Declare every batch dim with a "
                "pyro.plate (or .to_event() for event dims), or pass max_plate_nesting."
            )
        if t.dim() < ndim:
            t = t.reshape((1,) * (ndim - t.dim()) + t.shape)
        return t


def _zero_density(node) -> bool:
    """Whether a site's log-density is 0 by construction: a ``pyro.deterministic`` site, or one
    masked with ``False`` (``poutine.mask(mask=False)``, ``fn.mask(False)``)."""
    if node["infer"].get("_deterministic") or node["mask"] is False:
        return True
    fn = node["fn"]
    while isinstance(fn, MaskedDistribution):
        if fn._mask is False:
            return True
        fn = fn.base_dist
    return False


def _masked_unscaled(node, is_guide):
    log_prob = node["fn"].log_prob(node["value"]) if is_guide else node["unscaled_log_prob"]
    return scale_and_mask(log_prob, 1.0, node["mask"])


def sum_to_frames(term: torch.Tensor, term_frames: frozenset, target_frames: frozenset):
    """Sum ``term`` over the plate dims of ``term_frames`` that are not in ``target_frames``.

    This is Pyro's partial Rao-Blackwellization (``MultiFrameTensor.sum_to``) on the engine layout:
    the result broadcasts against any site living in ``target_frames``.
    """
    dims = [f.dim for f in term_frames if f.vectorized and f not in target_frames]
    return term.sum(dims, keepdim=True) if dims else term

