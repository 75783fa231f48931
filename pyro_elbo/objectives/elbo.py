"""``pyro_elbo.ELBO``: the evidence lower bound with a choice of gradient estimator.

    ELBO(q) = E_q[log p(x, z) - log q(z)] = E_q[log p(x | z)] - KL(q(z) || p(z))     (MATH.md (1-2))

``loss`` is -ELBO, estimated with K particles.  The gradient estimator is chosen by name:

* ``"reparam"``: pathwise gradient (:mod:`pyro_elbo.estimators.reparam`), score function for
  guide sites without ``rsample``;
* ``"stl"``: sticking the landing (:mod:`pyro_elbo.estimators.stl`, Roeder et al. 2017);
* ``"score"``: score function for every site (:mod:`pyro_elbo.estimators.score`).

``analytic_kl=True`` replaces the Monte Carlo KL of a site by its closed form where that is valid
(:mod:`pyro_elbo.objectives.analytic_kl`); ``beta`` weighs the KL part (Higgins et al. 2017):
``loss = -(E_q[log p(x | z)] - beta * KL(q(z) || p(z)))``.
"""

from __future__ import annotations

import numbers
import warnings

import torch

from pyro_elbo.engine.particles import Particles
from pyro_elbo.estimators import choose_estimator
from pyro_elbo.estimators.reparam import reparam_surrogate
from pyro_elbo.objectives.analytic_kl import analytic_kl_terms, guide_depends_on
from pyro_elbo.objectives.base import ParticleObjective

__all__ = ["ELBO"]

BASELINES = ("loo", "none")


class ELBO(ParticleObjective):
    """Evidence lower bound; ``loss`` is -ELBO.  Drops into ``pyro.infer.SVI(..., loss=ELBO())``.

    :param vectorize_particles, max_plate_nesting, retain_graph: the engine's options, as in
        :class:`~pyro_elbo.objectives.base.ParticleObjective`.
    :param int num_particles: particles K per step.
    :param str estimator: ``"reparam"`` (default), ``"stl"`` or ``"score"``.
    :param str baseline: ``"loo"`` (leave-one-out across particles, default) or ``"none"``, for
        score-function terms.  ``estimator="score"`` with ``"loo"`` needs ``num_particles >= 2``.
    :param bool analytic_kl: closed-form KL(q || p) per latent site where valid (reparam only).
    :param float beta: weight of the KL part (``beta=1`` is the ELBO).
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        estimator: str = "reparam",
        baseline: str = "loo",
        analytic_kl: bool = False,
        beta: float = 1.0,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
    ):
        self._estimator = choose_estimator("ELBO", estimator)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"beta must be a non-negative number, got {beta!r}")
        if analytic_kl and estimator != "reparam":
            raise ValueError(
                f"analytic_kl=True works with estimator='reparam' only, got estimator={estimator!r}"
            )
        if estimator == "score" and baseline == "loo" and num_particles < 2:
            raise ValueError(
                "estimator='score' with baseline='loo' needs num_particles >= 2 (the baseline of "
                "each particle is the mean of the others); raise num_particles or pass "
                "baseline='none'."
            )
        super().__init__(
            num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            retain_graph=retain_graph,
        )
        self.estimator = estimator
        self.baseline = baseline
        self.analytic_kl = bool(analytic_kl)
        self.beta = float(beta)
        self._kl_warned: set[str] = set()
        self._kl_depends: dict = {}

    def _engine_options(self, need_surrogate):
        return {
            "beta": self.beta,
            "detach_params": need_surrogate and self._estimator.detach_params,
            "detach_samples": self._estimator.detach_samples,
        }

    def _loss_and_surrogate(self, particles: Particles, need_surrogate: bool):
        kl_terms = []
        if self.analytic_kl:
            fallbacks = {}
            kl_terms = analytic_kl_terms(particles, fallbacks, self._guide_depends)
            for name, reason in fallbacks.items():
                if name not in self._kl_warned:
                    self._kl_warned.add(name)
                    warnings.warn(
                        f"ELBO(analytic_kl=True): site {name!r} keeps its Monte Carlo KL: "
                        f"{reason}.",
                        stacklevel=2,
                    )
        if kl_terms:
            replaced = {name for t in kl_terms for name in (t.name, *t.replaces_guide_sites)}
            kl = sum(particles.per_particle(t.kl) for t in kl_terms)
            elbo = self._elbo_skipping(particles, replaced) - kl
        else:
            replaced = frozenset()
            elbo = particles.log_p() - particles.log_q()
        loss = -elbo.mean()
        if not need_surrogate:
            return loss, None
        if kl_terms:  # analytic KL is for estimator="reparam" only
            surrogate = reparam_surrogate(particles, self.baseline, skip=replaced) - kl
        elif self.estimator == "reparam" and all(
            s.reparameterized for s in particles.guide_sites.values()
        ):
            surrogate = elbo  # fully pathwise: the ELBO estimate is its own surrogate
        else:
            surrogate = self._estimator.surrogate(particles, self.baseline)
        return loss, -surrogate.mean()

    def _guide_depends(self, name, others) -> bool:
        """Whether the guide being run draws ``others`` given ``name`` (cached per guide)."""
        model, guide, args, kwargs = self._call
        key = (id(guide), name, tuple(others))
        if key not in self._kl_depends:
            self._kl_depends[key] = guide_depends_on(guide, args, kwargs, name, others)
        return self._kl_depends[key]

    @staticmethod
    def _elbo_skipping(particles: Particles, skip) -> torch.Tensor:
        log_p = sum(
            particles.per_particle(s.log_prob)
            for n, s in particles.model_sites.items()
            if n not in skip
        )
        log_q = sum(
            particles.per_particle(s.log_prob)
            for n, s in particles.guide_sites.items()
            if n not in skip
        )
        return log_p - log_q

    def __repr__(self):
        extras = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("analytic_kl", self.analytic_kl),
                ("beta", self.beta),
            )
            if v not in (False, 1.0)
        )
        return (
            f"ELBO(num_particles={self.num_particles}, estimator={self.estimator!r}"
            f"{extras})"
        )
