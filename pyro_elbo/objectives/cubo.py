"""``pyro_elbo.CUBO``: the chi upper bound CUBO_n on log p(x) (Dieng, Tran, Ranganath, Paisley
& Blei 2017, "Variational inference via chi upper bound minimization"; MATH.md §4)::

    CUBO_n(q) = (1/n) log E_q[w^n],    w = p(x, z) / q(z),    CUBO_n >= log p(x) for n > 1,

with equality iff q = p(z | x); minimizing it fits q by the chi^n divergence, which covers the
posterior's mass (unlike the ELBO's reverse KL).  ``loss`` is the K-particle estimate, computed in
log space so that ``w^n`` never overflows::

    loss = (1/n) log (1/K) sum_k exp(n log w_k)        (per plate element, as for IWELBO)

and is minimized.  As with :class:`~pyro_elbo.objectives.iwelbo.IWELBO`, the estimate is taken per
element of a plate that every site lives in, with the subsampling scale applied after the
log-mean-exp; a global latent with a subsampled plate raises an error.

**Bias of the loss.**  By Jensen's inequality the estimate is biased low, ``E[loss] = C_K <=
CUBO_n``, and ``C_K`` rises to ``CUBO_n`` as K grows.  At K = 1 it is ``E[log w]``, the *ELBO*.
To report CUBO_n as an upper bound use many particles (the bias is about ``-SE^2 / 2``).

**Gradient: the log form.**  The surrogate is the loss itself; its reparameterized gradient is
``sum_k v_k grad log w_k`` with ``v = softmax(n log w)``.  This is the per-batch direction of the
exp-form gradient ``(1/K) sum_k w_k^n n grad log w_k`` of Dieng et al. (which is unbiased for
``grad E_q[w^n]``, a positive multiple of ``grad CUBO_n``), rescaled by the batch's own
``1 / (n mean_k w_k^n)``: bounded weights instead of ``w^n``, at the price of a self-normalization
bias of order 1/K.  It is the exact gradient of ``C_K``, not of ``CUBO_n``.  Near q = p(z | x), with
``sigma^2 = Var_q(w / p(x))`` (the chi^2 divergence)::

    CUBO_n ~ log p(x) + (n - 1) sigma^2 / 2,     C_K ~ log p(x) + ((n - 1) - n / K) sigma^2 / 2,

so ``C_K`` has its minimum at the exact posterior (the same as CUBO_n's, to second order) only when
``K > n / (n - 1)``; fewer particles would drive q away from the posterior (at K = 1 the loss is the
ELBO, minimized).  The constructor enforces ``num_particles > n / (n - 1)`` (K >= 3 for n = 2).

**Start wide.**  ``E_q[w^n]`` is finite only when q's tails are heavier than ``p^{n/(n-1)}``'s (a
Gaussian q must be wider than ``sqrt((n-1)/n)`` times a Gaussian posterior's sd, 0.71 for n = 2).
Where it is infinite, CUBO_n = +inf, yet every K-sample estimate is finite, and ``C_K`` is
unbounded *below* as q collapses to a point (``log w ~ log sigma_q``): minimized from a guide much
narrower than the posterior (AutoNormal's default ``init_scale=0.1`` on a wide posterior), q
shrinks to a point instead of growing.  Initialize the guide wider than the posterior (e.g.
``AutoNormal(model, init_scale=...)``, or an ELBO fit with its scales inflated); from there CUBO
converges to the exact posterior when the family contains it (``tests/test_bounds.py``).

Model parameters are rejected: minimizing an upper bound on log p(x) over the model would lower
the evidence.  Fit them with ELBO or IWELBO.  Every guide site must be reparameterized.
"""

from __future__ import annotations

import math
import numbers

from pyro_elbo.engine.bounds import log_mean_exp
from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.validation import require_reparameterized
from pyro_elbo.engine.weights import importance_weights
from pyro_elbo.objectives.base import ParticleObjective

__all__ = ["CUBO"]


class CUBO(ParticleObjective):
    """Chi upper bound CUBO_n; ``loss`` is its K-particle estimate, minimized.

    :param vectorize_particles, max_plate_nesting, retain_graph: the engine's options, as in
        :class:`~pyro_elbo.objectives.base.ParticleObjective`.
    :param int num_particles: particles K per step; must exceed ``n / (n - 1)`` (see the module
        docstring).
    :param float n: the order, ``n > 1`` (default 2).
    """

    def __init__(
        self,
        num_particles: int = 8,
        *,
        n: float = 2.0,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
    ):
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n <= 1:
            raise ValueError(
                f"n must be a finite number > 1, got {n!r}: CUBO_n is an upper bound on log p(x) "
                "for n > 1 (CUBO_1 = log p(x) for every q, so it carries no signal). Use n=2 (the "
                "chi^2 bound) unless you have a reason not to."
            )
        n = float(n)
        min_particles = math.floor(n / (n - 1)) + 1
        if isinstance(num_particles, numbers.Integral) and not isinstance(num_particles, bool):
            if num_particles < min_particles:
                raise ValueError(
                    f"num_particles must be >= {min_particles} for CUBO with n={n:g} (more than "
                    f"n / (n - 1) = {n / (n - 1):.3g}), got {num_particles}. With fewer particles "
                    "the K-sample estimate is biased toward the ELBO so far that minimizing it "
                    "moves q away from the posterior (at K = 1 it is the ELBO)."
                )
        super().__init__(
            num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
        )
        self.n = n

    def _loss_and_surrogate(self, particles: Particles, need_surrogate: bool):
        weights = importance_weights(particles, "CUBO")
        loss = weights.scale * (log_mean_exp(self.n * weights.log_w, 0) / self.n).sum()
        if not need_surrogate:
            return loss, None
        require_reparameterized(
            particles,
            "CUBO",
            "Use a reparameterized guide for that site (e.g. an autoguide over a relaxed or "
            "continuous version), or fit it with ELBO(estimator='score').",
        )
        model_params = particles.model_leaves()
        if model_params:
            name = _describe_leaf(model_params[0])
            raise ValueError(
                f"CUBO: the model has trainable parameter {name}. CUBO is an upper bound on "
                "log p(x); minimizing it over model parameters would lower the evidence. Fit "
                "model parameters with ELBO or IWELBO, or hide them from this objective with "
                "poutine.block(hide=[...]) / requires_grad_(False)."
            )
        return loss, loss

    def __repr__(self):
        return f"CUBO(num_particles={self.num_particles}, n={self.n:g})"


def _describe_leaf(leaf) -> str:
    """A parameter's name in Pyro's param store, or its shape."""
    import pyro

    name = pyro.get_param_store()._param_to_name.get(leaf)
    return repr(name) if name is not None else f"(a tensor of shape {tuple(leaf.shape)})"
