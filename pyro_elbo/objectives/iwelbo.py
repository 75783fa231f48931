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

from pyro_elbo.engine.particles import Particles
from pyro_elbo.engine.validation import require_reparameterized
from pyro_elbo.engine.weights import ImportanceWeights, group_terms, importance_weights
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


class IWELBO(ParticleObjective):
    """Importance-weighted bound; ``loss`` is minus the bound.  Drops into ``SVI``.

    :param vectorize_particles, max_plate_nesting, retain_graph: the engine's options, as in
        :class:`~pyro_elbo.objectives.base.ParticleObjective`.
    :param int num_particles: particles K per step (K = 1 is the ELBO).
    :param str estimator: ``"reparam"`` (IWAE, default), ``"dreg"`` or ``"stl"`` (see the module
        docstring; ``"dreg"`` and ``"stl"`` need every guide site reparameterized).
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
        loss = -weights.bound()
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
