"""Gradient estimators of the ELBO, one per module, each a pure function of engine particles.

Each returns a per-particle surrogate of shape ``(K,)`` whose gradient, averaged over particles,
is the estimator.  :mod:`pyro_elbo.objectives.elbo` picks one by name.
"""
