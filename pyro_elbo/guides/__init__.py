"""Guides and the guide-to-distribution bridge.

* :class:`AmortizedNormal`: an encoder-network guide for latents local to a data plate (VAE);
* :class:`ExactGuide`: samples a conjugate oracle's exact posterior;
* :func:`posterior_of`: a guide's q as torch Distributions in the model's constrained space.
"""

from pyro_elbo.guides.amortized import AmortizedNormal
from pyro_elbo.guides.exact import ExactGuide
from pyro_elbo.guides.posterior import JointPosterior, posterior_of

__all__ = ["AmortizedNormal", "ExactGuide", "JointPosterior", "posterior_of"]
