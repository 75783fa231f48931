"""Score-function (REINFORCE) gradient terms, with a leave-one-out baseline.

For guide sites ``s`` whose samples carry no gradient (no ``rsample``, or every site under
``estimator="score"``) the gradient of ``E_q[log p(x, z) - log q(z)]`` is (MATH.md §3)::

    grad_phi ELBO = E_q[ grad_phi log q_s(z_s) * (C_s - b_s) ]

with ``C_s`` the cost ``log p - log q`` summed over everything that shares ``s``'s plate
elements (Pyro's partial Rao-Blackwellization) and ``b_s`` a baseline that does not depend on the
particle's own draw.  The leave-one-out baseline over K particles is::

    b_{s,k} = (sum_j C_{s,j} - C_{s,k}) / (K - 1)

(Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ranganath,
Gerrish & Blei 2014 for the estimator).  Both keep the estimator unbiased.
"""

from __future__ import annotations

import torch

from pyro_elbo.engine.particles import Particles, sum_to_frames

__all__ = ["leave_one_out_baseline", "score_function_surrogate", "score_surrogate"]


def leave_one_out_baseline(cost: torch.Tensor) -> torch.Tensor:
    """``b_k = mean_{j != k} cost_j`` along the particle dim 0."""
    num_particles = cost.shape[0]
    return (cost.sum(0, keepdim=True) - cost) / (num_particles - 1)


def score_function_surrogate(
    particles: Particles, score_functions: dict[str, torch.Tensor], baseline: str
) -> torch.Tensor:
    """Per-particle surrogate ``sum_s (C_s - b_s) * score_s``, shape ``(K,)``.

    ``score_functions`` maps guide site names to ``log q_s(z_s)`` terms (unscaled, masked) whose
    gradient is the score; the cost carries the subsampling scale.
    """
    log_r = [(site.frames, site.log_prob.detach()) for site in particles.model_sites.values()]
    log_r += [(site.frames, -site.log_prob.detach()) for site in particles.guide_sites.values()]
    surrogate = 0.0  # becomes a (K,) tensor on the terms' device
    for name, score in score_functions.items():
        frames = particles.guide_sites[name].frames
        cost = sum(sum_to_frames(term, term_frames, frames) for term_frames, term in log_r)
        if baseline == "loo" and particles.num_particles > 1:
            cost = cost - leave_one_out_baseline(cost)
        surrogate = surrogate + particles.per_particle(cost * score)
    return surrogate


def score_surrogate(particles: Particles, baseline: str = "loo") -> torch.Tensor:
    """``estimator="score"``: per-particle ``log p`` plus score-function terms for every guide site
    (the engine ran with the samples detached, so no gradient flows along their paths)."""
    scores = {n: s.log_prob_unscaled for n, s in particles.guide_sites.items()}
    return particles.log_p() + score_function_surrogate(particles, scores, baseline)
