r"""Laplace initialization: find the posterior mode first, then read the guide's scale off the
curvature there.

Stochastic optimization from a default start (every unconstrained latent near 0, every scale 0.1)
is what fails on badly scaled posteriors: an intercept that has to travel 70 units at Adam's
lr 0.01 needs 7,000 steps, and a guide scale that must shrink from 0.1 to 1e-4 takes as long.
A deterministic stage removes both problems before any sampling happens.

1. **Mode.** With ``T = biject_to(support)`` per site and ``u`` the flat vector of unconstrained
   latents, minimize the potential::

       U(u) = -log p(x, T(u)) - log |det dT/du|

   by L-BFGS with a strong-Wolfe line search (Nocedal & Wright 2006, Alg. 7.5 and 3.5), in
   float64 by default.  ``U`` is Pyro's own HMC potential
   (:func:`pyro.infer.mcmc.util.initialize_model`): discrete sites are enumerated out.
2. **Curvature.** ``H = hess U(u*)`` (``torch.autograd.functional.hessian``).  The Laplace
   approximation (Tierney & Kadane 1986; MacKay 2003, ch. 27) is::

       p(u | x) ~ N(u*, H^-1)

   which is *exact* when the posterior of ``u`` is Gaussian (Bayesian linear regression with
   known noise): the guide needs no stochastic optimization at all there.
3. **Guide.** The guide is set to the Gaussian its family can hold that is closest to
   ``N(u*, H^-1)``:

   * ``AutoMultivariateNormal``: ``loc = u*``, ``L = chol(H^-1)``, written as Pyro stores it
     (``scale = diag L``, ``scale_tril = L / diag L`` row-wise, ``loc`` a plain ``nn.Parameter``);
   * ``AutoNormal``, ``AutoDiagonalNormal``: ``loc = u*`` and, by default
     (``diagonal="conditional"``), ``scale_i = 1 / sqrt(H_ii)``: the mean-field q minimizing
     KL(q || N(u*, H^-1)) has exactly these precisions (Bishop 2006, sec. 10.1.2), so the guide
     starts at its own ELBO optimum for the Laplace Gaussian.  ``diagonal="marginal"`` gives
     ``sqrt((H^-1)_ii)`` instead (wider; mean-field SVI then shrinks it back);
   * ``AutoLowRankMultivariateNormal``: Pyro's ``cov = diag(s) (F F^T + I) diag(s)`` chosen to
     minimize KL(q || N(u*, H^-1)) (:func:`low_rank_factors`; on the badly scaled regression of
     the stress suite this gives KL 1.0 at rank 2 of 5, where a maximum-likelihood
     factor-analysis fit, which minimizes the other direction, gave 3.0);
   * ``AutoDelta``, ``AutoLaplaceApproximation``: the mode;
   * any other guide is left untouched (``LaplaceResult.guide_initialized`` is False and
     ``message`` says why): use ``result.loc``, ``result.covariance`` or ``result.mode``.

**Non-positive-definite H** (a saddle, a flat direction, a mode on a boundary): with
``H = V diag(lam) V^T``, every eigenvalue ``lam_i <= eps * max|lam|`` is replaced by
``max(|lam_i|, floor)`` (``floor = 1``: unit variance in the unconstrained space, the width of a
standard prior) and the result says so in ``fallback``.  Directions with real curvature keep it.

**No mode** (a funnel: the centered hierarchical model's joint density grows without bound as the
group scale goes to 0; L-BFGS then runs down the funnel and does not converge).  Then the stage
does what Pathfinder does (Zhang, Carpenter, Gelman & Vehtari 2022): along the L-BFGS path it
takes the Laplace Gaussian at several iterates, estimates each one's ELBO with a few draws, and
keeps the best.  ``selected="path"`` and ``selected_step`` report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyro_elbo.init.counting import CountingPotential
from pyro_elbo.init.guide_writers import (
    SUPPORTED_GUIDES,
    low_rank_factors,
    set_guide,
    set_parameter,
    set_pyro_param,
)
from pyro_elbo.init.hessian import covariance_cholesky, positive_definite
from pyro_elbo.init.mode import DECREMENT_TOL, hessian, lbfgs_path, newton_polish
from pyro_elbo.init.path_pick import best_on_path
from pyro_elbo.init.potential import (
    LaplaceUnavailable,
    _slices,  # also imported from here by vi/target.py
    flat_potential,
    init_to_finite_mean,
)

#: the writers other modules import from here under their names before the split
_set_parameter, _set_pyro_param = set_parameter, set_pyro_param

__all__ = [
    "SUPPORTED_GUIDES",
    "LaplaceResult",
    "LaplaceUnavailable",
    "covariance_cholesky",
    "flat_potential",
    "init_to_finite_mean",
    "laplace_init",
    "low_rank_factors",
    "positive_definite",
    "set_guide",
]


@dataclass
class LaplaceResult:
    """What :func:`laplace_init` found, in the unconstrained space of the latents.

    The flat vector packs the sites in ``sites`` order (the guide's own order for an autoguide),
    each site's unconstrained value flattened row-major, so ``loc[result.slices[name]]`` is one
    site.

    :ivar sites: ``((name, unconstrained shape), ...)`` in packing order.
    :ivar loc: the mode u* (or the selected path point), flat.
    :ivar hessian: ``hess U(u*)`` as computed (symmetrized), before any fallback.
    :ivar precision: the positive definite precision actually used (``hessian`` when it is PD).
    :ivar covariance: ``precision^-1``.
    :ivar scale_tril: ``chol(covariance)``.
    :ivar mode: ``{site: constrained value}`` at ``loc``.
    :ivar log_joint: ``-U(loc)``: the log joint in the unconstrained space, Jacobian included.
    :ivar converged: a mode was found: positive definite Hessian and Newton decrement < 1e-8.
    :ivar num_iterations: L-BFGS iterations.
    :ivar positive_definite: ``hessian`` was positive definite.
    :ivar fallback: ``None``, or how a non-PD ``hessian`` was repaired.
    :ivar selected: ``"mode"`` or ``"path"`` (a Pathfinder-style pick, see the module docstring).
    :ivar selected_step: the L-BFGS iteration of ``loc``.
    :ivar elbo: the ELBO estimate of ``N(loc, covariance)`` when a path pick was made.
    :ivar guide_initialized: whether the guide's parameters were set.
    :ivar message: what was done to the guide, or why not.
    :ivar potential: ``U`` as a function of the flat vector (for MCMC or diagnostics).
    :ivar transforms: ``{site: unconstrained -> constrained}``.
    :ivar num_evaluations: log-joint gradient evaluations made (``D`` per Hessian), see
        :mod:`pyro_elbo.init.counting`.
    :ivar num_density_evaluations: log-joint evaluations without a gradient.
    """

    sites: tuple
    loc: torch.Tensor
    hessian: torch.Tensor
    precision: torch.Tensor
    covariance: torch.Tensor
    scale_tril: torch.Tensor
    mode: dict
    log_joint: float
    converged: bool
    num_iterations: int
    positive_definite: bool
    fallback: str | None = None
    selected: str = "mode"
    selected_step: int = 0
    elbo: float | None = None
    guide_initialized: bool = False
    message: str = ""
    slices: dict = field(default_factory=dict)
    potential: object = None
    transforms: dict = field(default_factory=dict)
    num_evaluations: int = 0
    num_density_evaluations: int = 0

    @property
    def marginal_sd(self) -> torch.Tensor:
        """``sqrt(diag(H^-1))``: the Laplace posterior sds of the unconstrained latents."""
        return self.covariance.diagonal().sqrt()

    @property
    def conditional_sd(self) -> torch.Tensor:
        """``1 / sqrt(diag(H))``: each latent's sd with the others held fixed."""
        return self.precision.diagonal().rsqrt()

    def site_loc(self, name: str) -> torch.Tensor:
        """Site ``name``'s block of ``loc``, in its unconstrained shape."""
        return self.loc[self.slices[name]].reshape(dict(self.sites)[name])


# ------------------------------------------------------------------------------- public entry


def laplace_init(
    model,
    guide=None,
    *args,
    init_loc_fn=None,
    max_iterations: int = 1000,
    tolerance: float = 1e-9,
    dtype: torch.dtype | None = torch.float64,
    diagonal: str = "conditional",
    path_candidates: int = 8,
    path_draws: int = 32,
    seed: int = 0,
    max_hessian_dim: int = 2000,
    **kwargs,
) -> LaplaceResult:
    """Find the posterior mode by L-BFGS, take the Hessian there, and set ``guide`` from it.

    :param model: the Pyro model.
    :param guide: an autoguide to initialize (see the module docstring for what each gets), any
        other guide (left untouched) or ``None``.
    :param args, kwargs: the model's arguments.
    :param init_loc_fn: where L-BFGS starts, as an autoguide init function (default
        :func:`init_to_finite_mean`: deterministic).
    :param int max_iterations: L-BFGS iterations at most.
    :param float tolerance: L-BFGS stops when ``U`` changes by less than
        ``tolerance * max(1, |U|)`` in three successive iterations; up to three Newton steps
        then polish the mode, and it counts as converged when the Newton decrement
        ``g^T H^-1 g`` (scale free) is below 1e-8.
    :param dtype: the precision of the whole stage (default float64: the potential is evaluated
        with float64 latents, so float32 data are used exactly).  ``None`` keeps the model's.
    :param str diagonal: ``"conditional"`` (default) or ``"marginal"`` sds for mean-field guides.
    :param int path_candidates: path points scored when L-BFGS finds no mode (0: never).
    :param int path_draws: draws per ELBO estimate of a path point.
    :param int seed: seed of those draws (the stage is deterministic given it).
    :param int max_hessian_dim: above this many unconstrained dimensions the Hessian (one
        backward pass per dimension) is skipped: the guide gets the mode as its location and
        keeps its scales, and the result's curvature fields are ``None``.
    :raises LaplaceUnavailable: the model subsamples, or its potential is nowhere finite.
    """
    if diagonal not in ("conditional", "marginal"):
        raise ValueError(f"diagonal must be 'conditional' or 'marginal', got {diagonal!r}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    potential, sites, transforms, u0 = flat_potential(
        model, *args, guide=guide, init_loc_fn=init_loc_fn, dtype=dtype, **kwargs
    )
    potential = CountingPotential(potential)
    newton_every = 10 if u0.numel() <= max_hessian_dim else 0
    path = lbfgs_path(potential, u0, max_iterations, tolerance, newton_every)
    u_star = path[-1]
    if u_star.numel() > max_hessian_dim:
        return _mode_only(guide, path, sites, transforms, potential, max_hessian_dim)
    hess = hessian(potential, u_star)
    precision, fallback = positive_definite(hess)
    converged = False
    if fallback is None:
        u_star, hess, decrement = newton_polish(potential, u_star, hess)
        precision, fallback = positive_definite(hess)
        path[-1] = u_star
        converged = fallback is None and decrement <= DECREMENT_TOL
    selected, step, elbo = "mode", len(path) - 1, None
    if (not converged or fallback is not None) and path_candidates > 0 and len(path) > 1:
        pick = best_on_path(potential, path, hess, precision, path_candidates, path_draws, seed)
        if pick is not None and pick[0] != len(path) - 1:
            step, hess, precision, fallback, elbo = pick
            u_star, selected = path[step], "path"
        elif pick is not None:
            elbo = pick[4]
    scale_tril = covariance_cholesky(precision)
    result = _result(
        u_star, path, sites, transforms, potential,
        hessian=hess, precision=precision, covariance=scale_tril @ scale_tril.T,
        scale_tril=scale_tril, converged=converged, positive_definite=fallback is None,
        fallback=fallback, selected=selected, selected_step=step, elbo=elbo,
    )
    result.guide_initialized, result.message = set_guide(guide, result, diagonal=diagonal)
    result.num_evaluations, result.num_density_evaluations = potential.counts()
    return result


def _result(u_star, path, sites, transforms, potential, **curvature) -> LaplaceResult:
    """The result at ``u_star``: its constrained values, log joint and packing, read off the
    potential; ``curvature``: the Hessian fields and how the point was chosen."""
    slices = _slices(sites)
    with torch.no_grad():
        log_joint = -float(potential(u_star))
        mode = {n: transforms[n].inv(u_star[slices[n]].reshape(sh)) for n, sh in sites}
    return LaplaceResult(
        sites=tuple(sites), loc=u_star.detach(), mode=mode, log_joint=log_joint,
        num_iterations=len(path) - 1, slices=slices, potential=potential,
        transforms={n: transforms[n].inv for n, _ in sites}, **curvature,
    )


def _mode_only(guide, path, sites, transforms, potential, max_dim):
    u_star = path[-1]
    result = _result(
        u_star, path, sites, transforms, potential, hessian=None, precision=None,
        covariance=None, scale_tril=None, converged=False, positive_definite=False,
    )
    done, message = set_guide(guide, result, locations_only=True)
    result.guide_initialized = done
    result.num_evaluations, result.num_density_evaluations = potential.counts()
    result.message = (
        f"{u_star.numel()} dimensions > max_hessian_dim={max_dim}: no Hessian; " + message
    )
    return result
