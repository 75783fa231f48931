"""The guide and objective ``fit`` uses when the user gives none.

**Guide** (:func:`recommended_guide`), by the number D of unconstrained latent dimensions:

* ``D <= FULL_RANK_MAX_DIM``: ``AutoMultivariateNormal``.  A full-rank Gaussian fits badly
  scaled, strongly correlated posteriors almost exactly, while mean field shrinks correlated
  coordinates' sds (by ``sqrt(1 - rho^2)`` for a pair, so 3x at rho = 0.95 and 70x at
  rho = 0.9999) and cannot be fixed by any optimizer;
* ``FULL_RANK_MAX_DIM < D <= LOW_RANK_MAX_DIM``: ``AutoLowRankMultivariateNormal`` with rank
  ``LOW_RANK_RANK``: the cost of full rank grows as D^2 parameters and D^3 per whitened step;
* larger, or any latent site inside a subsampled plate (local latents): ``AutoNormal``, the only
  one of these that supports data subsampling.

The thresholds were set by measurement (``python -m benchmarks.stress --experiments guides``, see
the report in ``benchmarks/results/stress.md``).

**Objective** (:func:`recommended_objective`): the ELBO with the sticking-the-landing estimator
(Roeder, Wu & Duvenaud 2017), ``pyro_elbo.ELBO(num_particles, estimator="stl")``.  Its gradient
variance vanishes as q approaches the posterior, so after the Laplace stage (which puts a
Gaussian guide at or next to the answer) the stochastic stage does not add the noise that keeps
``Trace_ELBO`` a few tenths of a nat of KL off even at a well-conditioned optimum.  Guides with
non-reparameterized sites get ``estimator="reparam"`` (STL needs ``rsample``).
"""

from __future__ import annotations

import math

from pyro import poutine
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import biject_to

from pyro_elbo.engine.traces import quietly
from pyro_elbo.objectives.elbo import ELBO

__all__ = [
    "FULL_RANK_MAX_DIM",
    "LOW_RANK_MAX_DIM",
    "LOW_RANK_RANK",
    "latent_dim",
    "recommended_guide",
    "recommended_objective",
    "recommended_objective_and_reason",
]

FULL_RANK_MAX_DIM = 200
LOW_RANK_MAX_DIM = 5000
LOW_RANK_RANK = 20
DEFAULT_PARTICLES = 4


def _prototype(model, args, kwargs):
    with quietly(fork=False):
        return poutine.trace(model).get_trace(*args, **kwargs)


def latent_dim(model, *args, **kwargs) -> int:
    """The number of unconstrained dimensions of the model's latent sites."""
    return _latent_info(_prototype(model, args, kwargs))[0]


def _latent_info(trace):
    dim, subsampled, discrete = 0, [], []
    for name, site in trace.iter_stochastic_nodes():
        if isinstance(site["fn"], _Subsample):
            continue
        if site["fn"].has_enumerate_support and not site["fn"].has_rsample:
            discrete.append(name)
            continue
        dim += math.prod(biject_to(site["fn"].support).inv(site["value"]).shape)
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size is not None and frame.full_size != frame.size:
                subsampled.append(name)
                break
    return dim, subsampled, discrete


def recommended_guide(model, *args, **kwargs):
    """The default guide for ``model`` (see the module docstring for the rule).

    :raises ValueError: the model has discrete latent sites (marginalize them in the model, or
        pass a guide and an enumerating objective).
    """
    dim, subsampled, discrete = _latent_info(_prototype(model, args, kwargs))
    if discrete:
        raise ValueError(
            f"recommended_guide: the model has discrete latent sites {discrete}; the default "
            "Gaussian guides cannot hold them. Marginalize them in the model (e.g. "
            "MixtureSameFamily), or pass a guide and an objective that enumerates them."
        )
    if dim == 0:
        raise ValueError("recommended_guide: the model has no latent sites to fit")
    if subsampled:
        return AutoNormal(model)
    if dim <= FULL_RANK_MAX_DIM:
        return AutoMultivariateNormal(model)
    if dim <= LOW_RANK_MAX_DIM:
        return AutoLowRankMultivariateNormal(model, rank=LOW_RANK_RANK)
    return AutoNormal(model)


def _reparameterized(guide, args, kwargs) -> bool:
    try:
        trace = _prototype(guide, args, kwargs)
    except Exception:  # a guide that cannot run on its own: let the objective decide later
        return True
    return all(
        site["fn"].has_rsample
        for _, site in trace.iter_stochastic_nodes()
        if not isinstance(site["fn"], _Subsample)
    )


def recommended_objective(guide=None, *args, num_particles: int = DEFAULT_PARTICLES, **kwargs):
    """The default objective: ``ELBO(num_particles, estimator="stl")``, or
    ``estimator="reparam"`` when ``guide`` (run on ``args``) has a site without ``rsample`` or
    its log q cannot be evaluated with its parameters held constant (a flow without an inverse);
    :func:`recommended_objective_and_reason` also says why."""
    return recommended_objective_and_reason(guide, *args, num_particles=num_particles, **kwargs)[0]


def recommended_objective_and_reason(
    guide=None, *args, num_particles: int = DEFAULT_PARTICLES, **kwargs
):
    """``(objective, reason)``: :func:`recommended_objective` and a one-line reason for it."""
    from pyro_elbo.engine.particles import path_derivative_unavailable

    if guide is not None and not _reparameterized(guide, args, kwargs):
        return ELBO(num_particles, estimator="reparam"), (
            f"ELBO({num_particles}, estimator='reparam'): the guide has a site without rsample, "
            "which STL cannot differentiate through"
        )
    why = None if guide is None else path_derivative_unavailable(guide, args, kwargs)
    if why is not None:
        return ELBO(num_particles, estimator="reparam"), (
            f"ELBO({num_particles}, estimator='reparam'), not STL: {why.split('. ')[0]}"
        )
    return ELBO(num_particles, estimator="stl"), (
        f"ELBO({num_particles}, estimator='stl'): sticking the landing, whose gradient variance "
        "vanishes at the exact posterior"
    )
