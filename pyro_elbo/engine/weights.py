"""Importance weights grouped per element of a data plate, shared by IWELBO, CUBO and InclusiveKL.

With K particles ``z_k ~ q(z)`` the log weights are ``log w_k = log p(x, z_k) - log q(z_k)`` (MATH.md
§4) and the normalized weights ``w~_k = w_k / sum_j w_j``.  **Per element or whole trace**: when
every site of model and guide lives in a (vectorized) plate, the log weights factorize over its
elements ``i`` and a bound is taken per element, ``scale * sum_i f(log w_{:, i})`` (Burda et al.
2016), which a minibatch estimates without bias; otherwise over the whole trace (E = 1).  A global
latent beside a subsampled plate has no unbiased importance-weighted estimate and raises, as do
sites with different scales (an importance weight mixes all sites of a particle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyro_elbo.engine.bounds import log_mean_exp
from pyro_elbo.engine.particles import Particles

__all__ = ["ImportanceWeights", "group_terms", "importance_weights"]


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

    @property
    def normalized(self) -> torch.Tensor:
        """``w~ = softmax(log w)`` over the particles, held constant: ``(K, E)``."""
        return torch.softmax(self.log_w.detach(), 0)

    def bound(self) -> torch.Tensor:
        """The importance-weighted bound ``scale * sum_e log (1/K) sum_k w_{k,e}``."""
        return self.scale * log_mean_exp(self.log_w, 0).sum()

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
