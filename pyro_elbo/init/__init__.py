"""Right answers at the defaults: the stages ``fit`` runs before and during SVI.

* :func:`laplace_init` (:mod:`pyro_elbo.init.laplace`): L-BFGS (with Newton steps) to the
  posterior mode, the Hessian there, and the guide set from them (exact for Gaussian
  posteriors); Pathfinder-style pick along the path when there is no mode;
* :class:`WhitenedAdam` (:mod:`pyro_elbo.init.conditioning`): Adam in the whitened coordinates
  of the guide's starting Gaussian, so coordinates whose sds differ by 1e5 converge together;
* :func:`recommended_guide`, :func:`recommended_objective` (:mod:`pyro_elbo.init.defaults`):
  what ``fit`` uses when the user gives no guide or objective.
"""

from pyro_elbo.init.conditioning import WhitenedAdam, cosine_decay, whitened_optim
from pyro_elbo.init.defaults import latent_dim, recommended_guide, recommended_objective
from pyro_elbo.init.laplace import (
    LaplaceResult,
    LaplaceUnavailable,
    flat_potential,
    laplace_init,
    positive_definite,
)

__all__ = [
    "LaplaceResult",
    "LaplaceUnavailable",
    "WhitenedAdam",
    "cosine_decay",
    "flat_potential",
    "laplace_init",
    "latent_dim",
    "positive_definite",
    "recommended_guide",
    "recommended_objective",
    "whitened_optim",
]
