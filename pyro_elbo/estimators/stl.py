"""Sticking the landing: the path-derivative gradient of the ELBO (Roeder, Wu & Duvenaud 2017).

The pathwise gradient of ``-log q_phi(z(phi))`` has two parts: through the sample path ``z`` and
directly through ``phi``.  The direct part has expectation zero; STL drops it::

    grad_phi ELBO_STL = E_eps[ grad_z (log p(x, z) - log q_{stop(phi)}(z)) * dz/dphi ]

so log q is evaluated with the guide's parameters held constant and the samples still
differentiable.  The engine does this for any guide by subtracting the direct part, log q
re-evaluated on the draws cut from the graph
(:func:`pyro_elbo.engine.detach.log_q_with_constant_params`), which keeps the Jacobian terms
of constrained sites (AutoNormal's Delta sites) on the path.  At q = p(z | x) the integrand is
constant, so the estimator has zero variance.

A guide site without ``rsample`` has no path derivative: it gets the score-function term of
:mod:`.score` (with the leave-one-out baseline when K >= 2), as ``estimator="reparam"`` and
Trace_ELBO give it, and the reparameterized sites keep STL.
"""

from __future__ import annotations

import torch

from pyro_elbo.engine.particles import Particles
from pyro_elbo.estimators.score import score_function_surrogate

__all__ = ["stl_surrogate"]


def stl_surrogate(particles: Particles, baseline: str = "loo") -> torch.Tensor:
    """Per-particle surrogate ``log p(x, z) - log q_{stop(phi)}(z)``, plus the score-function
    terms of :mod:`.score` for guide sites without ``rsample`` (as Trace_ELBO gives them): a
    site that has no path derivative keeps the estimator that is unbiased for it."""
    surrogate = particles.log_p() - particles.log_q(detached_params=True)
    scores = {
        name: site.score_function
        for name, site in particles.guide_sites.items()
        if not site.reparameterized
    }
    if scores:
        surrogate = surrogate + score_function_surrogate(particles, scores, baseline)
    return surrogate
