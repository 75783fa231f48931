r"""``fit(model, guide, *args, method="bam")``: the Batch-and-Match loop (:mod:`pyro_elbo.vi.bam`
for the update) with its start (:mod:`pyro_elbo.vi.start`), two stopping tests, the NaN guard,
progress bar and checkpoints of ``fit``.

**Iterations.**  Iteration ``t`` draws ``z_b = mu_t + L_t u_b`` from ``q_t`` and evaluates their
scores.  The first iteration of a full-covariance run is BaM's ``lambda -> inf`` limit, the score
match of ``max(D + 1, batch_size)`` draws (``Sigma' Gamma Sigma' = C``; exact on a Gaussian
target from any start, and ``D + 1`` is the fewest draws that determine a D-dimensional Gaussian;
``method_options={"exact_first": False}`` keeps the schedule); later ones use ``batch_size``
draws and ``lambda_t = B D / t``.  A diagonal run uses the schedule throughout, and so does
an ``AutoLowRankMultivariateNormal`` above 200 dimensions (``method_options["low_rank"]``:
``"auto"``; ``True`` at any size), whose iterations are :mod:`pyro_elbo.vi.lowrank`'s
``O(D (r + B)^2)`` match-and-patch from one Pathfinder path's factors, no ``D x D`` matrix
anywhere (below 200 dimensions it gets the dense updates and the KL-closest rank-r member at
the end).

**Stopping, honest about noise.**

1. *Score match* (checked first, on every iteration's first ``check_size`` draws, which then
   stay in the batch): the per-draw covariance-weighted Fisher divergence
   ``f_b = |u_b + L_t^T grad log p(z_b)|^2``; stop with ``q_t`` when
   ``mean(f) + 2 SE(f) < fisher_tol``.  Each ``f_b`` is 0 exactly when ``q_t`` is the (Gaussian)
   posterior, and on a Gaussian target ``F < 1`` bounds ``KL(q || p) <= F / (2 (1 - sqrt F))``
   (eigenvalues ``rho`` of ``Sigma P``: ``F = sum (1 - rho)^2 + delta^T P Sigma P delta``), so
   ``fisher_tol = 1e-3`` certifies ``KL < 5.2e-4`` up to the 2-SE noise of ``check_size`` draws.
   A non-Gaussian posterior keeps ``F`` above the tolerance (no Gaussian matches its scores)
   and the run goes on to test 2.
2. *Fixed point*: ``KL(q_{t+1} || q_t) / (lambda_t / (1 + lambda_t))^2 < tol`` for ``patience``
   iterations in a row: the step's size divided by the learning rate's pull, an estimate of the
   distance to the batch's own fixed point that a decaying ``lambda_t`` does not shrink.  On a
   non-Gaussian posterior it has a noise floor (B draws' score-matching noise) that can sit
   above ``tol``: after ``max_iterations`` the run ends unconverged and the guide holds the
   average of the last half of the iterates (Polyak & Juditsky 1992).

Non-finite draws are dropped; an iteration with fewer than 2 finite draws raises
:class:`~pyro_elbo.fit.NonFiniteError` (the first iteration's score match falls back to the
schedule when fewer than ``D + 1`` are finite).  ``checkpoint=`` writes the state, the draws'
generator, the counts and the average atomically every ``checkpoint_every`` iterations and at the
end; a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal

from pyro_elbo.fit.initial import LaplaceStage
from pyro_elbo.vi import bam, lowrank
from pyro_elbo.vi.start import bam_start, lowrank_start
from pyro_elbo.vi.target import Target, write_gaussian

__all__ = ["BAM_DEFAULTS", "fit_bam"]

BAM_DEFAULTS = {"batch_size": 32, "tol": 1e-3, "patience": 3, "lr": None, "init": "auto",
                "max_iterations": 300, "init_scale": 1.0, "exact_first": True,
                "check_size": 8, "fisher_tol": 1e-3, "start_iterations": 200,
                "callback": None, "low_rank": "auto"}

_FORMAT = "pyro_elbo.bam/2"


def fit_bam(model, guide, args, kwargs, settings, options, started, show, generator):
    """Batch-and-Match for :func:`pyro_elbo.vi.methods.fit_method` (``options`` complete, the
    checkpoint path already claimed); returns a :class:`~pyro_elbo.fit.FitResult`."""
    from pyro_elbo.engine.traces import quietly
    from pyro_elbo.fit.loop import FitResult, NonFiniteError, _progress_bar

    with quietly(fork=False):
        guide(*args, **kwargs)  # its parameters and prototype exist before they are written
    target = Target(model, args, kwargs, guide=guide, method="bam")
    diagonal = isinstance(guide, (AutoNormal, AutoDiagonalNormal))
    low = isinstance(guide, AutoLowRankMultivariateNormal) and _low_rank(options, target.dim)
    kind = "lowrank" if low else "diagonal" if diagonal else "full"
    path = settings.get("checkpoint")
    path = None if path is None else os.fspath(path)
    every = int(settings.get("checkpoint_every", 500))
    saved = None
    if path is not None and settings.get("resume", True) and os.path.exists(path):
        saved = _load(path, target.dim, kind)
        state = (lowrank.LowRankState if low else bam.BaMState)(*saved["state"])
        generator.set_state(saved["generator"])
        target.potential.num_gradients, target.potential.num_densities = saved["counts"]
        start_note, stage = saved["init"], LaplaceStage(False, None, saved["init"])
        start_count = saved["start_evaluations"]
    elif low:
        state, start_note, stage = lowrank_start(target, options, generator,
                                                 guide.cov_factor.shape[1])
        start_count = target.num_evaluations
    else:
        state, start_note, stage = bam_start(target, options, diagonal, generator,
                                             laplace=(model, guide, args, kwargs))
        start_count = target.num_evaluations
    num_steps = settings.get("num_steps")
    checking = num_steps is None and settings.get("convergence", "auto")
    if num_steps is not None:
        limit = int(num_steps)
    else:
        limit = min(int(settings.get("max_steps", 10_000)), int(options["max_iterations"]))
    run = _Run(limit, num_steps is None and not low, start_count)
    family = lowrank if low else bam
    if saved is not None:
        run.restore(saved)
    converged, stop = None, None
    bar = _progress_bar(show, limit, 0)
    try:
        while state.iteration < limit:
            if options["callback"] is not None:
                options["callback"](state, target.num_evaluations)
            first = state.iteration == 0 and options["exact_first"] and kind == "full"
            size = max(target.dim + 1, options["batch_size"]) if first else options["batch_size"]
            z, eps = family.sample(state, size, generator)
            check = min(int(options["check_size"]), size)
            log_p, scores = target.batch_log_density_and_grad(z[:check])
            if checking:
                passed, fisher, se = _score_match_test(state, z[:check], eps[:check], log_p,
                                                       scores, options["fisher_tol"])
                run.fisher_checks.append((fisher, se))
                if passed:
                    converged = ("score match", fisher, se)
                    break
            if check < size:
                rest_p, rest_g = target.batch_log_density_and_grad(z[check:])
                log_p, scores = torch.cat([log_p, rest_p]), torch.cat([scores, rest_g])
            new, info = family.step(state, z, eps, log_p, scores,
                                    math.inf if first else options["lr"])
            if new is None and first:  # fewer than D + 1 finite draws: the schedule instead
                new, info = family.step(state, z, eps, log_p, scores, options["lr"])
            run.losses.append(-info.elbo)
            run.infos.append(info)
            if new is None:
                raise NonFiniteError(
                    f"fit(method='bam'): non-finite values at iteration {state.iteration + 1}: "
                    f"{info.num_finite} of {len(z)} draws had a finite log joint and score"
                    + ("" if info.num_finite < 2 else ", and the update was not finite")
                    + ". The Gaussian is left at the last finite iterate. What to try: a "
                    "smaller init_scale or batch_size in method_options, a model whose log "
                    "joint is finite on the whole unconstrained space, or method='pathfinder'.",
                    step=state.iteration + 1, losses=run.losses,
                )
            state = new
            run.add(state)
            if bar is not None and state.iteration % 10 == 0:
                bar.update(state.iteration - bar.n)
                bar.set_postfix_str(f"elbo {info.elbo:.5g} | KL step {info.kl_step:.2g}")
            pull = 1.0 if math.isinf(info.lr) else info.lr / (1 + info.lr)
            residual = info.kl_step / pull**2
            run.residuals.append(residual)
            run.still = run.still + 1 if residual < options["tol"] else 0
            if checking and run.still >= options["patience"]:
                converged = ("fixed point",)
                break
            if path is not None and state.iteration % every == 0:
                _save(path, state, generator, target, start_note, run, kind)
    except KeyboardInterrupt:
        stop = f"interrupted (KeyboardInterrupt) after {state.iteration} iterations"
        warnings.warn(f"fit: {stop}; returning the state reached", stacklevel=3)
    except NonFiniteError:
        write_state(guide, target, state)
        raise
    finally:
        if bar is not None:
            bar.update(state.iteration - bar.n)
            bar.close()
    if path is not None:
        _save(path, state, generator, target, start_note, run, kind)  # before averaging
    averaged = None
    if converged is None and stop is None and run.average is not None and run.average.count:
        averaged = run.average.count
        state = run.average.state(state)
    write_state(guide, target, state)
    reason = _reason(converged, stop, num_steps, options, state, run, limit, averaged)
    diagnostics = {
        "kl_step": [i.kl_step for i in run.infos], "residual": run.residuals,
        "init": start_note, "start_evaluations": start_count, "fisher": [i.fisher for i in run.infos],
        "fisher_se": [i.fisher_se for i in run.infos], "lr": [i.lr for i in run.infos],
        "score_match": run.fisher_checks,
        "num_density_evaluations": target.num_density_evaluations,
    }
    return FitResult(
        losses=np.asarray(run.losses, dtype=np.float64), num_steps=state.iteration,
        converged=converged is not None, reason=reason, seconds=time.perf_counter() - started,
        diagnostics=diagnostics, guide=guide, num_evaluations=target.num_evaluations,
        init=stage,
    )


def _score_match_test(state, z, eps, log_p, scores, tol):
    """``(passed, mean, se)`` of the per-draw Fisher divergence over the finite draws (module
    docstring, test 1); not passed with fewer than 2 finite draws."""
    finite = torch.isfinite(log_p) & torch.isfinite(scores).all(-1)
    n = int(finite.sum())
    if n < 2:
        return False, float("nan"), float("nan")
    if isinstance(state, lowrank.LowRankState):
        per_draw = lowrank.fisher_per_draw(state, z[finite], scores[finite])
    else:
        per_draw = bam.fisher_per_draw(state, eps[finite], scores[finite])
    mean, se = float(per_draw.mean()), float(per_draw.std() / math.sqrt(n))
    return bool(n == len(log_p) and mean + 2 * se < tol), mean, se


def _reason(converged, stop, num_steps, options, state, run, limit, averaged):
    if converged is not None and converged[0] == "score match":
        _, fisher, se = converged
        return (f"converged: score match, the covariance-weighted Fisher divergence of q on "
                f"{options['check_size']} draws is {fisher:.2g} (SE {se:.2g}), mean + 2 SE < "
                f"fisher_tol={options['fisher_tol']:g} (iteration {state.iteration})")
    if converged is not None:
        return (f"converged: KL(q_t+1 || q_t) / (lambda / (1 + lambda))^2 < "
                f"tol={options['tol']:g} for {options['patience']} iterations in a row "
                f"(iteration {state.iteration})")
    if stop is not None:
        return stop
    if num_steps is not None:
        return f"ran num_steps={num_steps} iterations (a fixed number; convergence not checked)"
    floor = float(np.median(run.residuals[-50:])) if run.residuals else float("nan")
    return (f"{limit} iterations (max_steps / method_options['max_iterations']) without "
            f"reaching the fixed point: the normalized KL step stays near {floor:.3g} >= "
            f"tol={options['tol']:g} (the noise of {options['batch_size']} draws on a "
            f"non-Gaussian posterior); the guide holds the average of the last "
            f"{averaged} iterates")


def _low_rank(options, dim):
    """Whether an ``AutoLowRankMultivariateNormal`` gets :mod:`pyro_elbo.vi.lowrank`'s
    ``O(D (r + B)^2)`` updates: ``low_rank=True``, or ``"auto"`` above 200 dimensions (below,
    the dense update is cheap and its KL-closest rank-r member is written at the end)."""
    choice = options["low_rank"]
    if choice not in (True, False, "auto"):
        raise ValueError(f"fit(method='bam'): method_options['low_rank'] must be True, False "
                         f"or 'auto', got {choice!r}")
    return choice is True or (choice == "auto" and dim > 200)


def write_state(guide, target, state):
    """Write BaM's Gaussian into ``guide``."""
    if isinstance(state, lowrank.LowRankState):
        lowrank.write(guide, state)
    elif state.diagonal:
        write_gaussian(guide, target, state.mu, variance=state.cov)
    else:
        write_gaussian(guide, target, state.mu, torch.linalg.cholesky(state.cov))


