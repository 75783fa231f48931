"""Where ``fit(method="bam")`` starts: the first Gaussian, its evaluations counted on the target.

``method_options["init"]``:

* ``"auto"`` (default): ``"laplace"`` up to ``D = batch_size`` dimensions (its Hessian then
  costs about one batch, and its Newton steps and path pick cope with condition numbers of 1e13
  and with posteriors without a mode, e.g. the centered eight schools, where L-BFGS alone runs
  to its cap down the funnel), ``"pathfinder"`` above (where the Laplace stage's two dense
  Hessians, ``2 D`` evaluations, would cost more than the whole rest of the run on a Gaussian).
* ``"pathfinder"``: the chosen Gaussian of one Pathfinder path from ``u_0``
  (:func:`pyro_elbo.vi.path.single_path`: L-BFGS to the mode, its inverse-Hessian factors),
  L-BFGS capped at ``start_iterations``.  Cheap (34 gradient evaluations at D = 100, 46 at
  D = 200 on the benchmark regressions), but its covariance holds only the last 6 L-BFGS pairs
  (KL 2 to 100 there): BaM's first iteration, the score match of ``D + 1`` draws
  (:func:`pyro_elbo.vi.bam._score_match`), supplies the rest.  On a badly scaled posterior
  (condition number 1e13) L-BFGS crawls; the cap stops it and BaM continues from the path's
  best Gaussian.
* ``"laplace"``: the Laplace stage's Gaussian (:func:`pyro_elbo.init.laplace.laplace_init`:
  L-BFGS with Newton steps, then the dense Hessian, D evaluations each): exact on a Gaussian
  posterior before BaM draws anything (BaM's score-match test then passes on its first draws),
  at ``2 D + 27`` evaluations on the benchmark regressions; falls back to ``"pathfinder"``
  where it does not apply.
* ``"prior"``: ``N(u_0, init_scale^2 I)``, the paper's start.

``u_0`` is the prior's finite mean, unconstrained (``init_to_finite_mean``).  Side runs (the
Laplace stage) go through :func:`pyro_elbo.engine.traces.quietly`.
"""

from __future__ import annotations

import warnings

import torch

from pyro_elbo.fit.initial import LaplaceStage
from pyro_elbo.vi import bam

__all__ = ["INITS", "bam_start"]

INITS = ("auto", "pathfinder", "laplace", "prior")


def bam_start(target, options, diagonal, generator, laplace=None):
    """``(state, note, stage)``: BaM's first Gaussian (module docstring); ``laplace`` is
    ``(model, guide, args, kwargs)`` for ``init="laplace"``."""
    init = options["init"]
    if init not in INITS:
        raise ValueError(f"fit(method='bam'): method_options['init'] must be one of {INITS}, "
                         f"got {init!r}")
    if init == "auto":
        init = "laplace" if target.dim <= int(options["batch_size"]) else "pathfinder"
    if init == "laplace":
        found = _laplace(target, diagonal, laplace)
        if found is not None:
            return found
        init = "pathfinder"
    if init == "pathfinder":
        from pyro_elbo.vi.path import single_path

        try:
            path = single_path(target, target.u0, generator=generator,
                               max_iterations=int(options["start_iterations"]))
            cov = path.best.covariance()
            torch.linalg.cholesky(cov)
            if diagonal:
                cov = torch.linalg.inv(cov).diagonal().reciprocal()
            note = (f"Pathfinder path: {path.num_iterations} L-BFGS iterations "
                    f"({path.reason}), q_{path.best_iteration}")
            return bam.init(path.best.mu, cov, diagonal), note, LaplaceStage(False, None, note)
        except (ValueError, RuntimeError) as error:
            note = f"Pathfinder start failed ({error}); N(u_0, init_scale^2 I)"
    else:
        note = "N(u_0, init_scale^2 I)"
    scale2 = torch.full((target.dim,), float(options["init_scale"]) ** 2, dtype=target.dtype)
    state = bam.init(target.u0, scale2 if diagonal else torch.diag_embed(scale2), diagonal)
    return state, note, LaplaceStage(False, None, note)


def _laplace(target, diagonal, laplace):
    """The Laplace stage's Gaussian as a start, or ``None`` where it does not apply."""
    from pyro_elbo.engine.traces import quietly
    from pyro_elbo.init.laplace import LaplaceUnavailable, laplace_init

    if laplace is None:
        return None
    model, guide, args, kwargs = laplace
    try:
        # laplace_init takes its own gradients: grad=True, fork the random stream
        with quietly(grad=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = laplace_init(model, guide, *args, **kwargs)
    except (LaplaceUnavailable, RuntimeError, ValueError):
        return None
    target.potential.num_gradients += result.num_evaluations
    target.potential.num_densities += result.num_density_evaluations
    if result.covariance is None or len(result.loc) != target.dim:
        return None
    cov = result.covariance.to(target.dtype)
    if diagonal:
        cov = result.precision.diagonal().reciprocal().to(target.dtype)
    how = "mode" if result.selected == "mode" else f"path point {result.selected_step}"
    stage = LaplaceStage(True, result, f"Laplace: {result.num_iterations} L-BFGS iterations, "
                         f"{how}; BaM starts from its Gaussian")
    return bam.init(result.loc.to(target.dtype), cov, diagonal), f"Laplace ({how})", stage


def lowrank_start(target, options, generator, rank):
    """``(state, note, stage)``: a :class:`~pyro_elbo.vi.lowrank.LowRankState` of rank ``rank``
    from one Pathfinder path's factors (``init`` "auto" or "pathfinder": ``O(D J r)``, no
    ``D x D`` matrix) or ``N(u_0, init_scale^2 I)`` ("prior", or when the path fails)."""
    from pyro_elbo.vi import lowrank
    from pyro_elbo.vi.path import single_path

    init = options["init"]
    if init == "laplace":
        raise ValueError("fit(method='bam'): the low-rank updates (method_options['low_rank']) "
                         "start from init='pathfinder' or 'prior'; init='laplace' needs the dense "
                         "Hessian. Pass low_rank=False for the dense updates.")
    if init not in INITS:
        raise ValueError(f"fit(method='bam'): method_options['init'] must be one of {INITS}, "
                         f"got {init!r}")
    note = "N(u_0, init_scale^2 I)"
    if init in ("auto", "pathfinder"):
        try:
            path = single_path(target, target.u0, generator=generator,
                               max_iterations=int(options["start_iterations"]))
            best = path.best
            state = lowrank.from_factors(best.mu, best.alpha, best.beta, best.gamma, rank)
            note = (f"Pathfinder path: {path.num_iterations} L-BFGS iterations "
                    f"({path.reason}), q_{path.best_iteration}, patched to rank {rank}")
            return state, note, LaplaceStage(False, None, note)
        except (ValueError, RuntimeError) as error:
            note = f"Pathfinder start failed ({error}); N(u_0, init_scale^2 I)"
    psi = torch.full((target.dim,), float(options["init_scale"]) ** 2, dtype=target.dtype)
    state = lowrank.LowRankState(target.u0.clone(), psi,
                                 target.u0.new_zeros(target.dim, rank), 0)
    return state, note, LaplaceStage(False, None, note)
