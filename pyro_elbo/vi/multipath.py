"""Multi-path Pathfinder for Pyro models: :func:`pathfinder` (the public entry) and the PSIS
step that combines paths (Zhang et al. 2022, Algorithm 5; the single path is
:mod:`pyro_elbo.vi.path`)."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal

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
              init_radius=2.0):
    """``(best approximation, unconstrained resampled draws, khat, path diagnostics,
    best path's elbos)``: ``num_paths`` single paths and the PSIS resampling of their draws."""
    draws_per_path = draws_per_path or max(100, math.ceil(num_draws / num_paths))
    results, pooled, log_w = [], [], []
    errors = []
    for index in range(num_paths):
        jitter = torch.rand(target.dim, generator=generator, dtype=target.dtype)
        start = target.u0 + init_radius * (2 * jitter - 1)
        try:
            path = single.single_path(
                target, start, generator=generator, max_iterations=max_iterations,
                history_size=history_size, num_elbo_draws=num_elbo_draws,
            )
        except ValueError as error:
            errors.append(f"path {index}: {error}")
            continue
        if not math.isfinite(path.elbos[path.best_iteration - 1]):
            errors.append(f"path {index}: no approximation with a finite ELBO")
            continue
        draws, log_q = single.sample(path.best, draws_per_path, generator)
        log_p = target.log_density(draws)
        results.append(path)
        pooled.append(draws)
        log_w.append(log_p - log_q)
    if not results:
        raise ValueError("pathfinder: no path gave a usable approximation: " + "; ".join(errors))
    draws = torch.cat(pooled)
    log_w = torch.cat(log_w)
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
        diagnostics.append({"error": error})
    return best, draws[index], float(khat), diagnostics


def pathfinder(model, *args, num_paths: int = 4, num_draws: int = 1000, seed: int | None = None,
               guide=None, max_iterations: int = 1000, history_size: int = 6,
               num_elbo_draws: int = 5, draws_per_path: int | None = None, **kwargs):
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
    :returns: a :class:`PathfinderResult`.  Warns when PSIS k-hat > 0.7.
    """
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
        num_elbo_draws=num_elbo_draws))
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


def _run(model, guide, args, kwargs, seed, options, stacklevel=3):
    """Set up the guide and target, run the paths, write the chosen Gaussian, warn on k-hat;
    ``((best, best elbos), draws, khat, paths, target)``."""
    with poutine.block(), torch.no_grad():
        guide(*args, **kwargs)  # its parameters and prototype exist before they are written
    target = Target(model, args, kwargs, guide=guide, method="pathfinder")
    generator = torch.Generator().manual_seed(
        int(seed) if seed is not None else int(torch.randint(2**62, (1,)))
    )
    best, draws, khat, paths = run_paths(target, generator=generator, **options)
    write_gaussian(guide, target, best.best.mu, gaussian_cholesky(best.best.covariance()))
    if khat > KHAT_WARN:
        warnings.warn(
            f"pathfinder: PSIS k-hat = {khat:.2f} > {KHAT_WARN}: no path's Gaussian is a good "
            "importance proposal (a funnel, a banana or heavy tails); the resampled draws are "
            "usable but biased. Reparameterize (e.g. non-centered), or use NUTS.",
            stacklevel=stacklevel,
        )
    return (best.best, best.elbos), draws, khat, paths, target


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
