"""``fit(model, guide, *args, method="bam" | "pathfinder")``: the two score-based methods behind
``fit``'s interface.  Both run on the unconstrained log joint (:mod:`pyro_elbo.vi.target`),
write their Gaussian into the guide and return a :class:`~pyro_elbo.fit.FitResult` whose
``losses`` are ``-ELBO`` estimates per iteration and whose ``num_evaluations`` counts log-joint
gradient evaluations.

* ``"bam"`` (:mod:`pyro_elbo.vi.bam`): from the Laplace stage's Gaussian (``init="laplace"``;
  ``"pathfinder"``: one Pathfinder path's; ``"prior"``: ``N(u_0, init_scale^2 I)``, the
  paper's start, ``u_0`` the prior's finite mean, unconstrained; see :func:`_bam_start`), batches of ``batch_size`` draws; full covariance for
  ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal`` (the latter gets the
  KL-closest rank-r Gaussian at the end), diagonal for ``AutoNormal``/``AutoDiagonalNormal``.
  Stops when ``KL(q_{t+1} || q_t) / (lambda_t / (1 + lambda_t))^2 < tol`` for ``patience``
  iterations in a row: the step's size divided by the size of the learning rate's pull, so an
  estimate of the distance to the batch's own fixed point that a decaying ``lambda_t`` does
  not shrink (the raw step size did: on a badly scaled regression it fell below 1e-3 while q
  was thousands of nats from the posterior).  On a non-Gaussian posterior this normalized step
  has a noise floor (B draws' score-matching noise) that can sit above ``tol``: after
  ``max_iterations`` (300; 9,600 evaluations at B = 32) the run ends unconverged and the guide
  holds the average of the last half of the iterates (Polyak & Juditsky 1992).
* ``"pathfinder"`` (:mod:`pyro_elbo.vi.multipath`): the chosen Gaussian of
  :func:`~pyro_elbo.vi.multipath.pathfinder`; ``diagnostics`` holds k-hat and the paths.

``"bam"`` shares ``fit``'s NaN guard (a batch without 2 finite draws raises
:class:`~pyro_elbo.fit.NonFiniteError`), progress bar and checkpoints (``checkpoint=``,
``checkpoint_every=``, ``resume=``: the state, the draws' generator, the counts and the average,
written atomically; a resumed run continues bit for bit).  ``"pathfinder"`` has the same: a
progress bar over the L-BFGS iterations of all paths; a checkpoint after every path (the
finished paths, the generator, the counts; ``fit``'s atomic write and lock), which a resumed
run skips to the same answer bit for bit; a path with a non-finite log joint or gradient is
dropped (its reason in ``diagnostics["paths"]``), and ``NonFiniteError`` when all are.

``method_options`` passes each method's settings (e.g. ``{"batch_size": 16}``,
``{"num_paths": 8}``).
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from pyro_elbo.fit.initial import LaplaceStage
from pyro_elbo.vi import bam
from pyro_elbo.vi.target import Target, check_guide, write_gaussian

__all__ = ["METHODS", "dispatch", "fit_method"]

METHODS = ("auto", "svi", "bam", "pathfinder")

#: BaM iterations ``method="auto"`` gives the fixed-point test before it falls back to "svi"
AUTO_BAM_ITERATIONS = 30

BAM_DEFAULTS = {"batch_size": 32, "tol": 1e-3, "patience": 3, "lr": None, "init": "laplace",
                "max_iterations": 300,
                "init_scale": 1.0}
PATHFINDER_DEFAULTS = {"num_paths": 4, "num_draws": 1000, "draws_per_path": None,
                       "max_iterations": 1000, "history_size": 6, "num_elbo_draws": 5}

#: fit arguments that only the stochastic-gradient loop uses, with their defaults
_SVI_ONLY = {"loss": None, "optim": None, "checkpoint": None, "compile": "auto", "data": None,
             "init": "auto", "callbacks": ()}


def _options(method, given, defaults):
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"fit(method={method!r}): unknown method_options {unknown}; known: "
            f"{sorted(defaults)}"
        )
    return {**defaults, **given}


def dispatch(method, model, guide, args, kwargs, settings):
    """``fit``'s hook: check ``method`` and run it (``settings``: fit's ``locals()``)."""
    if method not in METHODS:
        raise ValueError(
            f"fit: method must be one of {METHODS} ('svi': stochastic-gradient VI, any guide; "
            f"'bam': Batch-and-Match; 'pathfinder': multi-path Pathfinder; 'auto': BaM first "
            f"when guide=None, else 'svi'), got {method!r}"
        )
    if method == "auto":
        return _auto(model, guide, args, kwargs, settings)
    return fit_method(method, model, guide, args, kwargs, settings=settings,
                      method_options=settings.get("method_options"))


def _svi(model, guide, args, kwargs, settings):
    import inspect

    from pyro_elbo.fit.loop import fit

    skip = {"model", "guide", "args", "kwargs", "method", "method_options"}
    names = [n for n in inspect.signature(fit).parameters if n not in skip]
    options = {n: settings[n] for n in names if n in settings}
    return fit(model, guide, *args, method="svi", **options, **kwargs)


def _auto(model, guide, args, kwargs, settings):
    """``method="auto"`` (fit's default): ``fit(model, None, *args)`` with no setting of the
    stochastic-gradient loop runs BaM for up to ``AUTO_BAM_ITERATIONS`` iterations; when its
    fixed-point test passes (near-Gaussian posteriors: 12-22x fewer evaluations than "svi" on
    the stress suite at the same accuracy) that is the answer, otherwise (a funnel, a mixture:
    BaM's score-matching answer was less accurate there) "svi" runs, from its own Laplace
    stage, and the evaluations of both count.  Anything else is "svi", and so is a recommended
    guide other than ``AutoMultivariateNormal`` (more than 200 dimensions, where a full
    covariance update costs O(D^3), or latents in a subsampled plate)."""
    plain = all(
        settings.get(name, default) is default or settings.get(name, default) == default
        for name, default in _SVI_ONLY.items()
    )
    plain = plain and settings.get("num_steps") is None and settings.get("method_options") is None
    if guide is not None or not plain or settings.get("convergence", "auto") != "auto":
        return _svi(model, guide, args, kwargs, settings)
    from pyro_elbo.init.defaults import recommended_guide

    try:
        guide = recommended_guide(model, *args, **kwargs)
        Target(model, args, kwargs, guide=guide, method="bam")  # applicable?
    except ValueError:
        return _svi(model, None, args, kwargs, settings)
    if not isinstance(guide, AutoMultivariateNormal):  # D > 200 or subsampled: O(D^3) steps
        return _svi(model, guide, args, kwargs, settings)
    first = fit_method("bam", model, guide, args, kwargs,
                       settings={**settings, "max_steps": AUTO_BAM_ITERATIONS})
    if first.converged:
        first.reason = f"method='auto' chose BaM: {first.reason}"
        return first
    second = _svi(model, guide, args, kwargs, settings)
    second.num_evaluations += first.num_evaluations
    second.reason = (f"method='auto': BaM did not reach its fixed point in "
                     f"{AUTO_BAM_ITERATIONS} iterations ({first.num_evaluations} evaluations, "
                     f"counted here), so svi ran: {second.reason}")
    second.diagnostics = {**second.diagnostics, "bam": first.diagnostics,
                          "bam_evaluations": first.num_evaluations}
    return second


def fit_method(method, model, guide, args, kwargs, *, settings, method_options=None):
    """Run ``method`` for :func:`pyro_elbo.fit.fit` (``settings``: fit's other arguments)."""
    from pyro_elbo.fit.loop import FitResult, _show_progress

    started = time.perf_counter()
    for name, default in _SVI_ONLY.items():
        if name == "checkpoint":
            continue  # BaM checkpoints its state, Pathfinder its finished paths (below)
        value = settings.get(name, default)
        if value is not default and value != default:
            raise ValueError(
                f"fit(method={method!r}) does not take {name}= (it belongs to the "
                f"stochastic-gradient loop, method='svi'); remove it or use method='svi'."
            )
    seed = settings.get("seed")
    if seed is not None:
        pyro.set_rng_seed(seed)
    if guide is None:
        from pyro_elbo.init.defaults import recommended_guide

        guide = recommended_guide(model, *args, **kwargs)
    check_guide(method, guide)
    show = _show_progress(settings.get("progress", "auto"))
    generator = torch.Generator().manual_seed(
        int(seed) if seed is not None else int(torch.randint(2**62, (1,)))
    )
    if method == "pathfinder":
        from pyro_elbo.vi.multipath import _converged, _reason, _run

        options = _options(method, method_options, PATHFINDER_DEFAULTS)
        (approx, elbos), _, khat, paths, target = _run(
            model, guide, args, kwargs, seed, options, stacklevel=5,
            checkpoint=settings.get("checkpoint"), resume=settings.get("resume", True),
            progress=show)
        return FitResult(
            losses=np.asarray([-e for e in elbos], dtype=np.float64),
            num_steps=len(elbos), converged=_converged(paths, khat),
            reason=_reason(paths, khat), seconds=time.perf_counter() - started,
            diagnostics={"khat": khat, "paths": paths,
                         "num_density_evaluations": target.num_density_evaluations},
            guide=guide, num_evaluations=target.num_evaluations,
        )
    path = settings.get("checkpoint")
    lock = None
    if path is not None:  # fit's path check and lock, held for the whole run
        from pyro_elbo.fit.location import claim

        lock = claim(os.fspath(path))
    try:
        return _fit_bam(model, guide, args, kwargs, settings, method_options, started, show,
                        generator)
    finally:
        if lock is not None:
            lock.release()


def _fit_bam(model, guide, args, kwargs, settings, method_options, started, show, generator):
    """Batch-and-Match for :func:`fit_method` (its checkpoint path already claimed)."""
    from pyro_elbo.fit.loop import FitResult, NonFiniteError, _progress_bar

    method = "bam"
    options = _options(method, method_options, BAM_DEFAULTS)
    with poutine.block(), torch.no_grad():
        guide(*args, **kwargs)
    target = Target(model, args, kwargs, guide=guide, method="bam")
    diagonal = isinstance(guide, (AutoNormal, AutoDiagonalNormal))
    path = settings.get("checkpoint")
    path = None if path is None else os.fspath(path)
    every = int(settings.get("checkpoint_every", 500))
    saved = None
    if path is not None and settings.get("resume", True) and os.path.exists(path):
        saved = _load_bam(path, target.dim, diagonal)
        state = bam.BaMState(saved["mu"], saved["cov"], int(saved["iteration"]), diagonal)
        generator.set_state(saved["generator"])
        target.potential.num_gradients, target.potential.num_densities = saved["counts"]
        start_note, stage = saved["init"], LaplaceStage(False, None, saved["init"])
    else:
        state, start_note, stage = _bam_start(target, options, diagonal, generator,
                                              laplace=(model, guide, args, kwargs))
    num_steps = settings.get("num_steps")
    convergence = settings.get("convergence", "auto")
    if num_steps is not None:
        limit = int(num_steps)
    else:
        limit = min(int(settings.get("max_steps", 10_000)), int(options["max_iterations"]))
    losses, infos, residuals, still = [], [], [], 0
    average = _Average(limit // 2) if num_steps is None else None
    if saved is not None:
        losses, residuals, still = list(saved["losses"]), list(saved["residuals"]), saved["still"]
        infos = [bam.BaMInfo(*row) for row in saved["infos"]]
        if average is not None and saved["average"] is not None:
            average.count, average.mu, average.cov = saved["average"]

    def save():
        _save_bam(path, state, generator, target, start_note, losses, residuals, still, infos,
                  average)
    converged, stop = False, None
    bar = _progress_bar(show, limit, 0)
    try:
        while state.iteration < limit:
            z, eps = bam.sample(state, options["batch_size"], generator)
            log_p, scores = target.batch_log_density_and_grad(z)
            new, info = bam.step(state, z, eps, log_p, scores, options["lr"])
            losses.append(-info.elbo)
            infos.append(info)
            if new is None:
                raise NonFiniteError(
                    f"fit(method='bam'): non-finite values at iteration {state.iteration + 1}: "
                    f"{info.num_finite} of {len(z)} draws had a finite log joint and score"
                    + ("" if info.num_finite < 2 else ", and the update was not finite")
                    + ". The Gaussian is left at the last finite iterate. What to try: a "
                    "smaller init_scale or batch_size in method_options, a model whose log "
                    "joint is finite on the whole unconstrained space, or method='pathfinder'.",
                    step=state.iteration + 1, losses=losses,
                )
            state = new
            if average is not None:
                average.add(state)
            if bar is not None and state.iteration % 10 == 0:
                bar.update(state.iteration - bar.n)
                bar.set_postfix_str(f"elbo {info.elbo:.5g} | KL step {info.kl_step:.2g}")
            # the step's KL over (lambda / (1 + lambda))^2: the distance to the batch's own
            # fixed point, not shrunk by the decaying learning rate
            residual = info.kl_step / (info.lr / (1 + info.lr)) ** 2
            residuals.append(residual)
            still = still + 1 if residual < options["tol"] else 0
            if num_steps is None and convergence and still >= options["patience"]:
                converged = True
                break
            if path is not None and state.iteration % every == 0:
                save()
    except KeyboardInterrupt:
        stop = f"interrupted (KeyboardInterrupt) after {state.iteration} iterations"
        warnings.warn(f"fit: {stop}; returning the state reached", stacklevel=3)
    except NonFiniteError:
        _write_bam(guide, target, state)
        raise
    finally:
        if bar is not None:
            bar.update(state.iteration - bar.n)
            bar.close()
    if path is not None:
        save()  # the last iterate, before averaging: a longer resumed run continues exactly
    averaged = None
    if not converged and stop is None and average is not None and average.count:
        averaged = average.count
        state = average.state(state)
    _write_bam(guide, target, state)
    if converged:
        reason = (f"converged: KL(q_t+1 || q_t) / (lambda / (1 + lambda))^2 < "
                  f"tol={options['tol']:g} for {options['patience']} iterations in a row "
                  f"(iteration {state.iteration})")
    elif stop is not None:
        reason = stop
    elif num_steps is not None:
        reason = f"ran num_steps={num_steps} iterations (a fixed number; convergence not checked)"
    else:
        floor = float(np.median(residuals[-50:])) if residuals else float("nan")
        reason = (f"{limit} iterations (max_steps / method_options['max_iterations']) without "
                  f"reaching the fixed point: the normalized KL step stays near {floor:.3g} >= "
                  f"tol={options['tol']:g} (the noise of {options['batch_size']} draws on a "
                  f"non-Gaussian posterior); the guide holds the average of the last "
                  f"{averaged} iterates")
    diagnostics = {
        "kl_step": [i.kl_step for i in infos],
        "residual": residuals,
        "init": start_note,
        "fisher": [i.fisher for i in infos],
        "fisher_se": [i.fisher_se for i in infos],
        "lr": [i.lr for i in infos],
        "num_density_evaluations": target.num_density_evaluations,
    }
    return FitResult(
        losses=np.asarray(losses, dtype=np.float64), num_steps=state.iteration,
        converged=converged, reason=reason, seconds=time.perf_counter() - started,
        diagnostics=diagnostics, guide=guide, num_evaluations=target.num_evaluations,
        init=stage,
    )


_FORMAT = "pyro_elbo.bam/1"


def _save_bam(path, state, generator, target, note, losses, residuals, still, infos, average):
    from pyro_elbo.fit import checkpoint as ckpt

    ckpt.save_atomic({
        "format": _FORMAT, "mu": state.mu, "cov": state.cov, "iteration": state.iteration,
        "diagonal": state.diagonal, "generator": generator.get_state(),
        "counts": [target.potential.num_gradients, target.potential.num_densities],
        "init": note, "losses": list(losses), "residuals": list(residuals), "still": still,
        "infos": [list(i) for i in infos],
        "average": None if average is None or not average.count
        else [average.count, average.mu, average.cov],
    }, path)


def _load_bam(path, dim, diagonal):
    from pyro_elbo.fit import checkpoint as ckpt

    saved = ckpt.load(path, format=_FORMAT)
    if saved["mu"].numel() != dim or bool(saved["diagonal"]) != diagonal:
        raise ckpt.CheckpointMismatchError(
            f"the checkpoint {path!r} holds a BaM state of {saved['mu'].numel()} dimensions "
            f"({'diagonal' if saved['diagonal'] else 'full'} covariance), but this model and "
            f"guide have {dim} ({'diagonal' if diagonal else 'full'}); pass resume=False to "
            "start over, or another checkpoint path."
        )
    return saved


class _Average:
    """Polyak-Ruppert average of BaM's iterates ``(mu, Sigma)`` after iteration ``start``: the
    answer when the fixed-point test does not pass (the iterates keep the noise of B draws)."""

    def __init__(self, start):
        self.start, self.count, self.mu, self.cov = start, 0, None, None

    def add(self, state):
        if state.iteration <= self.start:
            return
        if self.count == 0:
            self.mu, self.cov = state.mu.clone(), state.cov.clone()
        else:
            self.mu += state.mu
            self.cov += state.cov
        self.count += 1

    def state(self, last):
        return bam.BaMState(self.mu / self.count, self.cov / self.count, last.iteration,
                            last.diagonal)


def _bam_start(target, options, diagonal, generator, laplace=None):
    """``(state, note)``: BaM's first Gaussian, its evaluations counted on ``target``.

    * ``init="laplace"`` (default): the Laplace stage's Gaussian (:func:`laplace_init` with
      ``laplace=(model, guide, args, kwargs)``: L-BFGS with Newton steps, so condition numbers
      of 1e13 cost a few dozen evaluations, plus D per Hessian), falling back to ``"pathfinder"``
      where it does not apply;
    * ``"pathfinder"``: the chosen Gaussian of one Pathfinder path from ``u_0`` (no Hessian, but
      L-BFGS alone crawls on badly scaled posteriors: 2,900 evaluations on the stress suite's
      intercept regression);
    * ``"prior"``: ``N(u_0, init_scale^2 I)``, the paper's start, which on badly scaled
      posteriors leaves BaM's proximal mean term pulling by thousands of posterior sds."""
    init = options["init"]
    if init == "laplace":
        from pyro_elbo.init.laplace import LaplaceUnavailable, laplace_init

        try:
            if laplace is None:
                raise LaplaceUnavailable("no model given")
            model, guide, args, kwargs = laplace
            with torch.random.fork_rng(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = laplace_init(model, guide, *args, **kwargs)
            target.potential.num_gradients += result.num_evaluations
            target.potential.num_densities += result.num_density_evaluations
            if result.covariance is None or len(result.loc) != target.dim:
                raise LaplaceUnavailable("no curvature")
            cov = result.covariance.to(target.dtype)
            if diagonal:
                cov = result.precision.diagonal().reciprocal().to(target.dtype)
            how = "mode" if result.selected == "mode" else f"path point {result.selected_step}"
            return bam.init(result.loc.to(target.dtype), cov, diagonal), f"Laplace ({how})", \
                LaplaceStage(True, result, f"Laplace: {result.num_iterations} L-BFGS "
                             f"iterations, {how}; BaM starts from its Gaussian")
        except (LaplaceUnavailable, RuntimeError, ValueError):
            init = "pathfinder"
    if init == "pathfinder":
        from pyro_elbo.vi.path import single_path

        try:
            path = single_path(target, target.u0, generator=generator)
            cov = path.best.covariance()
            torch.linalg.cholesky(cov)
            mu = path.best.mu
            if diagonal:
                cov = torch.linalg.inv(cov).diagonal().reciprocal()
            note = (f"Pathfinder path: {path.num_iterations} L-BFGS iterations, q_"
                    f"{path.best_iteration}")
            return bam.init(mu, cov, diagonal), note, LaplaceStage(False, None, note)
        except (ValueError, RuntimeError) as error:
            note = f"Pathfinder start failed ({error}); N(u_0, init_scale^2 I)"
    elif init == "prior":
        note = "N(u_0, init_scale^2 I)"
    else:
        raise ValueError(f"fit(method='bam'): method_options['init'] must be 'laplace', "
                         f"'pathfinder' or 'prior', got {init!r}")
    scale2 = torch.full((target.dim,), float(options["init_scale"]) ** 2, dtype=target.dtype)
    state = bam.init(target.u0, scale2 if diagonal else torch.diag_embed(scale2), diagonal)
    return state, note, LaplaceStage(False, None, note)


def _write_bam(guide, target, state):
    if state.diagonal:
        write_gaussian(guide, target, state.mu, variance=state.cov)
    else:
        write_gaussian(guide, target, state.mu, torch.linalg.cholesky(state.cov))

