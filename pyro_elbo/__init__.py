"""pyro_elbo: variational objectives, guides, exact checks and an ArviZ hand-off for Pyro."""

from pyro_elbo.objectives.elbo import ELBO

__version__ = "0.1.0"

__all__ = ["ELBO"]
