"""``fit(model, guide, *args, method="bam" | "pathfinder")``: the two score-based methods behind
``fit``'s interface.  Both run on the unconstrained log joint (:mod:`pyro_elbo.vi.target`),
write their Gaussian into the guide and return a :class:`~pyro_elbo.fit.FitResult` whose
``losses`` are ``-ELBO`` estimates per iteration and whose ``num_evaluations`` counts log-joint
gradient evaluations.

* ``"bam"`` (:mod:`pyro_elbo.vi.bam_run`, the update in :mod:`pyro_elbo.vi.bam`): from one
  Pathfinder path's Gaussian (:mod:`pyro_elbo.vi.start`), a first iteration that matches the
  scores of ``D + 1`` draws (exact on a Gaussian target), then batches of ``batch_size``; full
  covariance for ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal`` (the latter
  gets the KL-closest rank-r Gaussian at the end; above 200 dimensions the ``O(D (r + B)^2)``
  updates of :mod:`pyro_elbo.vi.lowrank`), diagonal for
  ``AutoNormal``/``AutoDiagonalNormal``.  Stops at a score match (the Fisher divergence of q on
  a few draws, with its SE) or a fixed point, else ends at the average of the last half of
  ``max_iterations``.
* ``"pathfinder"`` (:mod:`pyro_elbo.vi.multipath`): the chosen Gaussian of
  :func:`~pyro_elbo.vi.multipath.pathfinder`; ``diagnostics`` holds k-hat and the paths.

Both share ``fit``'s NaN guard, progress bar and checkpoints (``checkpoint=``,
``checkpoint_every=``, ``resume=``; BaM: its state every ``checkpoint_every`` iterations,
Pathfinder: after every path; written atomically, a resumed run continues bit for bit).  A
Pathfinder path with a non-finite log joint or gradient is dropped (its reason in
``diagnostics["paths"]``), and ``NonFiniteError`` when all are.

``method_options`` passes each method's settings (e.g. ``{"batch_size": 16}``,
``{"num_paths": 8}``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_elbo.vi.bam_run import BAM_DEFAULTS, fit_bam
from pyro_elbo.vi.target import Target, check_guide

__all__ = ["BAM_DEFAULTS", "METHODS", "dispatch", "fit_method"]

METHODS = ("auto", "svi", "bam", "pathfinder")

#: BaM iterations ``method="auto"`` gives its stopping tests (Fisher divergence, fixed point)
#: before it falls back to "svi"
AUTO_BAM_ITERATIONS = 30

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
    stochastic-gradient loop runs BaM for up to ``AUTO_BAM_ITERATIONS`` iterations; when one
    of its stopping tests passes (score match or fixed point: the near-Gaussian posteriors of
    the stress suite, at "svi"'s accuracy with far fewer evaluations, README's "Fewer gradient
    evaluations") that is the answer, otherwise (a funnel, a mixture: BaM's score-matching
    answer was less accurate there) "svi" runs, from its own Laplace stage, and the
    evaluations of both count.  Anything else is "svi", and so is a recommended
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
    second.reason = (f"method='auto': BaM passed neither of its stopping tests in "
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
        return fit_bam(model, guide, args, kwargs, settings,
                       _options("bam", method_options, BAM_DEFAULTS), started, show, generator)
    finally:
        if lock is not None:
            lock.release()
