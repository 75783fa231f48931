"""The per-site terms of one engine run, brought to the engine's layout
``(K, d_{-P}, ..., d_{-1})`` (:class:`Aligner`), lazily, on first access.

Per site the engine records (:class:`SiteTerms`):

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

import torch
from pyro.distributions import MaskedDistribution
from pyro.distributions.util import is_identically_zero, scale_and_mask

__all__ = ["PARTICLE_PLATE", "Aligner", "SiteTerms", "sum_to_frames"]

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



class Aligner:
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
