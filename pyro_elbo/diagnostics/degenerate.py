r"""Degenerate guides: constant log weights from a point mass, not from q = p.

Constant log importance weights ``log w_s = log p(x, z_s) - log q(z_s)`` (PSIS k-hat -inf)
mean q = p only if the draws ``z_s`` move.  A guide whose scale is below what its dtype resolves
(``loc + 1e-30 * eps == loc`` in float64) or a point mass (``AutoDelta``) also gives constant
weights, equal to ``log p(x, z0) - log q(z0)``: nowhere near log p(x), and k-hat -inf would
read as "exact".  :func:`check_degenerate` looks at the draws themselves (a small extra batch of
:data:`NUM_DRAWS`, under a forked RNG so the caller's random numbers are unchanged):

* a guide site with an unconstrained coordinate whose draws spread less than 4 machine epsilons
  of its size (``biject_to(support).inv`` first, so coordinates that are constant by
  construction, like the 1 on an LKJ Cholesky factor's diagonal, are not counted);
* or constant weights from draws that leave ``log p(x, z)`` constant.

It also gives the round-off ``resolution`` of the log weights in their dtype,
``16 eps (|log p| + |log q|)``: the exact posterior's weights are constant only up to it, so
:meth:`~pyro_elbo.diagnostics.trust.EvidenceBounds.contains` floors the SE there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import biject_to

from pyro_elbo.diagnostics.psis import CONSTANT_LOG_WEIGHTS
from pyro_elbo.engine.particles import guess_plate_nesting, run_particles
from pyro_elbo.engine.traces import forked_rng

__all__ = ["Degeneracy", "DegenerateGuideError", "NUM_DRAWS", "check_degenerate"]

#: draws of the extra batch the check looks at
NUM_DRAWS = 64


class DegenerateGuideError(ValueError):
    """The guide is a point mass and its log weights are not even finite: nothing can be
    estimated from it."""


@dataclass
class Degeneracy:
    """``reason``: why the guide is degenerate, ``""`` when it is not; ``resolution``: the
    round-off of the log weights in their dtype."""

    reason: str
    resolution: float


def check_degenerate(model, guide, args, kwargs, log_weights) -> Degeneracy:
    """Whether ``guide`` is degenerate (see the module doc), given the ``log_weights`` of the
    caller's draws.  Raises :class:`DegenerateGuideError` for a degenerate guide whose weights
    are non-finite (its density overflows its dtype)."""
    with torch.no_grad(), forked_rng():
        torch.manual_seed(7)
        try:
            nesting = guess_plate_nesting(model, guide, args, kwargs)
            particles = _draw(model, guide, args, kwargs, nesting)
        except Exception:  # what the caller's own pass ran, this one could not: no verdict
            return Degeneracy("", 0.0)
        log_p, log_q = particles.log_p(), particles.log_q()
        collapsed, has_latents = _collapsed_sites(particles)
    dtype = log_p.dtype if log_p.is_floating_point() else torch.get_default_dtype()
    magnitude = (log_p.double().abs() + log_q.double().abs()).nan_to_num(0.0, 0.0, 0.0).mean()
    resolution = 16 * torch.finfo(dtype).eps * max(1.0, float(magnitude))
    log_weights = log_weights.detach().double().reshape(-1)
    reason = ""
    if collapsed:
        reason = "the draws of " + ", ".join(collapsed[:4]) + " do not vary"
    elif has_latents and len(log_weights) > 1 and _spread(log_weights) < CONSTANT_LOG_WEIGHTS:
        if _spread(log_p.double()) < CONSTANT_LOG_WEIGHTS:
            reason = "constant log weights from draws that leave log p(x, z) constant"
    if reason and not bool(torch.isfinite(log_weights).all()):
        raise DegenerateGuideError(
            f"degenerate guide: {reason}, and its log weights are not finite (a scale below "
            "what the dtype resolves). q is a point mass, not the posterior; nothing can be "
            "estimated from it. Refit the guide (a diverged fit, or init_scale too small), "
            "e.g. with fit(..., init='laplace') or a smaller learning rate."
        )
    return Degeneracy(reason, resolution)


def _draw(model, guide, args, kwargs, nesting):
    try:
        return run_particles(
            model, guide, args, kwargs, num_particles=NUM_DRAWS, plate_nesting=nesting
        )
    except Exception:  # a model that does not vectorize
        return run_particles(
            model, guide, args, kwargs, num_particles=NUM_DRAWS, plate_nesting=nesting,
            vectorize=False,
        )


def _spread(values) -> float:
    return float(values.max() - values.min())


def _collapsed_sites(particles):
    """``(["'z' (3 of 4 coordinates)", ...], has_latents)``: guide sites with an unconstrained
    coordinate whose draws spread less than 4 epsilons of its size (a point mass)."""
    collapsed, has_latents = [], False
    traces = particles.guide_traces
    K, P = particles.num_particles, particles.plate_nesting
    for name, site in traces[0].nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        fn, value = site["fn"], site["value"]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if getattr(fn.support, "is_discrete", False):
            continue
        has_latents = True
        if particles.vectorized:
            dim = value.dim() - len(fn.event_shape) - (P + 1)
            if dim < 0 or value.shape[dim] != K:
                continue
        else:
            value, dim = torch.stack([t.nodes[name]["value"] for t in traces]), 0
        try:
            value = biject_to(fn.support).inv(value)
        except Exception:
            pass
        spread = value.amax(dim) - value.amin(dim)
        size = value.abs().amax(dim)
        flat = (spread <= 4 * torch.finfo(value.dtype).eps * size).reshape(-1)
        if bool(flat.any()):
            collapsed.append(f"{name!r} ({int(flat.sum())} of {flat.numel()} coordinates)")
    return collapsed, has_latents
