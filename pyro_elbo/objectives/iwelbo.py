"""``pyro_elbo.IWELBO``: the importance-weighted bound, with IWAE, DReG and STL gradients.

With K particles ``z_k ~ q(z)`` and log weights ``log w_k = log p(x, z_k) - log q(z_k)``
(Burda, Grosse & Salakhutdinov 2016; MATH.md §4)::

    IW-ELBO_K = E[ log (1/K) sum_k w_k ],    ELBO = IW-ELBO_1 <= IW-ELBO_K <= log p(x).

``loss`` is minus this bound.  With K = 1 it is the ELBO, term for term (every site keeps its
own scale, so subsampled plates with global latents and per-site ``poutine.scale`` work as in
Trace_ELBO), and so is its gradient.

**Per element of a data plate.**  When every site of model and guide lives in a plate (all latents
are local to it, as in a VAE), the log weights factorize over its elements ``i`` and the bound is
taken per element, ``sum_i log (1/K) sum_k w_{k,i}`` (Burda et al.), which is tighter than the
bound over the whole trace and is what a minibatch can estimate without bias.  Otherwise the bound
is taken over the whole trace.  With a subsampling scale ``s = N / B`` the minibatch estimate is
``s * sum_{i in batch} log (1/K) sum_k w_{k,i}``: the scale is applied **after** the per-element
log-mean-exp, so its expectation over minibatches is the full-data bound.  (Pyro's ``RenyiELBO``
puts the scale inside the log-sum-exp, which is biased.)  A global latent with a subsampled plate
has no unbiased importance-weighted estimate (the log-mean-exp over particles does not commute with
the sum over data points): that raises an error.

**Gradients** (``w~_k = w_k / sum_j w_j``, the normalized weights, held constant):

* ``"reparam"`` (IWAE): ``sum_k w~_k grad log w_k``, the pathwise gradient of the estimate.  Guide
  sites without ``rsample`` add the VIMCO score-function term ``sum_k (L - L_{-k}) grad log q(z_k)``
  with the leave-one-out baseline ``L_{-k}`` of Mnih & Rezende 2016 (no baseline when K = 1).
* ``"dreg"`` (doubly reparameterized, Tucker, Lawson, Gu & Maddison 2019): guide parameters get
  ``sum_k w~_k^2 d(log p(x, z_k) - log q_{stop(phi)}(z_k))/dz_k * dz_k/dphi``, unbiased for the
  IWAE gradient, with zero variance at q = p(z | x) and a signal-to-noise ratio that does not
  decay as K grows (Rainforth et al. 2018 show that the IWAE guide gradient's does).  Model
  parameters get the IWAE gradient ``sum_k w~_k grad_theta log p(x, z_k)``.
* ``"stl"`` (Roeder, Wu & Duvenaud 2017): ``sum_k w~_k d(log p - log q_{stop(phi)})/dz dz/dphi``.
  Zero variance at q = p(z | x), but **biased for K > 1** (Tucker et al. 2019, §3); prefer
  ``"dreg"``.  Model parameters get the IWAE gradient.

``log q_{stop(phi)}`` is log q evaluated with the guide's parameters held constant and the
samples still differentiable (the engine's ``log_prob_detached``).

A single differentiable scalar cannot carry DReG's two weightings (``w~^2`` for the guide, ``w~``
for the model) through one graph when the model has parameters, so the surrogate is
``sum_k w~_k^2 (log p_k - log q_stop_k)`` plus, for the model's parameters ``theta``, the linear
correction ``sum_theta <theta, g_theta>`` with ``g_theta = grad_theta sum_k (w~_k - w~_k^2)
log p_k`` computed by ``torch.autograd.grad`` and held constant.  ``differentiable_loss`` and
``loss_and_grads`` use the same surrogate, so their gradients agree.  A parameter used by both
model and guide is treated as a guide parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyro_elbo.engine.bounds import log_mean_exp
from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.validation import require_reparameterized
from pyro_elbo.estimators import choose_estimator
from pyro_elbo.estimators.importance import model_correction, vimco_signal
from pyro_elbo.objectives.base import ParticleObjective

__all__ = [
    "IWELBO",
    "ImportanceWeights",
    "group_terms",
    "importance_weights",
    "model_correction",
    "require_reparameterized",
    "vimco_signal",
]


# ------------------------------------------------------------------------ shared log weights


@dataclass
class ImportanceWeights:
    """Log weights grouped per element of the plates shared by every site.

    ``log_p`` and ``log_q`` have shape ``(K, E)``: K particles by E elements (E = 1 for the
    whole-trace bound).  They are unscaled; a bound is ``scale * sum_e f(log w[:, e])``.
    """

    particles: Particles
    log_p: torch.Tensor
    log_q: torch.Tensor
    scale: float | torch.Tensor
    frames: tuple  # the plates the bound is taken per element of, outermost first

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q

    def group(self, sites, attribute: str = "log_prob_unscaled", rescale: bool = False):
        """Sum a per-site term over the given sites, per particle and element: ``(K, E)``.

        ``rescale=True`` divides a scaled term (such as ``log_prob_detached``) by the common
        scale, turning it into an unscaled one.
        """
        total = _group(self.particles, sites, attribute, self.frames)
        if rescale and not _is_one(self.scale):
            total = total / self.scale
        return total


def importance_weights(particles: Particles, objective: str) -> ImportanceWeights:
    """Group the engine's unscaled log densities into per-element log weights (see module doc).

    Raises ``ValueError`` when no unbiased importance-weighted estimate exists (a subsampled plate
    that some site lives outside of) or when sites carry different scales.
    """
    # the sites that carry density decide the plates the bound is per element of: a
    # pyro.deterministic site outside the data plate adds nothing to any weight
    sites = {
        n: s
        for n, s in {**particles.model_sites, **particles.guide_sites}.items()
        if s.carries_density
    }
    shared = None
    for site in sites.values():
        vectorized = {f for f in site.frames if f.vectorized}
        shared = vectorized if shared is None else shared & vectorized
    shared = shared or set()
    for name, site in sites.items():
        for frame in site.frames:
            if _is_subsampled(frame) and frame not in shared:
                outside = [
                    n for n, s in particles.latent_sites.items() if frame not in s.frames
                ] or [n for n, s in sites.items() if frame not in s.frames]
                where = f"site(s) {outside} live outside it (global latents)"
                kind = "" if frame.vectorized else "sequential "
                raise ValueError(
                    f"{objective}: site {name!r} is in the subsampled {kind}plate "
                    f"{frame.name!r} ({frame.size} of {frame.full_size}) but {where}. An "
                    "importance-weighted bound has no unbiased minibatch estimate unless every "
                    "latent is local to the subsampled (vectorized) plate: the log-mean-exp over "
                    "particles does not commute with the sum over data points. Use the full data "
                    "(no subsample_size), or ELBO, whose minibatch estimate is unbiased."
                )
    scale = _common_scale(sites, objective)
    frames = tuple(sorted(shared, key=lambda f: f.dim))
    return ImportanceWeights(
        particles=particles,
        log_p=_group(particles, _dense(particles.model_sites), "log_prob_unscaled", frames),
        log_q=_group(particles, _dense(particles.guide_sites), "log_prob_unscaled", frames),
        scale=scale,
        frames=frames,
    )


def _dense(sites) -> list:
    return [s for s in sites.values() if s.carries_density]


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and int(frame.size) != int(frame.full_size)


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1.0


def _common_scale(sites, objective):
    """The one scale every site shares (a float, or a one-element tensor)."""
    first, common = None, 1.0
    for name, site in sites.items():
        if isinstance(site.scale, torch.Tensor) and site.scale.numel() != 1:
            raise NotImplementedError(
                f"{objective}: site {name!r} has a scale tensor of shape "
                f"{tuple(site.scale.shape)}; importance weights need one scale per site. Use a "
                "scalar poutine.scale, or mask elements with poutine.mask instead."
            )
        if first is None:
            first, common = name, site.scale
        elif not math.isclose(float(site.scale), float(common), rel_tol=1e-12):
            raise ValueError(
                f"{objective}: sites {first!r} and {name!r} carry different scales "
                f"({float(common):g} and {float(site.scale):g}). An importance weight mixes all "
                "sites of a particle, so they must share one scale (the subsampling factor of the "
                "plate the bound is taken over). Apply poutine.scale to the whole model and "
                "guide, or use ELBO."
            )
    if not float(common) > 0:
        raise ValueError(f"{objective}: the sites' scale must be positive, got {float(common):g}")
    return common


def _group(particles, sites, attribute, frames):
    """Sum ``attribute`` over ``sites`` and over every plate dim not in ``frames``: ``(K, E)``."""
    terms = []
    for site in sites:
        term = getattr(site, attribute)
        if term is None:
            raise RuntimeError(
                f"site {site.name!r} has no {attribute}; run the engine with detach_params=True"
            )
        terms.append(term)
    return group_terms(particles, terms, frames)


def group_terms(particles, terms, frames):
    """Sum engine-layout terms ``(K, *plate dims)`` over every plate dim not in ``frames`` and
    over the terms: ``(K, E)``, E the number of elements of the plates in ``frames``."""
    K, P = particles.num_particles, particles.plate_nesting
    keep = {f.dim for f in frames}
    shape = [1] * P
    summed = []
    for term in terms:
        dims = [d for d in range(-P, 0) if d not in keep and term.shape[d] != 1]
        if dims:
            term = term.sum(dims, keepdim=True)
        for d in keep:
            shape[d] = max(shape[d], term.shape[d])
        summed.append(term)
    total = torch.zeros((K, *shape), dtype=_dtype(summed), device=_device(summed))
    for term in summed:
        total = total + term
    return total.reshape(K, -1)


def _dtype(terms):
    return terms[0].dtype if terms else torch.get_default_dtype()


def _device(terms):
    return terms[0].device if terms else None


# ------------------------------------------------------------------------ the objective


class IWELBO(ParticleObjective):
    """Importance-weighted bound; ``loss`` is minus the bound.  Drops into ``SVI``.

    :param int num_particles: particles K per step (K = 1 is the ELBO).
    :param str estimator: ``"reparam"`` (IWAE, default), ``"dreg"`` or ``"stl"`` (see the module
        docstring; ``"dreg"`` and ``"stl"`` need every guide site reparameterized).
    :param bool vectorize_particles: vectorize the particles in an outer plate (default True).
    :param max_plate_nesting: the model's plate nesting (guessed when not given).
    """

    def __init__(
        self,
        num_particles: int = 8,
        *,
        estimator: str = "reparam",
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
    ):
        self._estimator = choose_estimator("IWELBO", estimator)
        super().__init__(
            num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
        )
        self.estimator = estimator

    def _engine_options(self, need_surrogate):
        return {"detach_params": need_surrogate and self._estimator.detach_params}

    def _name(self):
        return f"IWELBO(estimator={self.estimator!r})"

    def _loss_and_surrogate(self, particles: Particles, need_surrogate: bool):
        if particles.num_particles == 1:
            return self._one_particle(particles, need_surrogate)
        weights = importance_weights(particles, self._name())
        log_w = weights.log_w
        loss = -weights.scale * log_mean_exp(log_w, 0).sum()
        if not need_surrogate:
            return loss, None
        return loss, -weights.scale * self._estimator.surrogate(weights, self._name())

    def _one_particle(self, particles: Particles, need_surrogate: bool):
        """K = 1: the bound is the ELBO, ``log w`` is linear in the sites' terms, so every
        site keeps its own scale and mask (subsampling, ``poutine.scale``) as in Trace_ELBO;
        IWAE's gradient is the pathwise one (score terms Rao-Blackwellized over plates), DReG's
        and STL's are STL's."""
        loss = -(particles.log_p() - particles.log_q()).sum()
        if not need_surrogate:
            return loss, None
        return loss, -self._estimator.one_particle(particles, self._name()).sum()

    def __repr__(self):
        return f"IWELBO(num_particles={self.num_particles}, estimator={self.estimator!r})"
