"""Guides and the guide-to-distribution bridge.

* :class:`AmortizedNormal`: an encoder-network guide for latents local to a data plate (VAE);
* :class:`ExactGuide`: samples a conjugate oracle's exact posterior;
* :class:`AutoRealNVP`: a Real-NVP flow over all latents, built on a Gaussian fit (the flow
  stage of ``fit(model, None, ...)``);
* :func:`posterior_of`: a guide's q as torch Distributions in the model's constrained space.
"""

from pyro_elbo.guides.amortized import AmortizedNormal
from pyro_elbo.guides.exact import ExactGuide
from pyro_elbo.guides.flow import AutoRealNVP
from pyro_elbo.guides.posterior import JointPosterior, posterior_of

__all__ = ["AmortizedNormal", "AutoRealNVP", "ExactGuide", "JointPosterior", "posterior_of"]
