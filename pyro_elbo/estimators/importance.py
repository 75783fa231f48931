"""Gradient estimators of the importance-weighted bound (IWAE, DReG, STL), on grouped log weights.

With normalized weights ``w~_k = w_k / sum_j w_j`` held constant (MATH.md §4; see
:mod:`pyro_elbo.objectives.iwelbo` for the bound):

* IWAE (Burda et al. 2016): ``sum_k w~_k grad log w_k``, plus the VIMCO score-function term
  ``sum_k (L - L_{-k}) grad log q(z_k)`` for guide sites without ``rsample`` (Mnih & Rezende 2016);
* DReG (Tucker et al. 2019): ``sum_k w~_k^2 (log p_k - log q_stop_k)`` for the guide, plus the linear
  correction of :func:`model_correction` so model parameters keep the IWAE gradient;
* STL (Roeder et al. 2017): ``sum_k w~_k (log p_k - log q_stop_k)``, biased for K > 1.

Each ``*_surrogate`` returns the unscaled surrogate (a scalar) whose gradient is the estimator's;
each ``*_one_particle`` the K = 1 surrogate, shape ``(K,)``, where every site keeps its own scale.
"""

from __future__ import annotations

import torch

from pyro_elbo.engine.bounds import log_mean_exp
from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.validation import require_reparameterized
from pyro_elbo.estimators.reparam import reparam_surrogate

__all__ = [
    "dreg_surrogate",
    "iwae_one_particle",
    "iwae_surrogate",
    "iw_stl_surrogate",
    "model_correction",
    "path_one_particle",
    "vimco_signal",
]


def vimco_signal(log_w: torch.Tensor) -> torch.Tensor:
    """The VIMCO learning signal ``L - L_{-k}`` per particle and element, shape ``(K, E)``.

    ``L = log (1/K) sum_j w_j`` and ``L_{-k}`` is the same with ``log w_k`` replaced by the mean
    of the other particles' log weights (Mnih & Rezende 2016), which does not depend on ``z_k``.
    With one particle there is no baseline and the signal is ``L``.
    """
    log_w = log_w.detach()
    K = log_w.shape[0]
    total = log_mean_exp(log_w, 0)
    if K == 1:
        return total.expand_as(log_w)
    others = (log_w.sum(0, keepdim=True) - log_w) / (K - 1)  # (K, E)
    # (K, K, E): row k is log_w with its k-th entry replaced by others[k]
    replaced = log_w.unsqueeze(0).expand(K, K, -1).clone()
    index = torch.arange(K, device=log_w.device)
    replaced[index, index] = others
    return total - log_mean_exp(replaced, 1)


def model_correction(particles: Particles, term: torch.Tensor) -> torch.Tensor | None:
    """A linear surrogate ``sum_theta <theta, grad_theta term>`` over the model's parameters.

    Its gradient is ``grad_theta term`` for the model's parameters and zero for everything else.
    The model's parameters are every trainable tensor log p reaches other than through the
    guide's draws (:meth:`~pyro_elbo.engine.particles.Particles.model_leaves`): ``pyro.param``
    sites, ``pyro.module`` / ``PyroModule`` weights and plain modules alike.  ``None`` when the
    model has none (or ``term`` has no graph).
    """
    if not term.requires_grad:
        return None
    leaves = particles.model_leaves()
    if not leaves:
        return None
    grads = torch.autograd.grad(term, leaves, retain_graph=True, allow_unused=True)
    parts = [(leaf * g.detach()).sum() for leaf, g in zip(leaves, grads) if g is not None]
    return sum(parts) if parts else None


def iwae_surrogate(weights, objective: str) -> torch.Tensor:
    """IWAE: ``sum_k w~_k log w_k`` plus VIMCO terms for guide sites without ``rsample``."""
    log_w = weights.log_w
    surrogate = (weights.normalized * log_w).sum()
    scores = [s for s in weights.particles.guide_sites.values() if not s.reparameterized]
    if scores:
        surrogate = surrogate + (vimco_signal(log_w) * weights.group(scores)).sum()
    return surrogate


def _path(weights, objective: str):
    """``(w~, log p - log q_stop)`` per particle and element; every guide site reparameterized."""
    particles = weights.particles
    require_reparameterized(
        particles,
        objective,
        "Use IWELBO(estimator='reparam'), which adds VIMCO score-function terms for such "
        "sites.",
    )
    dense = [s for s in particles.guide_sites.values() if s.carries_density]
    log_q_stop = weights.group(dense, "log_prob_detached", rescale=True)
    return weights.normalized, weights.log_p - log_q_stop


def iw_stl_surrogate(weights, objective: str) -> torch.Tensor:
    """STL: ``sum_k w~_k (log p_k - log q_stop_k)``."""
    w, path = _path(weights, objective)
    return (w * path).sum()


def dreg_surrogate(weights, objective: str) -> torch.Tensor:
    """DReG: ``sum_k w~_k^2 (log p_k - log q_stop_k)`` plus the model parameters' IWAE correction."""
    w, path = _path(weights, objective)
    surrogate = (w.pow(2) * path).sum()
    correction = model_correction(weights.particles, ((w - w.pow(2)) * weights.log_p).sum())
    if correction is not None:
        surrogate = surrogate + correction
    return surrogate


def iwae_one_particle(particles: Particles, objective: str) -> torch.Tensor:
    """K = 1 IWAE: the pathwise ELBO gradient (score terms Rao-Blackwellized over plates)."""
    return reparam_surrogate(particles, "none") + particles.log_p().new_zeros(1)


def path_one_particle(particles: Particles, objective: str) -> torch.Tensor:
    """K = 1 DReG and STL: both are STL, ``log p - log q_stop``."""
    require_reparameterized(
        particles,
        objective,
        "Use IWELBO(estimator='reparam'), which adds score-function terms for such sites.",
    )
    return particles.log_p() - particles.log_q(detached_params=True)
