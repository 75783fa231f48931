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

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDelta,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.mcmc.util import initialize_model

from pyro_elbo.engine.traces import quietly
from pyro_elbo.init.counting import CountingPotential, add_gradients, paused

__all__ = [
    "LaplaceResult",
    "LaplaceUnavailable",
    "flat_potential",
    "laplace_init",
    "low_rank_factors",
    "positive_definite",
]

#: the curvature a non-positive direction gets: unit variance in the unconstrained space
_EIG_FLOOR = 1.0
#: the mode counts as found when the Newton decrement g^T H^-1 g is below this
_DECREMENT_TOL = 1e-8


#: the autoguides :func:`set_guide` knows how to set from the Laplace approximation
SUPPORTED_GUIDES = (
    AutoNormal,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
    AutoLaplaceApproximation,
    AutoDelta,
)


class LaplaceUnavailable(ValueError):
    """The model has no Laplace stage: it subsamples data, or its potential is not finite
    anywhere it was tried.  ``fit`` should skip the stage and say why."""


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
    path = _lbfgs(potential, u0, max_iterations, tolerance, newton_every)
    u_star = path[-1]
    if u_star.numel() > max_hessian_dim:
        return _mode_only(guide, path, sites, transforms, potential, max_hessian_dim)
    hess = _hessian(potential, u_star)
    precision, fallback = positive_definite(hess)
    converged = False
    if fallback is None:
        u_star, hess, decrement = _newton_polish(potential, u_star, hess)
        precision, fallback = positive_definite(hess)
        path[-1] = u_star
        converged = fallback is None and decrement <= _DECREMENT_TOL
    selected, step, elbo = "mode", len(path) - 1, None
    if (not converged or fallback is not None) and path_candidates > 0 and len(path) > 1:
        pick = _best_on_path(potential, path, hess, precision, path_candidates, path_draws, seed)
        if pick is not None and pick[0] != len(path) - 1:
            step, hess, precision, fallback, elbo = pick
            u_star, selected = path[step], "path"
        elif pick is not None:
            elbo = pick[4]
    scale_tril = covariance_cholesky(precision)
    covariance = scale_tril @ scale_tril.T
    slices = _slices(sites)
    with torch.no_grad():
        log_joint = -float(potential(u_star))
        mode = {
            name: transforms[name].inv(u_star[slices[name]].reshape(shape))
            for name, shape in sites
        }
    to_constrained = {name: transforms[name].inv for name, _ in sites}
    result = LaplaceResult(
        sites=tuple(sites),
        loc=u_star.detach(),
        hessian=hess,
        precision=precision,
        covariance=covariance,
        scale_tril=scale_tril,
        mode=mode,
        log_joint=log_joint,
        converged=converged,
        num_iterations=len(path) - 1,
        positive_definite=fallback is None,
        fallback=fallback,
        selected=selected,
        selected_step=step,
        elbo=elbo,
        slices=slices,
        potential=potential,
        transforms=to_constrained,
    )
    result.guide_initialized, result.message = set_guide(guide, result, diagonal=diagonal)
    result.num_evaluations, result.num_density_evaluations = potential.counts()
    return result


