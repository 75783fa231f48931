"""What Batch-and-Match and Pathfinder share: the model's unconstrained log joint as a function
of one flat vector, with its evaluations counted, and the Gaussian written back into a guide.

The target is Pyro's own HMC potential (:func:`pyro.infer.mcmc.util.initialize_model`, through
:func:`pyro_elbo.init.laplace.flat_potential`)::

    log p(u) = log p(x, T(u)) + log |det dT/du|,    T = biject_to(support) per site,

packed in the guide's site order (so ``loc[slices[site]]`` is the guide's block for that site),
in float64 by default.  Every evaluation goes through a
:class:`~pyro_elbo.init.counting.CountingPotential`: ``num_gradients`` is what
``FitResult.num_evaluations`` reports.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_elbo.init.counting import CountingPotential
from pyro_elbo.init.laplace import (
    LaplaceResult,
    LaplaceUnavailable,
    _slices,
    covariance_cholesky,
    flat_potential,
    set_guide,
)

__all__ = ["GAUSSIAN_GUIDES", "Target", "check_guide", "write_gaussian"]

#: the guides BaM and Pathfinder write their Gaussian into
GAUSSIAN_GUIDES = (
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
    AutoDiagonalNormal,
    AutoNormal,
)


def _discrete_sites(model, args, kwargs):
    from pyro_elbo.init.defaults import _latent_info, _prototype

    return _latent_info(_prototype(model, args, kwargs))[2]


def check_guide(method: str, guide):
    """Refuse a guide ``method`` cannot write its Gaussian into."""
    if not isinstance(guide, GAUSSIAN_GUIDES):
        raise ValueError(
            f"fit(method={method!r}): cannot write a Gaussian into a {type(guide).__name__}; "
            "pass AutoMultivariateNormal (full covariance), AutoLowRankMultivariateNormal, "
            "AutoDiagonalNormal or AutoNormal, guide=None (the recommended one), or "
            "method='svi' for any other guide."
        )


class Target:
    """The unconstrained log joint of ``model(*args, **kwargs)`` over one flat vector.

    :ivar sites: ``((site, unconstrained shape), ...)`` in packing order.
    :ivar slices: ``{site: slice}`` into the flat vector.
    :ivar transforms: ``{site: unconstrained -> constrained}``.
    :ivar u0: a start point (the prior's finite mean, see ``init_to_finite_mean``).
    :ivar potential: the counting potential ``U = -log p``.
    """

    def __init__(self, model, args=(), kwargs=None, *, guide=None, method="bam",
                 dtype=torch.float64, init_loc_fn=None):
        kwargs = kwargs or {}
        discrete = _discrete_sites(model, args, kwargs)
        if discrete:
            raise ValueError(
                f"{method}: the model has discrete latent sites {discrete}; a Gaussian over the "
                "unconstrained space cannot hold them. Marginalize them in the model (e.g. "
                "MixtureSameFamily), or use method='svi' with TraceEnum_ELBO."
            )
        try:
            potential, sites, transforms, u0 = flat_potential(
                model, *args, guide=guide, init_loc_fn=init_loc_fn, dtype=dtype, **kwargs
            )
        except LaplaceUnavailable as error:
            raise ValueError(f"{method}: {str(error).replace('laplace_init', 'the model')}") \
                from error
        self.potential = CountingPotential(potential)
        self.sites = tuple(sites)
        self.slices = _slices(sites)
        self.transforms = {name: transforms[name].inv for name, _ in sites}
        self.u0 = u0.detach()
        self.dim = u0.numel()
        self.dtype = u0.dtype

    @property
    def num_evaluations(self) -> int:
        """Log-joint gradient evaluations so far."""
        return self.potential.num_gradients

    @property
    def num_density_evaluations(self) -> int:
        """Log-joint evaluations without a gradient so far."""
        return self.potential.num_densities

    def log_density_and_grad(self, u: torch.Tensor):
        """``(log p(u), grad log p(u))`` for one point; ``(-inf, nan...)`` where the model
        cannot be evaluated or the result is not finite."""
        u = u.detach().clone().requires_grad_(True)
        try:
            value = -self.potential(u)
            (grad,) = torch.autograd.grad(value, u)
        except (ValueError, RuntimeError):
            return float("-inf"), torch.full_like(u, float("nan")).detach()
        value = float(value.detach())
        if not math.isfinite(value) or not bool(torch.isfinite(grad).all()):
            return float("-inf"), torch.full_like(u, float("nan")).detach()
        return value, grad.detach()

    def batch_log_density_and_grad(self, draws: torch.Tensor):
        """``(values (B,), grads (B, D))`` for ``B`` points, one model run each."""
        pairs = [self.log_density_and_grad(u) for u in draws]
        values = torch.tensor([v for v, _ in pairs], dtype=draws.dtype)
        return values, torch.stack([g for _, g in pairs])

    def log_density(self, draws: torch.Tensor) -> torch.Tensor:
        """``log p`` of ``B`` points (values only, no gradient; ``-inf`` where not finite)."""
        out = torch.empty(len(draws), dtype=draws.dtype)
        with torch.no_grad():
            for i, u in enumerate(draws):
                try:
                    value = -float(self.potential(u))
                except (ValueError, RuntimeError):
                    value = float("-inf")
                out[i] = value if math.isfinite(value) else float("-inf")
        return out

    def constrained(self, draws: torch.Tensor) -> dict:
        """``{site: (B,) + constrained shape}`` of ``B`` flat unconstrained draws."""
        out = {}
        with torch.no_grad():
            for name, shape in self.sites:
                block = draws[:, self.slices[name]].reshape((len(draws),) + tuple(shape))
                out[name] = self.transforms[name](block)
        return out


def write_gaussian(guide, target: Target, loc: torch.Tensor, scale_tril=None, *, variance=None):
    """Write ``N(loc, scale_tril scale_tril^T)`` (or ``N(loc, diag(variance))``) into an
    autoguide, through :func:`pyro_elbo.init.laplace.set_guide` (so every family gets what the
    Laplace stage gives it: full rank the Cholesky factor, mean field ``1 / sqrt(P_ii)``, the
    KL-closest member of its family; low rank the KL-closest rank-r factors).  Returns the
    message of ``set_guide``."""
    if variance is not None:
        covariance = torch.diag_embed(variance)
        precision = torch.diag_embed(variance.reciprocal())
        scale_tril = torch.diag_embed(variance.sqrt())
    else:
        covariance = scale_tril @ scale_tril.T
        eye = torch.eye(len(loc), dtype=loc.dtype)
        tril_inv = torch.linalg.solve_triangular(scale_tril, eye, upper=False)
        precision = tril_inv.T @ tril_inv
        precision = 0.5 * (precision + precision.T)
    with torch.no_grad():
        mode = {
            name: target.transforms[name](loc[target.slices[name]].reshape(shape))
            for name, shape in target.sites
        }
    result = LaplaceResult(
        sites=target.sites, loc=loc.detach(), hessian=precision, precision=precision,
        covariance=covariance, scale_tril=scale_tril, mode=mode, log_joint=float("nan"),
        converged=True, num_iterations=0, positive_definite=True, slices=target.slices,
        transforms=target.transforms,
    )
    with poutine.block():
        done, message = set_guide(guide, result, diagonal="conditional")
    if not done:
        raise ValueError(message)
    return message


def gaussian_cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """``chol(covariance)`` with the inverse-free fallback of the Laplace stage."""
    covariance = 0.5 * (covariance + covariance.T)
    try:
        return torch.linalg.cholesky(covariance)
    except RuntimeError:
        return covariance_cholesky(torch.linalg.inv(covariance))
