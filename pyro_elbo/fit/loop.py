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
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.optim
import pyro.poutine as poutine
import torch

import pyro_elbo.fit.identity as identity
import pyro_elbo.fit.interrupt as interrupt
import pyro_elbo.fit.location as location
from pyro_elbo.fit import checkpoint as ckpt
from pyro_elbo.fit.compiling import Compiler, CompileStatus
from pyro_elbo.fit.convergence import fisher_diagonal, fisher_seed, make_rule
from pyro_elbo.fit.escalate import check_reparam, escalating_fit, noncentered
from pyro_elbo.fit.initial import LaplaceStage, check_init, default_optimizer, run_laplace
from pyro_elbo.fit.params import ParamIndex
from pyro_elbo.fit.preflight import (
    check_has_params,
    check_initial_density,
    check_model_guide,
    check_objective,
    check_optim,
    check_steps,
)

__all__ = ["DEFAULT_LR", "FitResult", "FitState", "NonFiniteError", "fit"]

#: learning rate of the default optimizer, ``torch.optim.Adam``
DEFAULT_LR = 0.01


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/inf.  Attributes: ``step`` (1-based; 0 = before step 1),
    ``sites`` (``(role, site, what)`` triples found by re-running the step's traces), ``params``
    (parameters with a non-finite gradient), ``losses`` (the losses so far)."""

    def __init__(self, message, *, step, sites=(), params=(), losses=()):
        super().__init__(message)
        self.step = step
        self.sites = list(sites)
        self.params = list(params)
        self.losses = np.asarray(losses, dtype=np.float64)


# ------------------------------------------------------------------ result


@dataclass
class FitResult:
    """What :func:`fit` returns.

    * ``losses``: the loss of every step (numpy float64; NaN/inf for skipped steps);
    * ``num_steps``: steps taken in total (including those before a resume);
    * ``converged`` and ``reason``: whether the convergence rule was met, and why (or why not);
    * ``seconds``: wall time of this call;
    * ``skipped_steps``: steps skipped by the NaN guard (``skip_nonfinite``);
    * ``diagnostics``: the convergence rule's figures (R-hat, MCSE, ESS, ``stationary_from``);
    * ``resumed_from``: the step a checkpoint was resumed from, or ``None``;
    * ``checkpoint_error``: the :class:`~pyro_elbo.fit.checkpoint.CheckpointWriteError` of a
      checkpoint that could not be written (the previous one is kept), else ``None``;
    * ``guide``, ``loss``, ``optim``: the guide fitted, the objective and the optimizer used
      (the recommended ones when ``fit`` chose them);
    * ``init``: what the stage before step 1 did (a :class:`~pyro_elbo.fit.initial.LaplaceStage`:
      ``.ran``, ``.result``, ``.message``, ``.seconds``);
    * ``compiled``: whether the steps ran on the compiled fast path (true or false), and
      ``compiled.reason``: which path and why (:class:`~pyro_elbo.fit.compiling.CompileStatus`);
    * ``num_evaluations``: log-joint gradient evaluations made, particles included (for
      ``method="svi"``: the Laplace stage's plus steps x particles);
    * ``defaults``: the objective ``fit`` chose when ``loss`` was not given, and why ("" else);
    * ``stages``, ``khat``, ``resample``: for ``fit(model, None, ...)``, what each stage of the
      escalation did (:class:`~pyro_elbo.fit.escalate.Stage`), the returned guide's PSIS k-hat,
      and ``"psis"`` when its draws are importance-resampled (:mod:`.escalate`);
    * ``model``: the model fitted (``reparam="noncentered"``: the rewritten one).
    """

    losses: np.ndarray
    num_steps: int
    converged: bool
    reason: str
    seconds: float
    skipped_steps: tuple = ()
    diagnostics: dict = field(default_factory=dict)
    resumed_from: int | None = None
    checkpoint_error: Exception | None = None
    guide: object = None
    loss: object = None
    optim: object = None
    init: object = None
    compiled: object = False
    num_evaluations: int = 0
    defaults: str = ""
    stages: list = field(default_factory=list)
    khat: float = math.nan
    resample: str | None = None
    model: object = None

    def to_inference_data(self, *args, num_samples: int = 1000, **kwargs):
        """ArviZ data from the fitted guide (:func:`pyro_elbo.to_inference_data`), PSIS-
        resampled when ``self.resample == "psis"``; ``args`` are the model's arguments."""
        from pyro_elbo.fit.escalate import to_inference_data

        return to_inference_data(self, *args, num_samples=num_samples, **kwargs)

    def __repr__(self):
        last = f", final loss {self.losses[-1]:.6g}" if len(self.losses) else ""
        return (
            f"FitResult(num_steps={self.num_steps}, converged={self.converged}, "
            f"seconds={self.seconds:.3g}{last}, reason={self.reason!r})"
        )

    def plot(self, ax=None):
        """The losses relative to the final value, with a running mean, the averaged window,
        skipped steps and the Laplace stage marked (:mod:`pyro_elbo.fit.plot`).

        Returns a ``matplotlib.figure.Figure`` (drawn on ``ax`` when given).
        """
        from pyro_elbo.fit.plot import plot_fit

        return plot_fit(self, ax)


class FitState:
    """What callbacks receive after each step: ``step``, ``loss``, ``losses`` (the live list),
    ``status`` (the convergence status), ``objective``, ``optimizer`` and ``params`` (a dict of
    the constrained parameter values).  A callback that returns ``True`` stops the run."""

    __slots__ = ("step", "loss", "losses", "objective", "optimizer", "_rule", "_names", "_store")

    def __init__(self, losses, objective, optimizer, rule, names):
        self.step, self.loss, self.losses = 0, float("nan"), losses
        self.objective, self.optimizer, self._rule, self._names = objective, optimizer, rule, names

    @property
    def status(self) -> str:
        return self._rule.status if self._rule is not None else ""

    @property
    def params(self) -> dict:
        store = getattr(self, "_store", None) or pyro.get_param_store()
        return {name: store[name] for name in self._names}


# ------------------------------------------------------------------ optimizers


class _TorchOptimizer:
    """One torch optimizer over all parameters."""

    kind = "torch"

    def __init__(self, spec, leaves, names):
        if spec is None:
            self.optimizer = torch.optim.Adam(leaves, lr=DEFAULT_LR)
        elif isinstance(spec, torch.optim.Optimizer):
            held = {id(p) for group in spec.param_groups for p in group["params"]}
            missing = [n for n, leaf in zip(names, leaves) if id(leaf) not in held]
            if missing:
                raise ValueError(
                    f"fit: optim is a {type(spec).__name__} instance that does not hold the "
                    f"parameters {missing[:6]}; pass the class ({type(spec).__name__}) or "
                    f"functools.partial({type(spec).__name__}, lr=...) and fit builds it over "
                    "every parameter."
                )
            self.optimizer = spec
        else:
            self.optimizer = spec(leaves)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def add(self, leaves):
        self.optimizer.add_param_group({"params": list(leaves)})

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


class _PyroOptimizer:
    """A ``pyro.optim.PyroOptim`` (one torch optimizer per parameter, state keyed by name)."""

    kind = "pyro"

    def __init__(self, optim, leaves):
        self.optimizer = optim
        self.leaves = list(leaves)

    def step(self):
        self.optimizer(self.leaves)

    def zero_grad(self):
        for leaf in self.leaves:
            leaf.grad = None

    def add(self, leaves):
        self.leaves.extend(leaves)

    def state_dict(self):
        return self.optimizer.get_state()

    def load_state_dict(self, state):
        # optimizers already built for these leaves would never consume the pending state
        for leaf in self.leaves:
            self.optimizer.optim_objs.pop(leaf, None)
            self.optimizer.grad_clip.pop(leaf, None)
        self.optimizer.set_state(state)


def _make_optimizer(spec, leaves, names):
    if isinstance(spec, pyro.optim.PyroOptim):
        return _PyroOptimizer(spec, leaves)
    return _TorchOptimizer(spec, leaves, names)


# ------------------------------------------------------------------ data batches


class _Batches:
    """Cycle over an iterable of batches, one per step, re-iterating it each epoch.

    The random state at the start of each epoch is kept, so a resume can rebuild the epoch's
    iterator (a shuffling DataLoader draws its permutation then) and skip the batches used.
    """

    def __init__(self, data):
        self.data = data
        self.epoch, self.index = 0, 0
        self._iterator = None
        self._epoch_rng = None
        self._pending = None  # a one-shot iterator's first batch, taken by the checks

    def first(self):
        """The first batch, for the checks before step 1 (not consumed from the epoch)."""
        try:
            if iter(self.data) is self.data:  # a one-shot iterator: keep the batch
                self._start()
                self._pending = next(self._iterator)
                return self._pending
            return next(iter(self.data))
        except StopIteration:
            raise ValueError("fit: data yielded no batches") from None

    def next(self):
        if self._pending is not None:
            batch, self._pending = self._pending, None
            self.index += 1
            return batch
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if iter(self.data) is self.data:
                raise  # a one-shot iterator is exhausted
            self.epoch += 1
            self._start()
            batch = next(self._iterator)
        self.index += 1
        return batch

    def _start(self):
        self._epoch_rng = ckpt.get_rng_state()
        self.index = 0
        self._iterator = iter(self.data)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state):
        self.epoch, self._epoch_rng = int(state["epoch"]), state["epoch_rng"]
        self._iterator = None
        if self._epoch_rng is None:
            return
        ckpt.set_rng_state(self._epoch_rng)
        self._iterator = iter(self.data)
        for _ in range(int(state["index"])):
            next(self._iterator)
        self.index = int(state["index"])


def _with_batch(args, kwargs, batch):
    if isinstance(batch, dict):
        return args, {**kwargs, **batch}
    if isinstance(batch, (tuple, list)):
        return args + tuple(batch), kwargs
    return args + (batch,), kwargs


# ------------------------------------------------------------------ NaN diagnosis


def _objective_traces(objective, model, guide, args, kwargs):
    """(model_trace, guide_trace) pairs as the objective draws them, with log-densities."""
    from pyro_elbo.objectives.base import ParticleObjective

    if isinstance(objective, ParticleObjective):
        particles = objective.run_particles(
            model, guide, args, kwargs, **objective._engine_options(True)
        )
        return list(zip(particles.model_traces, particles.guide_traces))
    if hasattr(objective, "_get_traces"):
        return list(objective._get_traces(model, guide, args, kwargs))
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return [(model_trace, guide_trace)]


def _site_log_prob(site):
    log_prob = site.get("log_prob")
    if log_prob is None:
        try:
            log_prob = site["fn"].log_prob(site["value"])
        except Exception:
            return None
    return log_prob if isinstance(log_prob, torch.Tensor) else None


def _find_nonfinite(objective, model, guide, args, kwargs, rng_state, leaves):
    """Re-run the step's traces from ``rng_state``; return ``(sites, note)``: the sites whose
    sample, log-density or log-density gradient is non-finite, as ``(role, name, what)``."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    note = ""
    with torch.random.fork_rng(devices=devices), poutine.block():
        traces = None
        for validate in (True, False):
            torch.set_rng_state(rng_state)
            try:
                with pyro.validation_enabled(validate and pyro.infer.util.is_validation_enabled()):
                    traces = _objective_traces(objective, model, guide, args, kwargs)
                break
            except Exception as error:  # e.g. a distribution refusing a NaN parameter
                note = f"{type(error).__name__}: {error}".splitlines()[0]
        if traces is None:
            return [], note
        found = []
        for model_trace, guide_trace in traces:
            for role, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or name in {f[1] for f in found}:
                        continue
                    value = site["value"]
                    if site["is_observed"] and _has_nonfinite(value):
                        found.append((role, name, DATA_NONFINITE))
                        continue
                    if (
                        not site["is_observed"]
                        and isinstance(value, torch.Tensor)
                        and value.is_floating_point()
                        and not bool(torch.isfinite(value).all())
                    ):
                        found.append((role, name, "sample value is non-finite"))
                        continue
                    log_prob = _site_log_prob(site)
                    if log_prob is not None and not bool(torch.isfinite(log_prob).all()):
                        found.append((role, name, f"log-density is {_kind(log_prob)}"))
        if found:
            return found, note
        # every log-density is finite: look for one whose gradient is not
        live = [leaf for leaf in leaves if leaf.requires_grad]
        for model_trace, guide_trace in traces:
            for role, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample":
                        continue
                    log_prob = _site_log_prob(site)
                    if log_prob is None or not log_prob.requires_grad:
                        continue
                    grads = torch.autograd.grad(
                        log_prob.sum(), live, retain_graph=True, allow_unused=True
                    )
                    if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
                        found.append((role, name, "log-density has a non-finite gradient"))
    return found, note


#: what :func:`_find_nonfinite` says of an observed site whose data hold NaN/inf
DATA_NONFINITE = "the observed data hold NaN/inf"


def _has_nonfinite(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _kind(tensor):
    if bool(torch.isnan(tensor).any()):
        return "NaN"
    return "-inf" if bool((tensor == float("-inf")).any()) else "+inf"


def _nonfinite_grads(names, leaves):
    return [
        name
        for name, leaf in zip(names, leaves)
        if leaf.grad is not None and not bool(torch.isfinite(leaf.grad).all())
    ]


def _nonfinite_error(step, loss, sites, note, bad_params, losses, skipped, cause=None):
    where = "before step 1" if step == 0 else f"at step {step}"
    if cause is not None:
        first = str(cause).splitlines()[0].rstrip(":")
        what = f"a distribution refused a non-finite value ({type(cause).__name__}: {first})"
        note = ""
    elif not math.isfinite(loss):
        what = f"the loss is {loss}"
    else:
        what = f"the loss is finite but the gradient of {', '.join(bad_params[:4]) or 'a parameter'} is not"
    lines = [f"fit: non-finite values {where}: {what}."]
    if sites:
        listed = "; ".join(f"{role} site {name!r}: {text}" for role, name, text in sites[:6])
        lines.append(f"Re-running the step's traces with the same random numbers: {listed}.")
    else:
        lines.append(
            "Re-running the step's traces with the same random numbers found no site with a "
            "non-finite sample or log-density: the problem is in the objective's arithmetic "
            "(e.g. all importance weights -inf) or in randomness outside torch's generator."
        )
    if note:
        lines.append(f"(The re-run raised {note}.)")
    if bad_params and not math.isfinite(loss):
        lines.append(f"Parameters with a non-finite gradient: {', '.join(bad_params[:6])}.")
    if step > 0:
        lines.append(
            f"The parameters and optimizer state are left as they were after step {step - 1}, "
            "the last finite step."
        )
    if skipped:
        lines.append(f"Steps already skipped: {len(skipped)} ({list(skipped[:8])}).")
    data_sites = [name for _, name, text in sites if text == DATA_NONFINITE]
    if data_sites:
        lines.append(
            f"What to do: the data observed at {', '.join(map(repr, data_sites[:4]))} in this "
            "step's batch hold NaN/inf; the learning rate is not the cause. Remove or impute "
            "those rows (e.g. x[torch.isfinite(x)]), or mask them with poutine.mask / "
            "obs_mask."
        )
    else:
        lines.append(
            "What to try: a smaller learning rate; check the model for operations that fail "
            "for some latent values (log or sqrt of a value that can be negative, a scale that "
            "can reach 0, exp overflow) and constrain those latents' support; a guide "
            "initialized closer to the data (init_scale, init_loc_fn); or "
            "fit(..., skip_nonfinite=N) to skip up to N such steps."
        )
    return NonFiniteError(
        "\n".join(lines), step=step, sites=sites, params=bad_params, losses=losses
    )


def _grads_finite(leaves) -> bool:
    """Whether every gradient entry is finite: one reduction and one host sync per step (a sum
    is non-finite iff an entry is, short of overflow).  Small parameter sets are concatenated
    (fewest dispatches); large ones are reduced per tensor (no copy)."""
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    if not grads:
        return True
    if sum(g.numel() for g in grads) <= 65536:
        total = torch.cat([g.reshape(-1) for g in grads]).sum()
    else:
        total = torch.stack(torch._foreach_norm(grads)).sum()
    return math.isfinite(total.item())


# ------------------------------------------------------------------ the loop


class _Context:
    """What a convergence rule needs to see of the run."""

    def __init__(self, leaves, names, guide_names, max_steps, fisher):
        self.leaves, self.names, self.guide_names = leaves, names, guide_names
        self.max_steps, self._fisher = max_steps, fisher

    def fisher(self):
        return self._fisher()


def _show_progress(progress) -> bool:
    if progress is True or progress is False:
        return progress
    if progress == "auto":
        if "ipykernel" in sys.modules:
            return True
        stream = sys.stderr
        return bool(getattr(stream, "isatty", None) and stream.isatty())
    raise ValueError(f"fit: progress must be True, False or 'auto', got {progress!r}")


def _progress_bar(show, total, initial, desc="fit", unit="step"):
    if not show:
        return None
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


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
        BaM's fixed-point test fails): see :mod:`pyro_elbo.vi.methods`.
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
    :returns: a :class:`FitResult`.

    Ctrl-C (SIGINT) ends the run after the current step: that state is checkpointed and
    returned; SIGTERM likewise checkpoints it, then ends the process (:mod:`.interrupt`).  With
    a checkpoint, the path is checked and locked before step 1 (:mod:`.location`); a failed
    write later keeps the previous checkpoint and the result carries ``checkpoint_error``.
    """
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
    run = _Run(
        model,
        guide,
        args,
        kwargs,
        objective=None if loss is None else check_objective(loss),
        optim=check_optim(optim),
        rule=None if num_steps is not None else make_rule(convergence),
        num_steps=num_steps,
        max_steps=max_steps,
        show=_show_progress(progress),
        callbacks=callbacks,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        checkpoint_every=checkpoint_every,
        skip_nonfinite=skip_nonfinite,
        batches=_Batches(data) if data is not None else None,
        init=init,
        compile=compile,
        seed=seed,
    )
    lock = None if run.checkpoint is None else location.claim(run.checkpoint)
    try:
        if seed is not None:
            pyro.set_rng_seed(seed)
        run.prepare()
        if run.checkpoint is not None:
            location.check_space(run.checkpoint, location.estimate_bytes(run.leaves, run.target))
        if run.checkpoint is not None and resume and os.path.exists(run.checkpoint):
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


class _Run:
    """The state of one ``fit`` call: set-up, resume, the loop, checkpoints and the result."""

    def __init__(self, model, guide, args, kwargs, **settings):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        for name, value in settings.items():
            setattr(self, name, value)
        self.target = int(self.num_steps if self.num_steps is not None else self.max_steps)
        self.losses: list[float] = []
        self.skipped: list[int] = []
        self.step = 0
        self.stop = None  # why the loop ended early
        self.resumed_from = None
        self.signals = interrupt.DeferSignals()  # what fit installs around the steps
        self.torn = True  # inside a step (a KeyboardInterrupt then: keep the last checkpoint)
        self.checkpoint_error = None

    # -------------------------------------------------------------- before step 1
    def prepare(self):
        """Checks before step 1, the parameters, the optimizer and the convergence rule."""
        if self.batches is not None:
            self.call = _with_batch(self.args, self.kwargs, self.batches.first())
        else:
            self.call = (self.args, self.kwargs)
        args, kwargs = self.call
        self._choose_defaults(args, kwargs)
        model, guide, objective = self.model, self.guide, self.objective
        # the density of the guide's draw is checked after the Laplace stage, which starts from
        # the prior's mean and may move a guide whose own initialization overflows
        try:
            pre = check_model_guide(model, guide, objective, args, kwargs, check_density=False)
        except ZeroDivisionError as error:  # Pyro's plate scale N / 0 for an empty batch
            identity.raise_if_empty(error, args, kwargs)
            raise
        check_has_params(pre, guide)
        self.stage = run_laplace(
            self.init, model, guide, args, kwargs, batched=self.batches is not None
        )
        if self.stage.ran:
            check_initial_density(model, guide, args, kwargs, when="first (after the Laplace stage)")
        else:
            check_initial_density(model, guide, args, kwargs, preflight=pre)
        if self.optim is None:
            self.optim = default_optimizer(self.stage, guide)
        store = self.store = ParamIndex(pyro.get_param_store())  # + module-local parameters
        names = self._initial_evaluation(sorted({*pre.guide_params, *pre.model_params}, key=str))
        leaves = [store[name].unconstrained() for name in names]
        keep = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        self.names = [names[i] for i in keep]
        self.leaves = [leaves[i] for i in keep]
        self.opt = _make_optimizer(self.optim, self.leaves, self.names)
        self.compiler = Compiler(
            self.compile, target=self.target, batched=self.batches is not None,
            known_length=self.num_steps is not None or self.rule is None,
        )
        self.step_fn = self.compiler.start(self)
        self.guide_names = set(pre.guide_params)
        if self.rule is not None:
            self.rule.bind(self._context())
        self.identity = identity.of_run(self, pre)

    def _choose_defaults(self, args, kwargs):
        """The recommended guide and objective where the user gave none."""
        from pyro_elbo.init.defaults import recommended_guide, recommended_objective_and_reason

        if self.guide is None:
            self.guide = recommended_guide(self.model, *args, **kwargs)
        if self.objective is None:
            objective, self.defaults = recommended_objective_and_reason(self.guide, *args, **kwargs)
            self.objective = check_objective(objective)

    def _initial_evaluation(self, names):
        """Evaluate the objective once: it runs its lazy set-up (plate guessing, validation) now,
        so that a resumed run draws the same random numbers as an uninterrupted one, and it
        shows every parameter the objective reads.  A non-finite draw is retried up to
        ``skip_nonfinite`` times, then reported as :class:`NonFiniteError` at step 0."""
        args, kwargs = self.call
        for attempt in range(self.skip_nonfinite + 1):
            rng_state = torch.get_rng_state()
            refused = None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
                with poutine.trace(param_only=True) as capture:
                    try:
                        value = float(self.objective.loss(self.model, self.guide, *args, **kwargs))
                    except Exception as error:
                        refused = self._refused(error, rng_state, self._leaves_of(names))
                        if refused is None:
                            _note(error, "raised by the objective in fit's check before step 1")
                            raise
                        value = float("nan")
            if math.isfinite(value):
                self.store.add(capture.trace)
                found = {*names, *capture.trace.nodes}
                return [n for n in sorted(found, key=str) if n in self.store]
            if attempt == self.skip_nonfinite:
                if refused is not None:
                    raise _nonfinite_error(0, value, refused[1], "", [], [], [], cause=refused[0])
                sites, note = self._find(rng_state, self._leaves_of(names))
                raise _nonfinite_error(0, value, sites, note, [], [], [])
        raise AssertionError("unreachable")

    def _leaves_of(self, names):
        return [self.store[n].unconstrained() for n in names if n in self.store]

    def _context(self):
        return _Context(self.leaves, self.names, self.guide_names, self.target, self._fisher)

    def _fisher(self):
        args, kwargs = self.call
        return fisher_diagonal(
            self.guide,
            args,
            kwargs,
            self.leaves,
            num_draws=getattr(self.rule, "fisher_draws", 32),
            seed=fisher_seed(self.step),
        )

    def _find(self, rng_state, leaves):
        args, kwargs = self.call
        return _find_nonfinite(
            self.objective, self.model, self.guide, args, kwargs, rng_state, leaves
        )

    def _refused(self, error, rng_state, leaves):
        args, kwargs = self.call
        return _refused_nonfinite(
            error, self.objective, self.model, self.guide, args, kwargs, rng_state, leaves
        )

    # -------------------------------------------------------------- checkpoints
    def resume(self):
        """Restore the checkpoint; return a result if it holds a finished run, else ``None``."""
        path, rule = self.checkpoint, self.rule
        state = ckpt.load(path, required=ckpt.REQUIRED_KEYS)
        ckpt.check_fingerprint(
            state["fingerprint"], ckpt.fingerprint(self.names, self.leaves), path
        )
        if state["optim"]["kind"] != self.opt.kind:
            raise ckpt.CheckpointMismatchError(
                f"the checkpoint {path!r} holds the state of a {state['optim']['kind']} optimizer "
                f"but this run uses a {self.opt.kind} one ({type(self.opt.optimizer).__name__}); "
                "pass the same kind of optim, or resume=False to start over."
            )
        notices = identity.check_resume(self, state, path)
        with torch.no_grad():
            for name, leaf in zip(self.names, self.leaves):
                leaf.copy_(state["params"][name])
        identity.load_optimizer(self, state, path)
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"].tolist()]
        self.skipped = [int(s) for s in state["skipped"]]
        saved_rule = state.get("rule")
        if rule is not None:
            if saved_rule is not None and saved_rule["type"] == type(rule).__name__:
                rule.load_state_dict(saved_rule["state"])
            else:
                warnings.warn(
                    f"fit: the checkpoint's convergence state ({saved_rule and saved_rule['type']})"
                    f" does not match this run's rule ({type(rule).__name__}); the rule starts "
                    "afresh at the resumed step.",
                    stacklevel=3,
                )
        if self.batches is not None and state.get("data") is not None:
            identity.load_batches(self.batches, state["data"], path)
        if notices:
            warnings.warn(f"fit: resuming {path!r} at step {self.step}: {'; '.join(notices)}",
                          ckpt.ResumeNotice, stacklevel=3)
        ckpt.set_rng_state(state["rng"])  # last: the data loader's replay above draws too
        self.resumed_from = self.step
        if state["done"] and (state["converged"] or self.step >= self.target):
            if rule is not None:
                rule.finish()
            return self._result(
                bool(state["converged"]),
                f"restored from the finished checkpoint {path!r}: {state['reason']}",
                0.0,
            )
        return None

    def save(self, done=False, converged=False, reason=""):
        """Write the checkpoint; a failed write keeps the previous one, warns, and is kept in
        ``checkpoint_error`` for the result (the run and its parameters go on in memory)."""
        rule = self.rule
        if self.torn:
            return
        state = {
            "format": ckpt.FORMAT,
            "fingerprint": ckpt.fingerprint(self.names, self.leaves),
            "params": {name: leaf.detach() for name, leaf in zip(self.names, self.leaves)},
            "optim": {"kind": self.opt.kind, "state": self.opt.state_dict()},
            "rng": ckpt.get_rng_state(),
            "step": self.step,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "skipped": list(self.skipped),
            "rule": None
            if rule is None
            else {"type": type(rule).__name__, "state": rule.state_dict()},
            "data": self.batches.state_dict() if self.batches is not None else None,
            "objective": repr(self.objective),
            "run": self.identity,
            "target": self.target,
            "done": done,
            "converged": converged,
            "reason": reason,
        }
        try:
            ckpt.save_atomic(state, self.checkpoint)
        except ckpt.CheckpointWriteError as error:
            if self.checkpoint_error is None:
                warnings.warn(f"fit: {error}", RuntimeWarning, stacklevel=3)
            self.checkpoint_error = error

    # -------------------------------------------------------------- the loop
    def loop(self):
        """The steps.  Everything that can be done once is done before; names are bound to
        locals so that the per-step work is the objective, the optimizer and a few checks."""
        model, guide, objective, rule = self.model, self.guide, self.objective, self.rule
        step_fn = self.step_fn
        losses, skipped, store = self.losses, self.skipped, self.store
        batches, callbacks, opt, leaves = self.batches, self.callbacks, self.opt, self.leaves
        checkpoint, every = self.checkpoint, self.checkpoint_every
        target, skip_limit = self.target, self.skip_nonfinite
        args, kwargs = self.call
        state = FitState(losses, objective, self.opt.optimizer, rule, self.names)
        state._store = store
        bar = _progress_bar(self.show, target, self.step)
        num_in_store = len(store)
        finite = math.isfinite
        step = self.step
        grads_finite = getattr(step_fn, "grads_finite", _grads_finite)
        compile_due = self.compiler.due if self.compiler.due is not None else math.inf
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
                warnings.filterwarnings(
                    "ignore", message="Encountered \\+?-?inf", category=UserWarning
                )
                while step < target:
                    if step >= compile_due:  # compile="auto": the run is long, compile now
                        step_fn = self.step_fn = self.compiler.switch(self, step)
                        grads_finite = getattr(step_fn, "grads_finite", _grads_finite)
                        compile_due = math.inf
                    if batches is not None:
                        try:
                            batch = batches.next()
                        except StopIteration:
                            self.stop = f"the data iterator was exhausted after {step} steps"
                            break
                        args, kwargs = self.call = _with_batch(self.args, self.kwargs, batch)
                    rng_state = torch.get_rng_state()  # to re-run a failing step's draws
                    refused = None
                    try:
                        value = float(step_fn(model, guide, *args, **kwargs))
                    except Exception as error:
                        opt.zero_grad()
                        refused = self._refused(error, rng_state, leaves)
                        if refused is None:
                            _annotate(error, step + 1)
                            raise
                        value = float("nan")
                    if len(store) != num_in_store:
                        self._adopt()
                        num_in_store = len(store)
                    self.step = step = step + 1
                    if refused is None and finite(value) and grads_finite(leaves):
                        opt.step()
                    elif len(skipped) < skip_limit:
                        skipped.append(step)
                    else:
                        self._raise_nonfinite(value, refused, rng_state)
                    opt.zero_grad()
                    losses.append(value)
                    finished = rule is not None and rule.update(step, value)
                    self.torn = False
                    if checkpoint is not None and step % every == 0 and not finished:
                        self.save()  # (the end of the run is saved by finish)
                    if callbacks:
                        state.step, state.loss = step, value
                        stopping = [cb for cb in callbacks if cb(state) is True]
                        if stopping and not finished:
                            self.stop = f"stopped by the callback {_callable_name(stopping[0])}"
                            break
                    if bar is not None and step % 50 == 0:
                        bar.update(step - bar.n)
                        bar.set_postfix_str(_postfix(losses, rule), refresh=False)
                    if finished:
                        break
                    if self.signals.received is not None:  # after a whole step: consistent
                        self.stop = f"interrupted ({self.signals.name}) after {step} steps"
                        warnings.warn(f"fit: {self.stop}; checkpointing and returning the "
                                      "state reached", stacklevel=3)
                        break
                    self.torn = True  # the next step starts: torn until its bookkeeping ends
                self.torn = False
        except KeyboardInterrupt:  # mid-step (a second Ctrl-C): the last checkpoint is kept
            self.step = len(self.losses)
            self.stop = f"interrupted (KeyboardInterrupt) after {self.step} steps" + (
                "; mid-step, so the checkpoint keeps the last state written" if self.torn else "")
            self.opt.zero_grad()
            warnings.warn(f"fit: {self.stop}; returning the state reached", stacklevel=3)
        finally:
            if bar is not None:
                bar.update(self.step - bar.n)
                bar.set_postfix_str(_postfix(losses, rule), refresh=True)
                bar.close()

    def _raise_nonfinite(self, value, refused, rng_state):
        step, losses = self.step, self.losses + [value]
        refused = refused or self.compiler.refusal(self, rng_state)
        if refused is not None:
            error, sites, note = refused
            raise _nonfinite_error(
                step, value, sites, note, [], losses, self.skipped, cause=error
            ) from error
        bad = _nonfinite_grads(self.names, self.leaves)
        self.opt.zero_grad()
        sites, note = self._find(rng_state, self.leaves)
        raise _nonfinite_error(step, value, sites, note, bad, losses, self.skipped)

    def _adopt(self):
        """Parameters created after the first step join the optimizer (and reset the rule)."""
        known = set(self.names)
        new = [(n, self.store[n].unconstrained()) for n in self.store.keys() if n not in known]
        new = [(n, leaf) for n, leaf in new if leaf.requires_grad]
        if not new:
            return
        self.names.extend(n for n, _ in new)
        self.leaves.extend(leaf for _, leaf in new)
        self.opt.add([leaf for _, leaf in new])
        if self.rule is not None:
            warnings.warn(
                f"fit: new parameters appeared during the run ({[n for n, _ in new][:4]}); the "
                "convergence rule starts afresh, and a checkpoint of this run can only be "
                "resumed by a model/guide that creates them before the first step.",
                stacklevel=4,
            )
            self.rule.bind(self._context())

    # -------------------------------------------------------------- the result
    def finish(self, seconds) -> FitResult:
        rule, stop = self.rule, self.stop
        converged = bool(rule is not None and rule.converged)
        if stop is not None:
            reason = stop + (f"; {rule.reason(False)}" if rule is not None else "")
        elif converged:
            reason = rule.reason(True)
        elif self.num_steps is not None:
            reason = (
                f"ran num_steps={self.num_steps} steps (a fixed number; convergence not checked)"
            )
        elif rule is None:
            reason = f"ran max_steps={self.max_steps} steps (convergence=None)"
        else:
            reason = f"max_steps={self.max_steps} reached without convergence: {rule.reason(False)}"
        if self.checkpoint is not None:
            # the last iterate, before averaging: a longer resumed run continues exactly
            self.save(done=stop is None, converged=converged, reason=reason)
        if rule is not None:
            rule.finish()
        return self._result(converged, reason, seconds)

    def _result(self, converged, reason, seconds) -> FitResult:
        return FitResult(
            losses=np.asarray(self.losses, dtype=np.float64),
            num_steps=self.step,
            converged=converged,
            reason=reason,
            seconds=seconds,
            skipped_steps=tuple(self.skipped),
            diagnostics=self.rule.diagnostics() if self.rule is not None else {},
            resumed_from=self.resumed_from,
            checkpoint_error=self.checkpoint_error,
            guide=self.guide,
            loss=self.objective,
            optim=self.opt.optimizer,
            init=getattr(self, "stage", LaplaceStage()),
            compiled=self.compiler.status if hasattr(self, "compiler") else CompileStatus(False, ""),
            num_evaluations=self._num_evaluations(),
            defaults=getattr(self, "defaults", ""),
            model=self.model,
        )

    def _num_evaluations(self) -> int:
        stage = getattr(self, "stage", None)
        laplace = stage.result.num_evaluations if stage is not None and stage.result else 0
        return laplace + self.step * int(getattr(self.objective, "num_particles", 1) or 1)


def _callable_name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _postfix(losses, rule):
    recent = [v for v in losses[-100:] if math.isfinite(v)]
    text = f"loss {sum(recent) / len(recent):.5g}" if recent else "loss -"
    status = rule.status if rule is not None else ""
    return f"{text} | {status}" if status else text


def _note(error, text):
    if hasattr(error, "add_note"):
        error.add_note(f"({text})")


def _annotate(error, step):
    """Add the step to an error raised inside a step."""
    if hasattr(error, "add_note"):
        error.add_note(
            f"(raised by pyro_elbo.fit at step {step}; the parameters are left as they were "
            f"after step {step - 1})"
        )


def _refused_nonfinite(error, objective, model, guide, args, kwargs, rng_state, leaves):
    """A distribution that refused a non-finite parameter or value (Pyro's validation) is a
    non-finite step: return ``(error, sites, note)`` naming the sites, or ``None``."""
    if not isinstance(error, ValueError) or "invalid values" not in str(error):
        return None
    try:
        sites, note = _find_nonfinite(objective, model, guide, args, kwargs, rng_state, leaves)
    except Exception:
        sites, note = [], ""
    if sites or re.search(r"\b(nan|inf)\b", str(error)):
        return error, sites, note
    return None  # a finite value outside a support: not a NaN problem
