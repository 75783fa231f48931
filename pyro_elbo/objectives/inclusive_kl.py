"""``pyro_elbo.InclusiveKL``: fit q by the forward (inclusive) KL(p(z | x) || q(z)).

The wake-phi step of reweighted wake-sleep (Bornschein & Bengio 2015; Le, Kosiorek, Siddharth,
Teh & Wood 2019, "Revisiting reweighted wake-sleep"; MATH.md §2 and §4)::

    grad_phi KL(p || q) = -E_p[grad_phi log q_phi(z)]
                       ~= -sum_k w~_k grad_phi log q_phi(z_k),   z_k ~ q,  w~ = softmax(log w)

a self-normalized importance-sampling estimate with the samples ``z_k`` held constant (no path
derivative, so discrete and non-reparameterizable guide sites work too).  It is consistent, with a
bias of order 1/K; ``num_particles >= 2`` is required (with one particle ``w~ = 1`` and the
estimate has mean zero).

The forward KL is mass-covering: on a bimodal posterior a Gaussian q spreads over both modes
(moment matching), where the ELBO's reverse KL locks onto one (see ``tests/test_bounds.py``).

Model parameters follow the importance-weighted bound (the wake-theta step),
``sum_k w~_k grad_theta log p(x, z_k)``: the engine records the detached draws in the traces, so
log p reaches the model's parameters only (``pyro.param``, ``pyro.module``, ``PyroModule`` or a
plain ``nn.Module`` the model calls) and no gradient reaches the guide through the samples.  ``loss`` is minus the importance-weighted bound, for
monitoring; like :class:`~pyro_elbo.objectives.iwelbo.IWELBO` it is taken per element of a plate
that every site lives in, the subsampling scale applied after the per-element log-mean-exp, so the
minibatch gradient is an unbiased sum over data points of per-element estimates.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import scale_and_mask

from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.weights import group_terms, importance_weights
from pyro_elbo.objectives.base import ParticleObjective

__all__ = ["InclusiveKL"]


class InclusiveKL(ParticleObjective):
    """Forward-KL (wake-phi) fit of the guide; ``loss`` is minus the importance-weighted bound.

    :param vectorize_particles, max_plate_nesting, retain_graph: the engine's options, as in
        :class:`~pyro_elbo.objectives.base.ParticleObjective`.
    :param int num_particles: particles K per step (>= 2).
    """

    min_particles = 2

    def __init__(
        self,
        num_particles: int = 8,
        *,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
    ):
        super().__init__(
            num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
        )

    def _engine_options(self, need_surrogate):
        # z_k held constant: gradients reach the guide only through log q(z_k)'s parameters
        return {"detach_samples": True}

    def _loss_and_surrogate(self, particles: Particles, need_surrogate: bool):
        weights = importance_weights(particles, "InclusiveKL")
        loss = -weights.bound()
        if not need_surrogate:
            return loss, None
        w = weights.normalized
        # guide: sum_k w~_k log q(stop(z_k)) (wake-phi)
        log_q = group_terms(particles, _log_q_at_fixed_samples(particles), weights.frames)
        surrogate = (w * log_q).sum()
        # model: sum_k w~_k grad_theta log p(x, z_k) (the IW bound); the draws are detached, so
        # log p reaches only the model's parameters, whatever kind they are
        surrogate = surrogate + (w * weights.log_p).sum()
        return loss, -weights.scale * surrogate

    def __repr__(self):
        return f"InclusiveKL(num_particles={self.num_particles})"


def _log_q_at_fixed_samples(particles: Particles) -> list:
    """Per guide site, ``log q(stop(z))`` (unscaled, masked) in the engine layout.

    The engine runs the guide with its samples detached, so every *downstream* quantity (the
    conditionals of later sites, AutoNormal's Delta values and Jacobians) is computed from
    constant samples.  The value a trace records for a site is re-detached here as well, so that
    only the distribution's parameters carry gradient, whatever the handler order in the engine.
    """
    terms = []
    for name in particles.guide_sites:
        per_trace = []
        for trace in particles.guide_traces:
            node = trace.nodes[name]
            value = node["value"]
            value = value.detach() if isinstance(value, torch.Tensor) else value
            per_trace.append(scale_and_mask(node["fn"].log_prob(value), 1.0, node["mask"]))
        terms.append(particles.align(name, per_trace))
    return terms
