"""``fit``: a stochastic-VI loop that stops on its own, refuses bad input, survives NaNs and crashes.

One call replaces the hand-written ``for step in range(n): svi.step(...)`` loop::

    result = fit(model, None, data, seed=0)           # every default (see below)
    result = fit(model, guide, data, seed=0)          # your guide
    result.converged, result.reason, result.num_steps, result.seconds, result.guide
    result.plot()                                     # the loss trace (a matplotlib Figure)

What it does, in order:

0. **Defaults** (:mod:`.initial`): ``guide=None`` takes the recommended guide and ``loss=None``
   the recommended objective (:mod:`pyro_elbo.init.defaults`).
1. **Checks before step 1** (:mod:`.preflight`): settings, then one blocked run of guide and
   model: structure, shapes, supports, plates, discrete sites under pathwise estimators,
   enumeration, observed NaNs, initial log-densities, parameters.
1b. **Laplace stage** (``init="auto"``, :mod:`.initial`): L-BFGS to the posterior mode and the
   guide set from the Hessian there; then, when ``optim`` is not given,
   :class:`~pyro_elbo.init.WhitenedAdam` in the coordinates of that Gaussian.
2. **Steps**: ``loss.loss_and_grads`` (any pyro_elbo objective or Pyro ELBO; compiled as one
   graph per step by :mod:`pyro_elbo.fast` when :mod:`.compiling` says so) and
   one optimizer step over the parameters captured once before the loop (parameters created
   later are adopted).
3. **NaN/inf guard**: a non-finite loss or gradient stops the loop *before* the optimizer step, so
   parameters and optimizer state stay at the last finite step.  The step's traces are re-run with
   the same random numbers to name the site whose log-density is non-finite.  With
   ``skip_nonfinite=N`` up to N such steps are skipped (no update) before raising.
4. **Convergence** (:mod:`.convergence`): ``"auto"`` (split-R-hat stationarity, then iterate
   averaging to a Monte Carlo SE of 0.1 of each parameter's scale; the guide ends at the average),
   ``"relative"`` (Stan's relative ELBO tolerance), a rule instance, or ``None``.
5. **Checkpoints** (:mod:`.checkpoint`): every ``checkpoint_every`` steps and at the end, written
   atomically; ``resume=True`` continues from an existing file, bit for bit on CPU.
6. **Progress** (tqdm): step, smoothed loss, convergence status.
7. **Data-parallel** (``distributed=``, :mod:`.data_parallel`): under ``torchrun`` the same loop
   on every rank, each on its shard, with one all-reduce of the gradients per step.

The modules: :mod:`.run` (the state of one call and its steps), :mod:`.result`,
:mod:`.optimizers`, :mod:`.batches`, :mod:`.nan`, :mod:`.progress`, :mod:`.saving`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pyro

import pyro_elbo.fit.data_parallel as data_parallel
import pyro_elbo.fit.interrupt as interrupt
import pyro_elbo.fit.location as location
from pyro_elbo.fit.batches import _Batches, _with_batch  # noqa: F401 (re-exported)
from pyro_elbo.fit.convergence import make_rule
from pyro_elbo.fit.escalate import check_reparam, escalating_fit, noncentered
from pyro_elbo.fit.initial import check_init
from pyro_elbo.fit.nan import NonFiniteError, _find_nonfinite  # noqa: F401 (re-exported)
from pyro_elbo.fit.optimizers import DEFAULT_LR, Scheduled, _make_optimizer  # noqa: F401
from pyro_elbo.fit.preflight import check_objective, check_optim, check_steps
from pyro_elbo.fit.progress import _progress_bar, _show_progress  # noqa: F401 (re-exported)
from pyro_elbo.fit.result import FitResult, FitState
from pyro_elbo.fit.run import _Run

__all__ = ["DEFAULT_LR", "FitResult", "FitState", "NonFiniteError", "fit"]

def fit(
    model,
    guide,
    *args,
    loss=None,
    optim=None,
    num_steps: int | None = None,
    max_steps: int = 10_000,
    progress="auto",
    convergence="auto",
    checkpoint=None,
    checkpoint_every: int = 500,
    resume: bool = True,
    seed: int | None = None,
    callbacks=(),
    compile="auto",
    data=None,
    skip_nonfinite: int = 0,
    init="auto",
    method: str = "auto",
    method_options: dict | None = None,
    escalate: bool = True,
    reparam="auto",
    distributed="auto",
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model`` by stochastic optimization of ``loss``; see the module doc.

    :param model, guide: Pyro programs; ``*args``/``**kwargs`` are passed to both.  ``guide=None``
        takes :func:`pyro_elbo.init.recommended_guide` (full rank up to 200 latent dimensions,
        low rank up to 5000, else mean field; mean field when latents sit in a subsampled
        plate); the result's ``.guide`` is the guide fitted.
    :param loss: the objective: any pyro_elbo objective, or a Pyro ELBO (``Trace_ELBO()``,
        ``TraceEnum_ELBO(max_plate_nesting=...)``...).  Default
        :func:`pyro_elbo.init.recommended_objective`: ``ELBO(4, estimator="stl")``
        (``estimator="reparam"`` when the guide has a site without ``rsample`` or its log q
        cannot hold its parameters constant, e.g. a flow without an inverse; said in
        ``result.defaults``).
    :param optim: ``pyro.optim.Adam({...})`` (any ``PyroOptim``), a torch optimizer class or
        ``functools.partial`` of one (built over all parameters), or a constructed torch
        optimizer holding them.  Default: :func:`pyro_elbo.init.conditioning.whitened_optim`
        (Adam in the whitened coordinates of the Laplace Gaussian, step
        ``0.05 * min(1, sqrt(20 / D))`` posterior sds) after a Laplace stage on a Gaussian
        autoguide, else ``torch.optim.Adam(lr=0.01)``.
    :param num_steps: run exactly this many steps (convergence is then not checked).
    :param int max_steps: with ``num_steps=None``, the most steps before giving up (10,000).
    :param progress: ``True``, ``False`` or ``"auto"`` (on a terminal or in a notebook).
    :param convergence: ``"auto"`` (:class:`~pyro_elbo.fit.convergence.AutoConvergence`),
        ``"relative"`` (:class:`~pyro_elbo.fit.convergence.RelativeTolerance`), a rule instance,
        or ``None`` (run ``max_steps``).
    :param checkpoint: a file path; saved every ``checkpoint_every`` (500) steps and at the end.
    :param bool resume: continue from ``checkpoint`` when the file exists; refused with
        :class:`~pyro_elbo.fit.checkpoint.CheckpointMismatchError` if it was written by another
        run (parameters, sites, objective, optimizer, data, seed or batches differ:
        :mod:`.identity`); a new learning rate or number of steps is applied with a one-line
        ``ResumeNotice``.  A finished run is restored without stepping.
    :param seed: seeds torch, numpy and Python (``pyro.set_rng_seed``) before anything runs.
    :param callbacks: functions called as ``callback(state)`` after each step with a
        :class:`FitState`; one returning ``True`` stops the run.
    :param compile: ``"auto"`` (default), ``True`` or ``False``: run each step as one compiled
        graph (:mod:`pyro_elbo.fast`: the objective's loss and gradients captured once with FX,
        compiled by inductor; the same estimator and random numbers).  ``"auto"`` compiles a
        run of 2000 steps or more (``num_steps``) from step 1, and switches a run stopped by the
        convergence rule at step 2000 when 2000 more may follow (:mod:`.compiling`); ``True``
        compiles before step 1.  A step that cannot be captured runs eagerly with a one-line
        warning; ``result.compiled.reason`` says which path ran and why.
    :param data: an iterable of batches (e.g. a ``DataLoader``); each step takes the next batch
        and passes it after ``*args`` (a tuple/list is unpacked, a dict merged into the keyword
        arguments), re-iterating at the end of an epoch.
    :param int skip_nonfinite: skip up to this many steps whose loss or gradient is non-finite
        (no update) before raising :class:`NonFiniteError` (default 0: raise at the first).
    :param init: the stage before step 1 (:mod:`pyro_elbo.fit.initial`).  ``"auto"``: L-BFGS to
        the posterior mode and the guide set from the Hessian there
        (:func:`pyro_elbo.init.laplace_init`) when the guide is an autoguide it knows and the
        data are not minibatched, else skipped; ``"laplace"``: the same, or an error saying why
        not; ``None``: start from the guide as it is (e.g. to continue an earlier fit).
    :param str method: ``"svi"`` (this stochastic-gradient loop), ``"bam"`` (Batch-and-Match),
        ``"pathfinder"`` (multi-path Pathfinder) or ``"auto"`` (default: ``"svi"`` unless
        ``guide=None`` and no setting of this loop is given; then BaM first, ``"svi"`` when
        BaM passes neither of its stopping tests, the Fisher-divergence test and the
        fixed-point test, within 30 iterations): see :mod:`pyro_elbo.vi.methods`.
    :param dict method_options: settings of ``"bam"``/``"pathfinder"``.
    :param bool escalate: with ``guide=None``, ``method="auto"`` (and no ``loss``, ``optim``,
        ``data``, ``checkpoint`` or ``num_steps``): fit the Gaussian, check its PSIS k-hat, continue with a flow guide when
        k-hat >= 0.7, and mark the draws for PSIS resampling (:mod:`.escalate`;
        ``result.stages`` says what ran and why).  ``False``: one Gaussian run.
    :param reparam: ``"noncentered"``: fit the model rewritten by
        :class:`pyro.infer.reparam.LocScaleReparam` on every latent location-scale site (the
        cure for a funnel; ``result.model`` is the rewritten model); ``"auto"`` (default): the
        escalating default does so when it finds a funnel (said in ``result.stages``); ``None``:
        never.
    :param distributed: data-parallel training across the processes of a ``torchrun`` launch
        (:mod:`.data_parallel`): ``"auto"`` (default) when ``torch.distributed`` is initialized
        with more than one process, as under DDP; ``True``: join the group ``torchrun`` set up
        (``init_process_group`` from the environment) and train data-parallel; ``False``: each
        process fits on its own.  Call ``fit`` on every rank with the same arguments: rank r
        seeds ``seed + r`` (``seed=None``: rank 0 draws one), takes batches r, r + R, ... of
        ``data=`` (a ``DataLoader`` with a ``DistributedSampler`` is taken as this rank's shard)
        or its own subsample of a subsampled ``pyro.plate``; gradients and losses are averaged
        over ranks each step, so the NaN guard, the convergence rule and callbacks stop every
        rank at the same step; rank 0 writes the checkpoints.  No Laplace stage, escalation or
        compiled step in this mode (``init="auto"`` and ``compile="auto"`` skip them).
    :returns: a :class:`FitResult`.

    Ctrl-C (SIGINT) ends the run after the current step: that state is checkpointed and
    returned; SIGTERM likewise checkpoints it, then ends the process (:mod:`.interrupt`).  With
    a checkpoint, the path is checked and locked before step 1 (:mod:`.location`); a failed
    write later keeps the previous checkpoint and the result carries ``checkpoint_error``.
    """
    strategy = data_parallel.resolve(distributed)
    if strategy is not None:
        escalate = False  # each rank's k-hat would differ: one Gaussian run
        if method not in ("auto", "svi"):
            raise ValueError(f"fit: method={method!r} does not run data-parallel; use method='svi'"
                             " or distributed=False")
        method = "svi"
        if compile is True:
            raise ValueError("fit: compile=True does not run data-parallel yet; pass "
                             "compile=False or distributed=False")
        compile = False if compile == "auto" else compile
    if check_reparam(reparam) == "noncentered":
        model, reparam = noncentered(model), None  # rewritten once, here
    if escalate and method == "auto" and guide is None and loss is None and optim is None \
            and data is None and checkpoint is None and num_steps is None:
        # the seed goes to the Gaussian stage: it is then the run fit(..., escalate=False) makes
        options = dict(progress=progress, convergence=convergence, seed=seed,
                       callbacks=callbacks, compile=compile, skip_nonfinite=skip_nonfinite,
                       init=init, reparam=reparam,
                       **({} if max_steps == 10_000 else {"max_steps": max_steps}))
        return escalating_fit(fit, model, args, kwargs, options)
    if method != "svi" and not (method == "auto" and guide is not None):  # pyro_elbo/vi/
        from pyro_elbo.vi.methods import dispatch

        return dispatch(method, model, guide, args, kwargs, locals())
    started = time.perf_counter()
    check_init(init)
    if not (isinstance(compile, bool) or compile == "auto"):
        raise TypeError(f"fit: compile must be True, False or 'auto', got {compile!r}")
    check_steps(num_steps, max_steps, checkpoint_every, skip_nonfinite)
    if num_steps is not None and convergence not in ("auto", None, False):
        raise ValueError(
            "fit: num_steps runs a fixed number of steps, so a convergence rule cannot stop it; "
            "pass max_steps=... instead of num_steps to stop on convergence."
        )
    callbacks = tuple(callbacks) if callbacks is not None else ()
    for index, callback in enumerate(callbacks):
        if not callable(callback):
            raise TypeError(f"fit: callbacks[{index}] is not callable: {callback!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"fit: seed must be an integer or None, got {seed!r}")
    if strategy is not None:
        strategy.seed(seed)  # rank r: seed + r (before the batch source, which shares it)
    run = _Run(
        model,
        guide,
        args,
        kwargs,
        objective=None if loss is None else check_objective(loss),
        optim=optim if isinstance(optim, Scheduled) else check_optim(optim),
        rule=None if num_steps is not None else make_rule(convergence),
        num_steps=num_steps,
        max_steps=max_steps,
        show=_show_progress(progress) and (strategy is None or strategy.writes),
        callbacks=callbacks,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        checkpoint_every=checkpoint_every,
        skip_nonfinite=skip_nonfinite,
        batches=None if data is None else _Batches(data) if strategy is None else strategy.batches(data),
        init=init,
        compile=compile,
        seed=seed,
        strategy=strategy,
    )
    lock = None if run.checkpoint is None else location.claim(run.checkpoint) \
        if strategy is None else strategy.claim(run.checkpoint)
    try:
        if seed is not None and strategy is None:
            pyro.set_rng_seed(seed)
        if strategy is None:
            run.prepare()
        else:
            strategy.together(run.prepare, "before step 1")
            strategy.start(run)  # rank 0's parameters everywhere
        if run.checkpoint is not None:
            _on_main(strategy, "checking the room for the checkpoint", lambda: location.check_space(
                run.checkpoint, location.estimate_bytes(run.leaves, run.target)))
        if run.checkpoint is not None and resume and _on_main(
                strategy, "looking for the checkpoint", lambda: os.path.exists(run.checkpoint)):
            finished = run.resume()
            if finished is not None:
                return dataclasses.replace(finished, seconds=time.perf_counter() - started)
        # SIGINT/SIGTERM wait for the end of a step, and for the last checkpoint write
        with interrupt.DeferSignals(sigterm=run.checkpoint is not None) as run.signals:
            run.loop()
            result = run.finish(time.perf_counter() - started)
    finally:
        if lock is not None:
            lock.release()
    interrupt.redeliver(run.signals.received)  # SIGTERM ends the process, after the checkpoint
    return result


def _on_main(strategy, when, fn):
    """``fn()`` here, or on rank 0 of a data-parallel run (its value and error on every rank)."""
    return fn() if strategy is None else strategy.on_main(fn, when)
