"""pyro_elbo: variational objectives, guides, exact checks and an ArviZ hand-off for Pyro.

Objectives are ``pyro.infer.ELBO`` subclasses that drop into ``pyro.infer.SVI(..., loss=...)``;
``pyro_elbo.conjugate`` holds exact oracles to check fits against.
"""

from pyro_elbo import conjugate
from pyro_elbo.diagnostics.check import CheckResult, check
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO

__version__ = "0.1.0"

__all__ = ["CheckResult", "ELBO", "check", "conjugate", "posterior_of"]
