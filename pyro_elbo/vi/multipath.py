"""Multi-path Pathfinder for Pyro models: :func:`pathfinder` (the public entry) and the PSIS
step that combines paths (Zhang et al. 2022, Algorithm 5; the single path is
:mod:`pyro_elbo.vi.path`)."""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_elbo.engine.traces import quietly
from pyro_elbo.vi import path as single
from pyro_elbo.vi.target import Target, check_guide, gaussian_cholesky, write_gaussian

__all__ = ["PathfinderResult", "pathfinder", "run_paths"]

#: PSIS k-hat above which the resampled draws are flagged (Vehtari et al. 2024)
KHAT_WARN = 0.7


@dataclass
class PathfinderResult:
    """What :func:`pathfinder` returns.

    * ``guide``: the guide holding the chosen Gaussian (the best path's by ELBO);
    * ``draws``: ``{site: (num_draws,) + shape}`` constrained, PSIS-resampled over all paths;
      ``unconstrained``: the same draws as one flat ``(num_draws, D)`` tensor;
    * ``khat``: PSIS k-hat of the pooled importance weights (``-inf``: q is exact);
    * ``elbo``: the chosen Gaussian's ELBO estimate; ``paths``: per-path diagnostics
      (``num_iterations``, ``best_iteration``, ``elbo``, ``reason``, ``converged``);
    * ``num_evaluations``: log-joint gradient evaluations (L-BFGS, all paths);
      ``num_density_evaluations``: evaluations without a gradient (ELBO and importance draws);
    * ``seconds``; ``losses``: ``-ELBO`` along the chosen path.
    """

    guide: object
    draws: dict
    unconstrained: torch.Tensor
    khat: float
    elbo: float
    paths: list
    num_evaluations: int
    num_density_evaluations: int
    seconds: float
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    converged: bool = False
    reason: str = ""

    def __repr__(self):
        return (
            f"PathfinderResult(khat={self.khat:.3g}, elbo={self.elbo:.6g}, "
            f"num_paths={len(self.paths)}, num_evaluations={self.num_evaluations}, "
            f"seconds={self.seconds:.3g})"
        )

    def to_inference_data(self):
        """The resampled draws as ArviZ data (one chain): ``InferenceData`` on ArviZ 0.x, a
        ``DataTree`` on 1.x, with ``psis_khat`` and the evaluation counts as attributes."""
        from pyro_elbo.diagnostics.arviz import InferenceDict

        posterior = {k: v.detach().cpu().numpy()[None] for k, v in self.draws.items()}
        attrs = {
            "inference_library": "pyro_elbo.pathfinder",
            "psis_khat": self.khat,
            "num_evaluations": self.num_evaluations,
            "resampled": "psis",
        }
        return InferenceDict(groups={"posterior": posterior}, dims={}, coords={},
                             attrs={"posterior": attrs}).to_arviz()


def _check_count(name, value, minimum, hint):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"pathfinder: {name} must be an integer >= {minimum} ({hint}), "
                         f"got {value!r}")
    return int(value)


