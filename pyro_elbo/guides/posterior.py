"""``posterior_of(guide)``: a fitted guide's q as torch Distributions in the model's space.

Supported guides:

* ``AutoNormal``: per site, ``Normal(loc, scale)`` pushed through ``biject_to(support)`` (so
  a Gamma latent gets a log-normal q, a Dirichlet latent a stick-breaking-normal q);
* ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``: the
  marginal of the site's block of the joint Gaussian over the unconstrained latent vector (exact:
  marginals of a Gaussian are Gaussian), reshaped and pushed through ``biject_to(support)``;
* any guide with a ``posterior_distributions()`` method returning ``{site: Distribution}``
  (pyro_elbo's own guides: :class:`~pyro_elbo.guides.AmortizedNormal` gives the per-datapoint
  q(z_i | x_i) for the data passed, :class:`~pyro_elbo.guides.ExactGuide` the oracle's posterior).

``joint=True`` asks for q over *all* latent sites at once instead of per-site marginals: for the
autoguides a :class:`JointPosterior` (the joint Gaussian over the unconstrained latent vector, each
block pushed through its site's ``biject_to(support)``; ``sample`` and ``log_prob`` work on dicts
keyed by site, the log density including every Jacobian), for a guide with a
``joint_posterior()`` method (``ExactGuide``) what that returns, and for a one-site guide that
site's Distribution.

Hand-written ``pyro.param`` guides have no structure to read: they raise ``TypeError``; use Monte
Carlo on their traces instead (as :func:`pyro_elbo.check` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    biject_to,
)
from torch.distributions.transforms import ComposeTransform, IndependentTransform, ReshapeTransform

from pyro_elbo.guides.unfitted import warn_unfitted

__all__ = ["JointPosterior", "posterior_of"]


def posterior_of(guide, *args, site: str | None = None, joint: bool = False, **kwargs):
    """q as a torch Distribution over the model's (constrained) latent values.

    :param guide: a fitted guide (see the module docstring for the supported types).
    :param args, kwargs: the model's arguments; only needed when an autoguide has not been run
        yet (to build its prototype trace).
    The distributions are a detached snapshot of the guide's current parameters.

    :param site: a latent site name.  With ``site=None``, a guide with one latent site returns
        that site's Distribution, and a guide with several returns ``{site: Distribution}`` of
        the per-site marginals.
    :param bool joint: return q over all latent sites jointly (see the module docstring).
    """
    if joint:
        if site is not None:
            raise ValueError("pass either site= (one marginal) or joint=True, not both")
        return _joint(guide, args, kwargs)
    if hasattr(guide, "posterior_distributions"):
        marginals = guide.posterior_distributions(*args, **kwargs)
    elif isinstance(guide, (AutoNormal, AutoContinuous)):
        _run_prototype(guide, args, kwargs)
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


def _run_prototype(guide, args, kwargs):
    """An autoguide never run builds its sites from one call with the model's arguments; it
    was never fitted either (a warning)."""
    if guide.prototype_trace is not None:
        return
    warn_unfitted(guide, "posterior_of", stacklevel=4)
    try:
        with torch.no_grad():
            guide(*args, **kwargs)
    except TypeError as error:
        if args or kwargs:
            raise
        raise TypeError(
            f"posterior_of: the guide {type(guide).__name__} has never been run, so its latent "
            "sites are not known yet and it must run the model, which needs its arguments: "
            "pass them as posterior_of(guide, *model_args, **model_kwargs), e.g. "
            f"posterior_of(guide, data). ({error})"
        ) from error


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


def _joint_gaussian(guide):
    """The Gaussian over the flat unconstrained vector of a Pyro ``AutoContinuous`` guide."""
    if not isinstance(
        guide, (AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal)
    ):
        raise TypeError(f"posterior_of does not support {type(guide).__name__}")
    with torch.no_grad():
        return guide.get_posterior()


def _auto_continuous(guide):
    joint = _joint_gaussian(guide)
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


# ---------------------------------------------------------------------------- joint


@dataclass
class _Block:
    name: str
    start: int
    shape: torch.Size  # the site's unconstrained shape
    transform: object  # biject_to(support): unconstrained -> constrained

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class JointPosterior:
    """q over several latent sites: a Gaussian ``base`` over the flat unconstrained vector, each
    site's block reshaped and pushed through ``biject_to(support)``.

    Like :class:`pyro_elbo.conjugate.NormalGammaPosterior` it works on dicts keyed by site:

    * ``sample(sample_shape)`` / ``rsample(sample_shape)`` -> ``{site: value}``;
    * ``log_prob(values)``: the joint log density of a dict of constrained values,
      ``log base(u) - sum_site log|d T_site(u_site) / d u_site|`` with ``u = T^{-1}(values)``;
    * ``marginal(site)``: that site's marginal (the same as ``posterior_of(guide, site=...)``);
    * ``latents``: the site names, in the guide's order.
    """

    def __init__(self, base, blocks, marginals):
        self.base = base
        self._dtype = getattr(base, "base_dist", base).mean.dtype  # a flow has no mean
        self._blocks = {b.name: b for b in blocks}
        self._marginals = marginals

    @property
    def latents(self) -> tuple:
        return tuple(self._blocks)

    def marginal(self, name):
        if name not in self._marginals:
            raise KeyError(f"site {name!r} is not a latent site of the guide; it has {self.latents}")
        return self._marginals[name]

    def sample(self, sample_shape=()) -> dict:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample(self, sample_shape=()) -> dict:
        flat = self.base.rsample(sample_shape)
        batch = flat.shape[:-1]
        return {
            b.name: b.transform(flat[..., b.start : b.start + b.size].reshape(batch + b.shape))
            for b in self._blocks.values()
        }

    def log_prob(self, values: dict) -> torch.Tensor:
        missing = [n for n in self._blocks if n not in values]
        if missing:
            raise KeyError(f"log_prob needs a value for every latent site; missing {missing}")
        parts, log_det = [], 0.0
        for b in self._blocks.values():
            value = torch.as_tensor(values[b.name], dtype=self._dtype)
            u = b.transform.inv(value)
            batch = u.shape[: u.dim() - len(b.shape)]
            ldj = b.transform.log_abs_det_jacobian(u, value)
            extra = ldj.dim() - len(batch)  # site dims the Jacobian term still carries
            if extra > 0:
                ldj = ldj.reshape(ldj.shape[: len(batch)] + (-1,)).sum(-1)
            log_det = log_det + ldj
            parts.append(u.reshape(batch + (b.size,)))
        batch = torch.broadcast_shapes(*(u.shape[:-1] for u in parts))
        flat = torch.cat([u.expand(batch + u.shape[-1:]) for u in parts], -1)
        return self.base.log_prob(flat) - log_det

    def __repr__(self) -> str:
        return f"JointPosterior(sites={list(self.latents)}, base={self.base!r})"


def _joint(guide, args, kwargs):
    if hasattr(guide, "joint_posterior"):  # first: a flow autoguide (AutoRealNVP) has one
        return guide.joint_posterior(*args, **kwargs)
    if isinstance(guide, (AutoNormal, AutoContinuous)):
        _run_prototype(guide, args, kwargs)
        with guide._pyro_context:
            if isinstance(guide, AutoNormal):
                marginals = _auto_normal(guide)
                base, blocks = _auto_normal_joint(guide)
            else:
                marginals = _auto_continuous(guide)
                base, blocks = _auto_continuous_joint(guide)
        return JointPosterior(base, blocks, marginals)
    if hasattr(guide, "posterior_distributions"):
        marginals = guide.posterior_distributions(*args, **kwargs)
        if len(marginals) == 1:
            return next(iter(marginals.values()))
        raise TypeError(
            f"posterior_of(..., joint=True): {type(guide).__name__} has several latent sites "
            f"({list(marginals)}) and no joint_posterior() method; use the per-site marginals "
            "(joint=False)"
        )
    raise TypeError(
        f"posterior_of does not know how to read q from a {type(guide).__name__}: it supports "
        "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal "
        "and guides with a posterior_distributions() method."
    )


def _auto_normal_joint(guide):
    locs, scales, blocks, pos = [], [], [], 0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        loc, scale = guide._get_loc_and_scale(name)
        block = _Block(name, pos, loc.shape, biject_to(site["fn"].support))
        locs.append(loc.detach().reshape(-1))
        scales.append(scale.detach().reshape(-1))
        blocks.append(block)
        pos += block.size
    base = Independent(Normal(torch.cat(locs), torch.cat(scales)), 1)
    return base, blocks


def _auto_continuous_joint(guide):
    base = _detached(_joint_gaussian(guide))
    blocks, pos = [], 0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        shape = torch.Size(guide._unconstrained_shapes[name])
        block = _Block(name, pos, shape, biject_to(site["fn"].support))
        blocks.append(block)
        pos += block.size
    return base, blocks


def _detached(base):
    """A copy of a Gaussian over a vector with its parameters detached."""
    if isinstance(base, Independent):
        return Independent(Normal(base.mean.detach(), base.stddev.detach()), 1)
    if isinstance(base, LowRankMultivariateNormal):
        return LowRankMultivariateNormal(
            base.loc.detach(), base.cov_factor.detach(), base.cov_diag.detach()
        )
    return MultivariateNormal(base.loc.detach(), scale_tril=base.scale_tril.detach())
