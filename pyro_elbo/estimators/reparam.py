"""The pathwise (reparameterization) gradient of the ELBO.

With ``z = g_phi(eps)``, ``eps ~ p(eps)`` (Kingma & Welling 2014; Rezende et al. 2014)::

    grad_phi ELBO = E_eps[ grad_phi (log p(x, g_phi(eps)) - log q_phi(g_phi(eps))) ]

Guide sites without ``rsample`` get the score-function term of :mod:`.score` automatically
(with the leave-one-out baseline when K >= 2, none at K = 1, as in ``Trace_ELBO``); a site with
both parts (a reparameterized rejection sampler, RSVI) gets both, as Pyro's ``score_parts``
split them.
"""

from __future__ import annotations

import torch

from pyro_elbo.engine.particles import Particles
from pyro_elbo.estimators.score import score_function_surrogate

__all__ = ["reparam_surrogate"]


def reparam_surrogate(particles: Particles, baseline: str = "loo", skip=frozenset()) -> torch.Tensor:
    """Per-particle surrogate ``log p - log q (+ score terms)``; sites in ``skip`` are left out."""
    surrogate = 0.0  # becomes a (K,) tensor on the terms' device
    for name, site in particles.model_sites.items():
        if name not in skip:
            surrogate = surrogate + particles.per_particle(site.log_prob)
    scores = {}
    for name, site in particles.guide_sites.items():
        if site.reparameterized:
            if name not in skip:
                surrogate = surrogate - particles.per_particle(site.log_prob)
        else:
            scores[name] = site.score_function
            pathwise = site.pathwise_part  # a rejection sampler's reparameterized part (RSVI)
            if pathwise is not None and name not in skip:
                surrogate = surrogate - particles.per_particle(pathwise)
    if scores:
        surrogate = surrogate + score_function_surrogate(particles, scores, baseline)
    return surrogate
