"""Importance sampling from a guide q: the draws, Pareto smoothing (PSIS) and its k-hat.

With S draws ``z_s ~ q(z)`` and log weights ``log w_s = log p(x, z_s) - log q(z_s)`` (MATH.md §4),
PSIS fits a generalized Pareto distribution to the largest weights and smooths them; its shape
estimate k-hat says whether importance sampling with q is reliable (Yao, Vehtari, Simpson &
Gelman 2018, "Yes, but did it work?"; Vehtari et al. 2024, "Pareto smoothed importance sampling",
JMLR): above ``min(1 - 1/log10 S, 0.7)`` S draws give no reliable estimate.  Used by
:mod:`.trust` (``diagnose``), :mod:`.arviz` (LOO, PSIS resampling) and :mod:`.degenerate`.

Like :mod:`.arviz`'s numpy half this module imports neither torch nor pyro at module level (the
engine is imported inside :func:`draw_particles`).
"""

from __future__ import annotations

import importlib.metadata
import math
import numbers
import warnings

import numpy as np

__all__ = [
    "CONSTANT_LOG_WEIGHTS",
    "arviz_version",
    "check_num_samples",
    "draw_particles",
    "khat_threshold",
    "logsumexp",
    "psis_khat",
    "psislw",
]

#: Log weights spreading less than this (in nats) are constant: q is the posterior up to
#: round-off (float32 log densities of size ~100 are quantized in steps of ~1e-5, too coarse for
#: a tail fit), there is no tail, k-hat is -inf, and every IS estimate is exact to 1e-4.
CONSTANT_LOG_WEIGHTS = 1e-4


def arviz_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed ``arviz`` distribution (``arviz_base`` alone counts
    as 1.x); ``ImportError`` when neither is installed."""
    try:
        version = importlib.metadata.version("arviz")
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("arviz-base")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                "ArviZ is not installed: pip install arviz (0.x on Python < 3.12, 1.x on >= 3.12)"
            ) from None
        return (1, 0)
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def psislw(log_weights) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling over the last axis, by ArviZ's implementation.

    :param log_weights: array ``(..., S)`` of log importance weights ``log w_s`` (any constant
        offset).
    :returns: ``(smoothed log weights normalized to logsumexp 0, k-hat of shape (...))``.

    The sign conventions differ: ArviZ 0.x ``az.psislw`` takes log weights; ArviZ 1.x
    ``array_stats.psislw`` takes *minus* the log weights (log-likelihood-like input) and gives
    a meaningless k (e.g. -1.6 instead of 0.5) when fed ``+log w``.  Rows whose log weights
    spread less than ``CONSTANT_LOG_WEIGHTS`` nats have no tail (q is exact up to round-off):
    their weights are uniform and their k-hat is -inf (ArviZ would return inf or raise).
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim == 0 or lw.shape[-1] < 1:
        raise ValueError(f"log_weights must have draws on the last axis, got shape {lw.shape}")
    if not np.all(np.isfinite(lw)):
        raise ValueError(
            "log_weights contain NaN or inf: a draw has zero density under the model or the "
            "guide (check supports and constraints)"
        )
    flat = lw.reshape(-1, lw.shape[-1])
    smoothed = np.empty_like(flat)
    khat = np.empty(flat.shape[0])
    constant = (flat.max(-1) - flat.min(-1)) < CONSTANT_LOG_WEIGHTS
    smoothed[constant] = -math.log(flat.shape[-1])
    khat[constant] = -np.inf
    rows = ~constant
    if rows.any():
        if arviz_version()[0] >= 1:
            from arviz_stats.base import array_stats

            out, k = array_stats.psislw(-flat[rows], axis=-1)
        else:
            import arviz as az

            out, k = az.psislw(flat[rows])
        out = np.asarray(out, dtype=np.float64)
        smoothed[rows] = out - logsumexp(out, axis=-1)[:, None]
        khat[rows] = np.asarray(k, dtype=np.float64).reshape(-1)
    return smoothed.reshape(lw.shape), khat.reshape(lw.shape[:-1])


def psis_khat(log_weights) -> float:
    """Pareto k-hat of one vector of log importance weights (Vehtari et al. 2024), -inf when
    the weights are constant (see :func:`psislw`)."""
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    return float(psislw(lw)[1])


def logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def khat_threshold(num_samples: int) -> float:
    """``min(1 - 1/log10 S, 0.7)``: above it, S draws give no reliable PSIS estimate."""
    if num_samples <= 10:
        return 0.0
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def check_num_samples(num_samples, minimum: int = 1) -> int:
    """``num_samples`` as an int, or a ValueError naming it."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ValueError(f"num_samples must be an integer >= {minimum}, got {num_samples!r}")
    if num_samples < minimum:
        raise ValueError(f"num_samples must be an integer >= {minimum}, got {num_samples}")
    return int(num_samples)


def draw_particles(model, guide, args, kwargs, num_samples, nesting, collect):
    """Run the engine for ``num_samples`` particles in one vectorized pass and return
    ``collect(particles)``; if that fails (a model that does not vectorize), warn and draw the
    particles one at a time.  Call under ``torch.no_grad``."""
    from pyro_elbo.engine.particles import run_particles

    options = dict(num_particles=num_samples, plate_nesting=nesting)
    try:
        return collect(run_particles(model, guide, args, kwargs, vectorize=True, **options))
    except Exception as error:  # any failure of the vectorized pass falls back to the loop
        if num_samples == 1:
            raise
        warnings.warn(
            f"model and guide did not run vectorized over {num_samples} draws in an outer "
            f"plate ({type(error).__name__}: {error}); drawing them one at a time instead, "
            "which is slower. To vectorize, declare every batch dim with pyro.plate and avoid "
            "Python control flow on sampled values and hard-coded expand() sizes.",
            RuntimeWarning,
            stacklevel=3,
        )
    return collect(run_particles(model, guide, args, kwargs, vectorize=False, **options))
