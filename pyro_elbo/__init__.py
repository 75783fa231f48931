"""pyro_elbo: variational objectives, guides, exact checks and an ArviZ hand-off for Pyro.

Objectives are ``pyro.infer.ELBO`` subclasses that drop into ``pyro.infer.SVI(..., loss=...)``;
``pyro_elbo.conjugate`` holds exact oracles to check fits against.
"""

from pyro_elbo import conjugate
from pyro_elbo.diagnostics.arviz import loo, to_inference_data
from pyro_elbo.diagnostics.check import CheckResult, check
from pyro_elbo.diagnostics.gradient_variance import GradientVariance, gradient_variance
from pyro_elbo.diagnostics.trust import Diagnosis, EvidenceBounds, diagnose, evidence_bounds
from pyro_elbo.fit import FitResult, NonFiniteError, fit
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.cubo import CUBO
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.inclusive_kl import InclusiveKL
from pyro_elbo.objectives.iwelbo import IWELBO
from pyro_elbo.vi import PathfinderResult, pathfinder

__version__ = "0.1.0"

__all__ = [
    "CUBO",
    "CheckResult",
    "Diagnosis",
    "ELBO",
    "EvidenceBounds",
    "GradientVariance",
    "IWELBO",
    "InclusiveKL",
    "check",
    "conjugate",
    "diagnose",
    "evidence_bounds",
    "FitResult",
    "NonFiniteError",
    "PathfinderResult",
    "fit",
    "gradient_variance",
    "loo",
    "pathfinder",
    "posterior_of",
    "to_inference_data",
]
