"""``posterior_of(guide)``: a fitted guide's q as torch Distributions in the model's space.

Supported guides:

* ``AutoNormal``: per site, ``Normal(loc, scale)`` pushed through ``biject_to(support)`` (so
  a Gamma latent gets a log-normal q, a Dirichlet latent a stick-breaking-normal q);
* ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``: the
  marginal of the site's block of the joint Gaussian over the unconstrained latent vector (exact:
  marginals of a Gaussian are Gaussian), reshaped and pushed through ``biject_to(support)``;
* any guide with a ``posterior_distributions()`` method returning ``{site: Distribution}``
  (pyro_elbo's own guides).

Hand-written ``pyro.param`` guides have no structure to read: they raise ``TypeError``; use Monte
Carlo on their traces instead (as :func:`pyro_elbo.check` does).
"""

from __future__ import annotations

import math

import torch
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    biject_to,
)
from torch.distributions.transforms import ComposeTransform, IndependentTransform, ReshapeTransform

__all__ = ["posterior_of"]


def posterior_of(guide, *args, site: str | None = None, **kwargs):
    """q as a torch Distribution over the model's (constrained) latent values.

    :param guide: a fitted guide (see the module docstring for the supported types).
    :param args, kwargs: the model's arguments; only needed when an autoguide has not been run
        yet (to build its prototype trace).
    The distributions are a detached snapshot of the guide's current parameters.

    :param site: a latent site name.  With ``site=None``, a guide with one latent site returns
        that site's Distribution, and a guide with several returns ``{site: Distribution}`` of
        the per-site marginals.
    """
    if hasattr(guide, "posterior_distributions"):
        marginals = guide.posterior_distributions(*args, **kwargs)
    elif isinstance(guide, (AutoNormal, AutoContinuous)):
        if guide.prototype_trace is None:
            with torch.no_grad():
                guide(*args, **kwargs)
        # Inside the module's Pyro context its PyroParams are read through the param store, so
        # values set with ``pyro.get_param_store()[name] = ...`` are seen.
        with guide._pyro_context:
            marginals = (
                _auto_normal(guide) if isinstance(guide, AutoNormal) else _auto_continuous(guide)
            )
    else:
        raise TypeError(
            f"posterior_of does not know how to read q from a {type(guide).__name__}: it supports "
            "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal and guides with a posterior_distributions() method. "
            "For other guides estimate with samples from the guide's traces."
        )
    if site is not None:
        if site not in marginals:
            raise KeyError(f"site {site!r} is not a latent site of the guide; it has {list(marginals)}")
        return marginals[site]
    if len(marginals) == 1:
        return next(iter(marginals.values()))
    return marginals


def _constrain(base, support):
    transform = biject_to(support)
    inner = transform
    while isinstance(inner, IndependentTransform):
        inner = inner.base_transform
    if isinstance(inner, ComposeTransform) and not inner.parts:
        return base
    return TransformedDistribution(base, transform)


def _auto_normal(guide):
    marginals = {}
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        loc, scale = guide._get_loc_and_scale(name)
        base = Normal(loc.detach(), scale.detach())
        if guide._event_dims[name]:
            base = Independent(base, guide._event_dims[name])
        marginals[name] = _constrain(base, site["fn"].support)
    return marginals


def _auto_continuous(guide):
    if not isinstance(
        guide, (AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal)
    ):
        raise TypeError(f"posterior_of does not support {type(guide).__name__}")
    with torch.no_grad():
        joint = guide.get_posterior()
    loc = joint.mean.detach()
    diagonal = isinstance(guide, AutoDiagonalNormal)
    scale = joint.stddev.detach() if diagonal else None
    covariance = None if diagonal else joint.covariance_matrix.detach()
    marginals, pos = {}, 0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        shape = guide._unconstrained_shapes[name]
        size = math.prod(shape)
        block = slice(pos, pos + size)
        if diagonal:
            base = Independent(Normal(loc[block], scale[block]), 1)
        else:
            base = MultivariateNormal(loc[block], covariance_matrix=covariance[block, block])
        if tuple(shape) == ():
            base = Normal(loc[block][0], base.stddev[0])
        elif tuple(shape) != (size,):
            base = TransformedDistribution(base, ReshapeTransform((size,), shape))
        marginals[name] = _constrain(base, site["fn"].support)
        pos += size
    return marginals
