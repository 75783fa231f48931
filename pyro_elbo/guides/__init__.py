"""Guides and the guide-to-distribution bridge."""

from pyro_elbo.guides.posterior import posterior_of

__all__ = ["posterior_of"]
