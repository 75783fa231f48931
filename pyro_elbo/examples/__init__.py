"""Worked examples built on pyro_elbo (importable by the notebooks and tests).

* :mod:`pyro_elbo.examples.vae`: a VAE on scikit-learn's digits trained with ELBO (analytic KL),
  STL, IWAE and DReG, compared by importance-sampled test log-likelihood (``pyro-elbo vae``).
"""