def run_paths(target: Target, *, num_paths=4, num_draws=1000, draws_per_path=None,
              generator=None, max_iterations=1000, history_size=6, num_elbo_draws=5,
              init_radius=2.0, finished=(), on_path=None, on_iteration=None):
    """``(best path, unconstrained resampled draws, khat, path diagnostics)``: ``num_paths``
    single paths and the PSIS resampling of their draws.

    ``finished``: records of paths already run (from a checkpoint, with ``generator`` in the
    state it had after them): those paths are skipped.  ``on_path(records)`` is called after
    every path (the checkpoint); ``on_iteration()`` after every L-BFGS step (the progress bar).
    NaN guard: a path whose log joint or gradient is not finite where it starts, or that has no
    approximation with a finite ELBO, is dropped, its reason in the diagnostics; when all are,
    :class:`~pyro_elbo.fit.NonFiniteError` (a ``FloatingPointError``) names the reasons."""
    draws_per_path = draws_per_path or max(100, math.ceil(num_draws / num_paths))
    records = list(finished)
    for index in range(len(records), num_paths):
        jitter = torch.rand(target.dim, generator=generator, dtype=target.dtype)
        start = target.u0 + init_radius * (2 * jitter - 1)
        try:
            path = single.single_path(
                target, start, generator=generator, max_iterations=max_iterations,
                history_size=history_size, num_elbo_draws=num_elbo_draws,
                on_iteration=on_iteration,
            )
        except ValueError as error:
            records.append({"error": f"path {index}: {error}"})
        else:
            if not math.isfinite(path.elbos[path.best_iteration - 1]):
                records.append({"error": f"path {index}: no approximation with a finite ELBO "
                                         f"(the log joint is not finite at its draws)",
                                "num_iterations": path.num_iterations})
            else:
                draws, log_q = single.sample(path.best, draws_per_path, generator)
                records.append(_record(path, draws, target.log_density(draws) - log_q))
        if on_path is not None:
            on_path(records)
    results = [_path(r) for r in records if "error" not in r]
    errors = [r["error"] for r in records if "error" in r]
    if not results:
        from pyro_elbo.fit.loop import NonFiniteError

        raise NonFiniteError(
            "pathfinder: no path gave a usable approximation (non-finite log joint or "
            "gradient): " + "; ".join(errors) + ". What to try: a model whose log joint is "
            "finite on the unconstrained space near its prior, or init values / priors that "
            "keep it finite.", step=0)
    draws = torch.cat([r["draws"] for r in records if "error" not in r])
    log_w = torch.cat([r["log_w"] for r in records if "error" not in r])
    finite = torch.isfinite(log_w)
    from pyro_elbo.diagnostics.psis import psislw

    smoothed, khat = psislw(log_w[finite].numpy())
    weights = torch.zeros_like(log_w)
    weights[finite] = torch.as_tensor(np.exp(smoothed), dtype=log_w.dtype)
    index = torch.multinomial(weights, num_draws, replacement=True, generator=generator)
    best = max(results, key=lambda p: p.elbos[p.best_iteration - 1])
    diagnostics = [
        {"num_iterations": p.num_iterations, "best_iteration": p.best_iteration,
         "elbo": p.elbos[p.best_iteration - 1], "reason": p.reason, "converged": p.converged}
        for p in results
    ]
    for error in errors:
        diagnostics.append({"error": error, "reason": error})
    return best, draws[index], float(khat), diagnostics


def _record(path, draws, log_w) -> dict:
    """A finished path as tensors and plain values (what a checkpoint holds)."""
    return {"approx": list(path.best), "best_iteration": path.best_iteration,
            "elbos": list(path.elbos), "num_iterations": path.num_iterations,
            "reason": path.reason, "converged": path.converged, "draws": draws, "log_w": log_w}


def _path(record) -> single.PathResult:
    return single.PathResult(single.PathApproximation(*record["approx"]),
                             record["best_iteration"], record["elbos"], None,
                             record["num_iterations"], record["reason"], record["converged"])


