"""``check(oracle, guide)``: the ELBO identity on a conjugate oracle, term by term.

MATH.md (1):  ``log p(x) = ELBO(q) + KL(q(z) || p(z | x))``.  On a conjugate oracle the three terms
are computed independently:

* ``log p(x)``: the oracle's closed form;
* ``ELBO``: Monte Carlo over S draws from the guide, ``mean_s [log p(x, z_s) - log q(z_s)]``;
* ``KL(q || p(z | x))``: closed form (``torch.distributions.kl_divergence``) between
  :func:`~pyro_elbo.guides.posterior_of` and the exact posterior where torch registers the pair;
  otherwise Monte Carlo over a second, independent set of S draws, in the constrained space in
  which the posterior lives.

The residual ``log p(x) - ELBO - KL`` is zero in expectation; its SE combines the two Monte Carlo
SEs, so ``|residual| / residual_se`` is a z-score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from pyro_elbo.engine.bounds import elbo_estimate
from pyro_elbo.engine.particles import guess_plate_nesting, run_particles
from pyro_elbo.guides.posterior import posterior_of

__all__ = ["CheckResult", "check"]


@dataclass
class CheckResult:
    """The terms of identity (1) on a conjugate oracle (floats)."""

    log_evidence: float
    elbo: float
    elbo_se: float
    kl: float
    kl_se: float
    kl_closed_form: bool
    num_samples: int

    @property
    def residual(self) -> float:
        """``log p(x) - ELBO - KL``: zero in expectation."""
        return self.log_evidence - self.elbo - self.kl

    @property
    def residual_se(self) -> float:
        """Combined Monte Carlo SE, floored at float64 round-off (1e-10 relative to log p(x))
        so that a guide at the exact posterior, whose log weights are all equal, reads 0 SE."""
        return max(math.hypot(self.elbo_se, self.kl_se), 1e-10 * max(1.0, abs(self.log_evidence)))

    @property
    def residual_z(self) -> float:
        """The residual in SE units."""
        return self.residual / self.residual_se if self.residual_se > 0 else 0.0

    def __repr__(self) -> str:
        kind = "closed form" if self.kl_closed_form else "Monte Carlo"
        return (
            f"CheckResult(log p(x)={self.log_evidence:.4f}, ELBO={self.elbo:.4f} ± "
            f"{self.elbo_se:.4f}, KL={self.kl:.4f} ± {self.kl_se:.4f} ({kind}), residual="
            f"{self.residual:+.4f} ({self.residual_z:+.2f} SE), S={self.num_samples})"
        )


def check(oracle, guide, num_samples: int = 4000) -> CheckResult:
    """Compute log p(x), the ELBO (± SE) and KL(q || p(z | x)) (± SE) for ``guide`` on ``oracle``.

    :param oracle: a :mod:`pyro_elbo.conjugate` oracle.
    :param guide: any guide for ``oracle.model`` that vectorizes under an outer plate.
    :param int num_samples: Monte Carlo draws S for the ELBO (and for the KL when it is not in
        closed form).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    model = oracle.model
    nesting = guess_plate_nesting(model, guide, (), {})
    with torch.no_grad():
        particles = run_particles(
            model, guide, (), {}, num_particles=num_samples, plate_nesting=nesting, validate=True
        )
        elbo, elbo_se = elbo_estimate(particles.log_p() - particles.log_q())
        kl = _closed_form_kl(oracle, guide)
        if kl is not None:
            kl_value, kl_se, closed = float(kl), 0.0, True
        else:
            draws = run_particles(
                model, guide, (), {}, num_particles=num_samples, plate_nesting=nesting
            )
            log_ratio = draws.log_q() - _log_posterior(oracle, draws)
            kl_mean, kl_sd = elbo_estimate(log_ratio)
            kl_value, kl_se, closed = float(kl_mean), float(kl_sd), False
    return CheckResult(
        log_evidence=float(oracle.log_evidence()),
        elbo=float(elbo),
        elbo_se=float(elbo_se),
        kl=kl_value,
        kl_se=kl_se,
        kl_closed_form=closed,
        num_samples=num_samples,
    )


def _as_mvn(distribution):
    """A diagonal Gaussian over a vector, as the equal MultivariateNormal (for KL against one)."""
    if isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal):
        if distribution.reinterpreted_batch_ndims == 1:
            base = distribution.base_dist
            return MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))
    return distribution


def _closed_form_kl(oracle, guide):
    if getattr(oracle, "latent", None) is None:
        return None
    try:
        q = posterior_of(guide, site=oracle.latent)
    except (TypeError, KeyError):
        return None
    p = oracle.posterior()
    if isinstance(p, MultivariateNormal):
        q = _as_mvn(q)
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _latent_values(particles, name):
    value = particles.model_traces[0].nodes[name]["value"]
    return value.reshape((particles.num_particles,) + value.shape[particles.plate_nesting + 1 :])


def _log_posterior(oracle, particles):
    posterior = oracle.posterior()
    if getattr(oracle, "latent", None) is not None:
        return posterior.log_prob(_latent_values(particles, oracle.latent))
    values = {name: _latent_values(particles, name) for name in oracle.latents}
    return posterior.log_prob(values)