class _Run:
    """What the loop records: losses, infos, residuals, the fixed-point streak, the score-match
    checks and the Polyak-Ruppert average of the iterates after ``limit // 2`` (the answer
    when neither test passes: the iterates keep the noise of B draws)."""

    def __init__(self, limit, averaging, start_count):
        self.start_count = start_count
        self.losses, self.infos, self.residuals, self.fisher_checks = [], [], [], []
        self.still = 0
        self.average = _Average(limit // 2) if averaging else None

    def add(self, state):
        if self.average is not None:
            self.average.add(state)

    def restore(self, saved):
        self.losses, self.residuals = list(saved["losses"]), list(saved["residuals"])
        self.still = saved["still"]
        self.infos = [bam.BaMInfo(*row) for row in saved["infos"]]
        self.fisher_checks = [tuple(row) for row in saved["fisher_checks"]]
        if self.average is not None and saved["average"] is not None:
            self.average.count, self.average.mu, self.average.cov = saved["average"]


class _Average:
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


def _save(path, state, generator, target, note, run, kind):
    from pyro_elbo.fit import checkpoint as ckpt

    average = run.average
    ckpt.save_atomic({
        "format": _FORMAT, "state": list(state), "kind": kind, "generator": generator.get_state(),
        "counts": [target.potential.num_gradients, target.potential.num_densities],
        "init": note, "start_evaluations": run.start_count, "losses": list(run.losses), "residuals": list(run.residuals),
        "still": run.still, "infos": [list(i) for i in run.infos],
        "fisher_checks": [list(c) for c in run.fisher_checks],
        "average": None if average is None or not average.count
        else [average.count, average.mu, average.cov],
    }, path)


def _load(path, dim, kind):
    from pyro_elbo.fit import checkpoint as ckpt

    saved = ckpt.load(path, format=_FORMAT)
    saved_dim = saved["state"][0].numel()
    if saved_dim != dim or saved["kind"] != kind:
        raise ckpt.CheckpointMismatchError(
            f"the checkpoint {path!r} holds a BaM state of {saved_dim} dimensions "
            f"({saved['kind']} covariance), but this model and guide have {dim} ({kind}); pass "
            "resume=False to start over, or another checkpoint path."
        )
    return saved