def pathfinder(model, *args, num_paths: int = 4, num_draws: int = 1000, seed: int | None = None,
               guide=None, max_iterations: int = 1000, history_size: int = 6,
               num_elbo_draws: int = 5, draws_per_path: int | None = None,
               progress=False, checkpoint=None, resume: bool = True, **kwargs):
    """Multi-path Pathfinder (Zhang et al. 2022) on the unconstrained space of ``model``.

    :param model: a Pyro model with continuous latents; ``*args``, ``**kwargs`` go to it (so the
        keyword names of this function are reserved).
    :param int num_paths: L-BFGS paths (>= 1; 4 as in the paper and Stan).
    :param int num_draws: draws returned, PSIS-resampled from all paths' chosen Gaussians.
    :param seed: seeds the start points and draws (a private generator: the global RNG is not
        touched).
    :param guide: the guide to write the chosen Gaussian into (``AutoMultivariateNormal``,
        ``AutoLowRankMultivariateNormal``, ``AutoDiagonalNormal`` or ``AutoNormal``); default a
        new ``AutoMultivariateNormal(model)``.
    :param int max_iterations: L-BFGS iterations per path at most (1000, Stan's default).
    :param int history_size: J, the pairs kept for the inverse Hessian (6, the paper's).
    :param int num_elbo_draws: draws per ELBO estimate along a path (5, the paper's).
    :param draws_per_path: importance draws per path (default ``max(100, num_draws /
        num_paths)``).
    :param progress: a tqdm bar over the L-BFGS iterations of all paths (``True``, ``False``
        or ``"auto"`` as in ``fit``).
    :param checkpoint: a file written (``fit``'s atomic write and lock) after every path: the
        finished paths and the generator; a rerun with ``resume=True`` skips them and returns
        what an uninterrupted run returns, bit for bit.  A checkpoint of another run (model
        arguments, options, seed) raises ``CheckpointMismatchError``.
    :returns: a :class:`PathfinderResult`.  Warns when PSIS k-hat > 0.7; raises
        :class:`~pyro_elbo.fit.NonFiniteError` when no path has a finite log joint and gradient.
    """
    from pyro_elbo.fit.loop import _show_progress

    started = time.perf_counter()
    num_paths = _check_count("num_paths", num_paths, 1, "the number of L-BFGS paths; the "
                             "paper's default is 4")
    num_draws = _check_count("num_draws", num_draws, 1, "the draws to return")
    if guide is None:
        guide = AutoMultivariateNormal(model)
    check_guide("pathfinder", guide)
    best, draws, khat, paths, target = _run(model, guide, args, kwargs, seed, dict(
        num_paths=num_paths, num_draws=num_draws, draws_per_path=draws_per_path,
        max_iterations=max_iterations, history_size=history_size,
        num_elbo_draws=num_elbo_draws), checkpoint=checkpoint, resume=resume,
        progress=_show_progress(progress))
    return PathfinderResult(
        guide=guide, draws=target.constrained(draws), unconstrained=draws, khat=khat,
        elbo=max(p["elbo"] for p in paths if "elbo" in p), paths=paths,
        num_evaluations=target.num_evaluations,
        num_density_evaluations=target.num_density_evaluations,
        seconds=time.perf_counter() - started,
        losses=np.asarray([-p for p in best[1]], dtype=np.float64),
        converged=_converged(paths, khat),
        reason=_reason(paths, khat),
    )


def _run(model, guide, args, kwargs, seed, options, stacklevel=3, checkpoint=None,
         resume=True, progress=False):
    """Set up the guide and target, run the paths (with ``fit``'s progress bar when
    ``progress`` and a checkpoint after every path at ``checkpoint``), write the chosen
    Gaussian, warn on k-hat; ``((best, best elbos), draws, khat, paths, target)``."""
    with quietly(fork=False):
        guide(*args, **kwargs)  # its parameters and prototype exist before they are written
    target = Target(model, args, kwargs, guide=guide, method="pathfinder")
    generator = torch.Generator().manual_seed(
        int(seed) if seed is not None else int(torch.randint(2**62, (1,)))
    )
    lock = None
    if checkpoint is not None:
        from pyro_elbo.fit.location import claim

        lock = claim(os.fspath(checkpoint))
    try:
        best, draws, khat, paths = _run_paths(target, generator, seed, options, args, kwargs,
                                              checkpoint, resume, progress)
    finally:
        if lock is not None:
            lock.release()
    write_gaussian(guide, target, best.best.mu, gaussian_cholesky(best.best.covariance()))
    if khat > KHAT_WARN:
        warnings.warn(
            f"pathfinder: PSIS k-hat = {khat:.2f} > {KHAT_WARN}: no path's Gaussian is a good "
            "importance proposal (a funnel, a banana or heavy tails); the resampled draws are "
            "usable but biased. Reparameterize (e.g. non-centered), or use NUTS.",
            stacklevel=stacklevel,
        )
    return (best.best, best.elbos), draws, khat, paths, target