def covariance_cholesky(precision: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of ``precision^-1`` without forming the inverse: with ``J``
    the order reversal and ``J P J = M M^T``, ``chol(P^-1) = J M^-T J`` (lower triangular,
    positive diagonal).  Forming ``P^-1`` and factoring it again fails at condition numbers
    near 1e13 in float64."""
    flip = precision.flip(0, 1)
    m = torch.linalg.cholesky(flip)
    eye = torch.eye(len(flip), dtype=flip.dtype, device=flip.device)
    m_inv_t = torch.linalg.solve_triangular(m, eye, upper=False).T
    return m_inv_t.flip(0, 1)


def _mode_only(guide, path, sites, transforms, potential, max_dim):
    slices = _slices(sites)
    u_star = path[-1]
    with torch.no_grad():
        log_joint = -float(potential(u_star))
    result = LaplaceResult(
        sites=tuple(sites), loc=u_star.detach(), hessian=None, precision=None, covariance=None,
        scale_tril=None,
        mode={n: transforms[n].inv(u_star[slices[n]].reshape(sh)) for n, sh in sites},
        log_joint=log_joint, converged=False, num_iterations=len(path) - 1,
        positive_definite=False, slices=slices, potential=potential,
        transforms={n: transforms[n].inv for n, _ in sites},
    )
    done, message = set_guide(guide, result, locations_only=True)
    result.guide_initialized = done
    result.num_evaluations, result.num_density_evaluations = potential.counts()
    result.message = (
        f"{u_star.numel()} dimensions > max_hessian_dim={max_dim}: no Hessian; " + message
    )
    return result


# ------------------------------------------------------------------------------ the potential


def _slices(sites):
    slices, pos = {}, 0
    for name, shape in sites:
        size = math.prod(shape)
        slices[name] = slice(pos, pos + size)
        pos += size
    return slices


def _guide_order(guide, args, kwargs):
    """Site names in the guide's packing order, or ``None`` for a guide without one."""
    if isinstance(guide, (AutoNormal, AutoContinuous, AutoDelta)):
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    return None


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _default_dtype(dtype):
    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def flat_potential(model, *args, guide=None, init_loc_fn=None, dtype=None, **kwargs):
    """``(U, sites, transforms, u0)``: the potential ``U(u)`` over one flat unconstrained vector,
    the packing order ``((site, shape), ...)`` (the guide's when it is an autoguide), the
    ``{site: constrained -> unconstrained}`` transforms and a start point.

    With ``dtype`` (e.g. float64) the model runs with its floating-point arguments cast to it
    and with it as torch's default dtype (so constants such as ``HalfCauchy(5.0)`` are built in
    it: torch's half distributions cast the value to their parameters' dtype); if the model
    fails that way, its own dtype is kept, with a warning.
    """
    order = _guide_order(guide, args, kwargs)
    if dtype is not None:
        try:
            return _flat_potential(model, _cast(args, dtype), _cast(kwargs, dtype), order,
                                   init_loc_fn, dtype)
        except LaplaceUnavailable:
            raise
        except Exception as e:  # the model does not run in this dtype: keep its own
            warnings.warn(
                f"laplace_init: the model does not run with {dtype} latents ({e}); the "
                "Laplace stage runs in the model's own dtype.",
                stacklevel=3,
            )
    return _flat_potential(model, args, kwargs, order, init_loc_fn, None)


def _flat_potential(model, args, kwargs, order, init_loc_fn, dtype):
    init = init_loc_fn or init_to_finite_mean
    try:
        with quietly(grad=True, fork=False), _default_dtype(dtype):
            init_params, potential_fn, transforms, trace = initialize_model(
                model, model_args=args, model_kwargs=kwargs, init_strategy=init
            )
    except NotImplementedError as e:
        raise LaplaceUnavailable(
            f"laplace_init needs the full-data log joint and the model subsamples ({e}); run "
            "the Laplace stage on the model without subsample_size, or skip it."
        ) from e
    except ValueError as e:
        raise LaplaceUnavailable(
            f"laplace_init found no start point with a finite log joint ({e}); pass "
            "init_loc_fn= with a valid start."
        ) from e
    if not init_params:
        raise LaplaceUnavailable("laplace_init: the model has no continuous latent sites")
    names = [n for n in trace.nodes if n in init_params]  # model order
    if order is not None:
        missing = [n for n in order if n not in init_params]
        if missing:
            raise LaplaceUnavailable(
                f"laplace_init: guide sites {missing} are not continuous latent sites of the "
                "model (discrete or hidden sites cannot be initialized)"
            )
        names = order + [n for n in names if n not in order]
    sites = [(n, tuple(init_params[n].shape)) for n in names]
    slices = _slices(sites)

    def potential(u):
        params = {n: u[slices[n]].reshape(shape) for n, shape in sites}
        with _default_dtype(dtype):
            return potential_fn(params)

    u0 = torch.cat([init_params[n].detach().reshape(-1) for n in names])
    if dtype is not None:
        u0 = u0.to(dtype)
        with torch.no_grad():
            value = potential(u0)
        if value.dtype != dtype or not torch.isfinite(value):
            raise RuntimeError(f"the potential is {value.dtype} / not finite at the start")
    return potential, sites, transforms, u0


def init_to_finite_mean(site=None):
    """The prior mean where it is finite and in the support (deterministic), else the point
    ``biject_to(support)(0)`` (``init_to_feasible``).  Pyro's ``init_to_mean`` returns the
    infinite mean of a HalfCauchy."""
    if site is None:
        return init_to_finite_mean
    try:
        value = site["fn"].mean.detach()
        if torch.isfinite(value).all() and bool(site["fn"].support.check(value).all()):
            return value
    except (RuntimeError, ValueError, NotImplementedError):
        pass
    return init_to_feasible(site)


# ----------------------------------------------------------------------------------- L-BFGS


def _lbfgs(potential, u0, max_iterations, tolerance, newton_every=10):
    """Run L-BFGS one iteration per ``step`` call (the history persists in the optimizer's
    state) so that every iterate is kept for the path pick.  Every ``newton_every`` iterations
    (0: never) a damped Newton step with the exact Hessian is tried: L-BFGS alone crawls when
    the condition number is 1e12 or more, Newton does not care.  Stops when ``U`` has changed
    by less than ``tolerance * max(1, |U|)`` in three successive iterations, or when the
    Newton decrement is below the convergence threshold; returns the iterates (the start
    included)."""
    u = u0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=1,
        max_eval=25,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    # where the model cannot be evaluated (overflow, a validation error) the line search sees
    # a huge finite value with zero slope, so it backs off; an infinity or a NaN would poison
    # its cubic interpolation
    wall = torch.finfo(u.dtype).max ** 0.25

    def closure():
        opt.zero_grad()
        try:
            value = potential(u)
        except (ValueError, RuntimeError):
            value = None
        if value is None or not torch.isfinite(value):
            u.grad = torch.zeros_like(u)
            return torch.tensor(wall, dtype=u.dtype)
        value.backward()
        if not torch.isfinite(u.grad).all():
            u.grad.zero_()
            return torch.tensor(wall, dtype=u.dtype)
        return value

    path = [u.detach().clone()]
    previous = float(closure().detach())
    if previous >= wall:
        raise LaplaceUnavailable("laplace_init: the log joint is not finite at the start point")
    still = 0
    for _ in range(max_iterations):
        opt.step(closure)
        current = u.detach().clone()
        try:
            with torch.no_grad():
                value = float(potential(current))
        except (ValueError, RuntimeError):
            break
        if not math.isfinite(value) or not torch.isfinite(current).all():
            break
        path.append(current)
        still = still + 1 if abs(previous - value) <= tolerance * max(1.0, abs(value)) else 0
        if still >= 3:
            break
        previous = value
        if newton_every and len(path) % newton_every == 0:
            jump, decrement = _damped_newton(potential, current, value)
            if jump is not None:
                with torch.no_grad():
                    u.copy_(jump[0])
                opt.state.clear()  # the curvature pairs straddle the jump: start afresh
                path.append(jump[0])
                previous = jump[1]
            if decrement is not None and decrement <= _DECREMENT_TOL:
                break
    return path


def _damped_newton(potential, u, value):
    """``((u', U(u')), decrement)`` for the first of ``u - t H^-1 g``, t = 1, 1/2, ..., 1/8,
    that lowers ``U``; ``(None, decrement)`` when none does or H is not positive definite."""
    try:
        hess = _hessian(potential, u)
        chol = torch.linalg.cholesky(hess)
    except (LaplaceUnavailable, RuntimeError):
        return None, None
    g = _grad(potential, u)
    delta = torch.cholesky_solve(g[:, None], chol)[:, 0]
    decrement = float(g @ delta)
    for t in (1.0, 0.5, 0.25, 0.125):
        candidate = u - t * delta
        try:
            with torch.no_grad():
                new = float(potential(candidate))
        except (ValueError, RuntimeError):
            continue
        if math.isfinite(new) and new < value:
            return (candidate, new), decrement
    return None, decrement


def _newton_polish(potential, u, hess, steps=3):
    """Up to ``steps`` Newton steps ``u <- u - H^-1 grad U(u)``, each kept only if it lowers
    ``U``; returns ``(u, hess, newton decrement^2 at u)``.  The decrement ``g^T H^-1 g`` is
    affine invariant: it equals ``2 (U(u) - U(u*))`` on a quadratic, whatever the scaling."""
    decrement = float("inf")
    for _ in range(steps + 1):
        g = _grad(potential, u)
        try:
            chol = torch.linalg.cholesky(hess)
        except RuntimeError:
            return u, hess, float("nan")
        delta = torch.cholesky_solve(g[:, None], chol)[:, 0]
        decrement = float(g @ delta)
        if decrement <= 1e-20 or _ == steps:
            break
        candidate = u - delta
        with torch.no_grad():
            if not float(potential(candidate)) <= float(potential(u)):
                break
        u = candidate
        hess = _hessian(potential, u)
    return u, hess, decrement


def _grad(potential, u):
    u = u.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(potential(u), u)
    return g.detach()


def _hessian(potential, u):
    add_gradients(potential, u.numel())  # D Hessian-vector products
    with paused(potential):
        try:  # one batched double-backward (vmap) when the model's ops allow it
            hess = torch.autograd.functional.hessian(potential, u.detach(), vectorize=True)
        except Exception:  # a D-pass loop otherwise
            hess = torch.autograd.functional.hessian(potential, u.detach())
    hess = 0.5 * (hess + hess.T)
    if not torch.isfinite(hess).all():
        raise LaplaceUnavailable("laplace_init: the Hessian of the log joint is not finite")
    return hess.detach()


def positive_definite(hess: torch.Tensor, rtol: float | None = None, floor: float = _EIG_FLOOR):
    """``(precision, fallback)``: ``hess`` itself when its Cholesky exists and every eigenvalue
    exceeds ``rtol`` times the largest (default: the dtype's eps, about the eigensolver's
    rounding error relative to the largest eigenvalue), else the eigenvalue repair of the module docstring
    (``lam_i <= rtol * max|lam|`` becomes ``max(|lam_i|, floor)``) and a line saying what
    changed."""
    if rtol is None:
        rtol = torch.finfo(hess.dtype).eps
    lam, vecs = torch.linalg.eigh(hess)
    top = float(lam.abs().max())
    bad = lam <= rtol * top
    if not bool(bad.any()):
        try:
            torch.linalg.cholesky(hess)
            return hess, None
        except RuntimeError:  # pragma: no cover - eigh and cholesky disagree at the edge
            pass
    fixed = torch.where(bad, lam.abs().clamp(min=floor), lam)
    precision = (vecs * fixed) @ vecs.T
    precision = 0.5 * (precision + precision.T)
    jitter = rtol * float(fixed.max())
    while True:  # rebuilding from eigenpairs can lose definiteness at the last digits
        try:
            torch.linalg.cholesky(precision)
            break
        except RuntimeError:
            precision = precision + jitter * torch.eye(len(lam), dtype=lam.dtype)
            jitter *= 10
    negatives = int((lam < 0).sum())
    note = (
        f"Hessian not positive definite ({negatives} negative, "
        f"{int(bad.sum()) - negatives} near-zero of {lam.numel()} eigenvalues, smallest "
        f"{float(lam.min()):.3g}, largest {float(lam.max()):.3g}); those eigenvalues were "
        f"replaced by max(|lambda|, {floor:g})"
    )
    return precision, note


# ------------------------------------------------------------------------ Pathfinder-style pick


def _best_on_path(potential, path, last_hess, last_precision, candidates, draws, seed):
    """``(step, hess, precision, fallback, elbo)`` of the path point whose Laplace Gaussian has
    the highest ELBO estimate, among ``candidates`` points spread over the path (the last one
    always included); ``None`` when no estimate is finite."""
    n = len(path)
    # geometric spacing: a path that runs off (a funnel) is best early, and most of the
    # iterates sit late
    ratio = (n - 1) ** (1 / max(candidates - 1, 1))
    steps = sorted({0, n - 1} | {min(n - 1, round(ratio**i)) for i in range(candidates)})
    gen = torch.Generator().manual_seed(seed)
    dim = path[0].numel()
    eps = torch.randn(draws, dim, generator=gen, dtype=path[0].dtype)
    best = None
    for step in steps:
        if step == n - 1:
            hess, precision = last_hess, last_precision
            fallback = None if precision is hess else "repaired"
        else:
            try:
                hess = _hessian(potential, path[step])
            except LaplaceUnavailable:
                continue
            precision, fallback = positive_definite(hess)
        elbo = _elbo(potential, path[step], precision, eps)
        if math.isfinite(elbo) and (best is None or elbo > best[4]):
            best = (step, hess, precision, fallback, elbo)
    if best is not None and best[3] == "repaired":
        best = (best[0], best[1], best[2], positive_definite(best[1])[1], best[4])
    return best


def _elbo(potential, loc, precision, eps):
    """``E_q[-U(u)] + H[q]`` for ``q = N(loc, precision^-1)``, with the given standard draws."""
    try:
        chol_prec = torch.linalg.cholesky(precision)
    except RuntimeError:
        return float("-inf")
    # u = loc + L^-T eps has covariance (L L^T)^-1
    z = torch.linalg.solve_triangular(chol_prec.T, eps.T, upper=True).T + loc
    dim = loc.numel()
    entropy = 0.5 * dim * (1 + math.log(2 * math.pi)) - float(chol_prec.diagonal().log().sum())
    try:
        with torch.no_grad():
            values = torch.stack([potential(zi) for zi in z])
    except (ValueError, RuntimeError):
        return float("-inf")
    if not torch.isfinite(values).all():
        return float("-inf")
    return -float(values.mean()) + entropy


# -------------------------------------------------------------------------- setting the guide


def low_rank_factors(covariance: torch.Tensor, rank: int, iterations: int = 200):
    """``(scale, cov_factor)`` with ``Sigma_q = diag(s) (F F^T + I) diag(s)`` (Pyro's
    ``AutoLowRankMultivariateNormal`` parameterization) minimizing ``KL(q || N(0, covariance))``:
    the direction the ELBO minimizes, so the guide starts at its own optimum for the Laplace
    Gaussian.  Worked in correlation units (the KL is invariant to a common diagonal rescaling):
    ``C = D^-1 Sigma D^-1``, ``P = C^-1``, and with ``S = diag(s')``::

        2 KL = tr(S P S) + tr(F^T S P S F) - 2 sum log s' - log|I + F^T F| + log|P| - dim

    minimized by L-BFGS over ``(log s', F)``, started from maximum-likelihood factor analysis
    of ``C`` (Joreskog 1967), which is exact when ``Sigma`` has that structure.  Then
    ``s = sd * s'``."""
    sd = covariance.diagonal().sqrt()
    corr = covariance / sd[:, None] / sd[None, :]
    dim = corr.shape[0]
    rank = min(rank, dim)
    precision = torch.linalg.inv(corr)
    precision = 0.5 * (precision + precision.T)
    # factor-analysis start: C ~ Lambda Lambda^T + Psi
    floor = 1e-6
    psi = precision.diagonal().reciprocal().clamp(floor, 1.0)
    for _ in range(iterations):
        root = psi.rsqrt()
        lam, vecs = torch.linalg.eigh(root[:, None] * corr * root[None, :])
        lam, vecs = lam[-rank:], vecs[:, -rank:]
        loadings = psi.sqrt()[:, None] * vecs * (lam - 1).clamp(min=0).sqrt()
        new_psi = (1 - loadings.pow(2).sum(-1)).clamp(floor, 1.0)
        done = float((new_psi - psi).abs().max()) < 1e-12
        psi = new_psi
        if done:
            break
    log_s = (0.5 * psi.log()).contiguous().requires_grad_(True)
    factor = (loadings * psi.rsqrt()[:, None]).contiguous().requires_grad_(True)
    eye = torch.eye(rank, dtype=corr.dtype)

    def two_kl():
        s = log_s.exp()
        sps = s[:, None] * precision * s[None, :]
        return (
            sps.trace()
            + (factor * (sps @ factor)).sum()
            - 2 * log_s.sum()
            - torch.logdet(eye + factor.T @ factor)
        )

    opt = torch.optim.LBFGS(
        [log_s, factor], max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = two_kl()
        value.backward()
        return value

    opt.step(closure)
    return (sd * log_s.detach().exp()), factor.detach()


def _set_pyro_param(module, name, value):
    """Set PyroParam ``name`` (dotted) of ``module`` to the constrained ``value``, through the
    param store when the module is registered there."""
    *parents, leaf = name.split(".")
    for part in parents:
        module = getattr(module, part)
    current = getattr(module, leaf)  # inside the Pyro context this syncs with the param store
    setattr(module, leaf, value.detach().to(dtype=current.dtype, device=current.device))


def _set_parameter(param, value):
    with torch.no_grad():
        param.data = value.detach().to(dtype=param.dtype, device=param.device).clone()


def set_guide(guide, result: LaplaceResult, *, diagonal: str = "conditional",
              locations_only: bool = False):
    """Write ``result`` into ``guide``; ``(initialized, message)``.  ``locations_only``: set the
    mode and leave the scales (no curvature)."""
    if guide is None:
        return False, "no guide given: the mode and Hessian are in the result"
    if not isinstance(guide, SUPPORTED_GUIDES):
        return False, (
            f"{type(guide).__name__} is not one of the autoguides laplace_init knows "
            "(AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal, AutoLaplaceApproximation, AutoDelta): the guide was "
            "left as it is; the mode and Hessian are in the result"
        )
    names = [n for n, _ in guide.prototype_trace.iter_stochastic_nodes()]
    cut = sum(math.prod(dict(result.sites)[n]) for n in names)
    loc = result.loc[:cut]
    if locations_only:
        with guide._pyro_context:
            if isinstance(guide, AutoNormal):
                for name in names:
                    shape = dict(result.sites)[name]
                    _set_pyro_param(guide.locs, name, loc[result.slices[name]].reshape(shape))
            elif isinstance(guide, AutoDelta):
                for name in names:
                    _set_pyro_param(guide, name, result.mode[name])
            else:
                _set_parameter(guide.loc, loc)
        return True, f"{type(guide).__name__}: loc = mode, scales unchanged"
    cov = result.covariance[:cut, :cut]
    # the mean-field precision is the guide block's own conditional precision only when the
    # guide covers every site; for a subset it is the marginal block's
    prec = result.precision if cut == result.loc.numel() else torch.linalg.inv(cov)
    if diagonal == "conditional":
        diag_sd = prec.diagonal()[:cut].rsqrt()
    else:
        diag_sd = cov.diagonal().sqrt()
    with guide._pyro_context:
        if isinstance(guide, AutoNormal):
            for name in names:
                shape = dict(result.sites)[name]
                block = result.slices[name]
                _set_pyro_param(guide.locs, name, loc[block].reshape(shape))
                _set_pyro_param(guide.scales, name, diag_sd[block].reshape(shape))
            what = f"loc = mode, scale = {diagonal} sd"
        elif isinstance(guide, AutoDelta):
            for name in names:
                _set_pyro_param(guide, name, result.mode[name])
            what = "value = mode"
        else:
            _set_parameter(guide.loc, loc)
            if isinstance(guide, AutoMultivariateNormal):
                # the leading block of chol(Sigma) is chol of Sigma's leading block
                tril = result.scale_tril[:cut, :cut]
                scale = tril.diagonal()
                _set_pyro_param(guide, "scale", scale)
                _set_pyro_param(guide, "scale_tril", tril / scale[:, None])
                what = "loc = mode, scale_tril = chol(H^-1)"
            elif isinstance(guide, AutoDiagonalNormal):
                _set_pyro_param(guide, "scale", diag_sd)
                what = f"loc = mode, scale = {diagonal} sd"
            elif isinstance(guide, AutoLowRankMultivariateNormal):
                scale, factor = low_rank_factors(cov, guide.rank)
                if factor.shape[1] < guide.cov_factor.shape[1]:  # rank > dim: zero columns
                    pad = guide.cov_factor.shape[1] - factor.shape[1]
                    factor = torch.cat([factor, factor.new_zeros(factor.shape[0], pad)], -1)
                _set_pyro_param(guide, "scale", scale)
                _set_parameter(guide.cov_factor, factor)
                what = f"loc = mode, rank-{guide.rank} KL-optimal fit to H^-1"
            else:  # AutoLaplaceApproximation: loc only
                what = "loc = mode"
    return True, f"{type(guide).__name__}: {what}"