def _run_paths(target, generator, seed, options, args, kwargs, checkpoint, resume, progress):
    """:func:`run_paths` with the checkpoint (loaded, then written after every path) and
    ``fit``'s progress bar."""
    from pyro_elbo.fit.loop import _progress_bar

    finished, on_path = (), None
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        identity = _identity(target, args, kwargs, options)
        if resume and os.path.exists(path):
            finished = _load(path, identity, seed, generator, target)

        def on_path(records):
            _save(path, identity, seed, generator, target, records)
    bar = _progress_bar(progress, options["num_paths"] * options["max_iterations"], 0,
                        desc="pathfinder", unit="iteration")
    if bar is None:
        return run_paths(target, generator=generator, finished=finished, on_path=on_path,
                         **options)
    save = on_path

    def on_path(records):
        bar.update(len(records) * options["max_iterations"] - bar.n)  # a path ended early
        bar.set_postfix_str(f"path {len(records)}/{options['num_paths']}")
        if save is not None:
            save(records)
    if finished:
        on_path(list(finished))
    try:
        return run_paths(target, generator=generator, finished=finished, on_path=on_path,
                         on_iteration=bar.update, **options)
    finally:
        bar.close()


_FORMAT = "pyro_elbo.pathfinder/1"


def _identity(target, args, kwargs, options) -> dict:
    """What a resumed run must share with the checkpoint's (plain values, compared whole)."""
    from pyro_elbo.fit.identity import describe_value

    return {"dim": target.dim, "dtype": str(target.dtype), "options": describe_value(options),
            "args": describe_value(list(args)), "kwargs": describe_value(dict(kwargs))}


def _save(path, identity, seed, generator, target, records):
    """Checkpoint after a path (``fit``'s atomic write): the finished paths, the generator,
    the evaluation counts."""
    from pyro_elbo.fit import checkpoint as ckpt

    ckpt.save_atomic({"format": _FORMAT, "identity": identity, "seed": seed,
                      "generator": generator.get_state(), "records": records,
                      "counts": [target.potential.num_gradients,
                                 target.potential.num_densities]}, path)


def _load(path, identity, seed, generator, target):
    """The finished paths of the checkpoint at ``path`` (the generator and counts restored);
    :class:`~pyro_elbo.fit.CheckpointMismatchError` when another run wrote it."""
    from pyro_elbo.fit import checkpoint as ckpt
    from pyro_elbo.fit.identity import _difference

    saved = ckpt.load(path, format=_FORMAT)
    differences = [f"{key}: {_difference(saved['identity'].get(key), value)}"
                   for key, value in identity.items() if saved["identity"].get(key) != value]
    if seed is not None and saved["seed"] != seed:
        differences.append(f"seed: checkpoint {saved['seed']}, this run {seed}")
    if differences:
        raise ckpt.CheckpointMismatchError(
            f"the checkpoint {path!r} was written by a Pathfinder run that cannot be continued "
            "by this one: " + "; ".join(differences) + ". Pass resume=False to start over (the "
            "file will be overwritten), or use another checkpoint path.")
    generator.set_state(saved["generator"])
    target.potential.num_gradients, target.potential.num_densities = saved["counts"]
    return saved["records"]


def _converged(paths, khat) -> bool:
    """Every path stopped by an L-BFGS tolerance and the pooled k-hat is at most 0.7."""
    return all(p.get("converged", False) for p in paths) and not khat > KHAT_WARN


def _reason(paths, khat):
    done = [p for p in paths if "elbo" in p]
    stops = "; ".join(sorted({p["reason"] for p in done}))
    verdict = "" if not khat > KHAT_WARN else (
        f" > {KHAT_WARN}: the Gaussians are poor proposals, so not converged")
    return (f"{len(done)} path(s), L-BFGS stopped by: {stops}; chosen Gaussian's ELBO "
            f"{max(p['elbo'] for p in done):.6g}; PSIS k-hat {khat:.2f}{verdict}")
