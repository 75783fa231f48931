"""The state of one :func:`~pyro_elbo.fit.fit` call and its steps: set-up before step 1 (checks,
defaults, the Laplace stage, parameters, optimizer, compiled step, convergence rule), the loop
(objective, NaN/inf guard, optimizer step, rule, checkpoints, callbacks, progress, signals) and
the result."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

import pyro_elbo.fit.identity as identity
import pyro_elbo.fit.interrupt as interrupt
import pyro_elbo.fit.saving as saving
from pyro_elbo.fit.batches import _with_batch
from pyro_elbo.fit.compiled_loop import fused_loop
from pyro_elbo.fit.compiling import Compiler, CompileStatus
from pyro_elbo.fit.convergence import fisher_diagonal, fisher_seed
from pyro_elbo.fit.data_parallel import data_parallel_stage
from pyro_elbo.fit.initial import LaplaceStage, default_optimizer, run_laplace
from pyro_elbo.fit.nan import (
    _annotate,
    _find_nonfinite,
    _grads_finite,
    _nonfinite_error,
    _nonfinite_grads,
    _note,
    _refused_nonfinite,
)
from pyro_elbo.fit.optimizers import _make_optimizer
from pyro_elbo.fit.params import ParamIndex
from pyro_elbo.fit.preflight import (
    check_has_params,
    check_initial_density,
    check_model_guide,
    check_objective,
)
from pyro_elbo.fit.progress import (
    _postfix,
    _progress_bar,
    advance_bar,
    callback_stop,
)
from pyro_elbo.fit.result import FitResult, FitState

__all__ = []


class _Context:
    """What a convergence rule needs to see of the run."""

    def __init__(self, leaves, names, guide_names, max_steps, fisher):
        self.leaves, self.names, self.guide_names = leaves, names, guide_names
        self.max_steps, self._fisher = max_steps, fisher

    def fisher(self):
        return self._fisher()



class _Run:
    """The state of one ``fit`` call: set-up, resume, the loop, checkpoints and the result."""

    def __init__(self, model, guide, args, kwargs, **settings):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.strategy = None  # a data-parallel run's collectives (:mod:`.data_parallel`)
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
        self.stopped_by = ""  # the signal that stopped the run

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
        ) if self.strategy is None else data_parallel_stage(self.init)
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
        fisher = fisher_diagonal(
            self.guide,
            args,
            kwargs,
            self.leaves,
            num_draws=getattr(self.rule, "fisher_draws", 32),
            seed=fisher_seed(self.step),
        )
        return fisher if self.strategy is None else self.strategy.average(fisher)

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
        """Restore the checkpoint (:func:`.saving.resume`); a result if it holds a finished run."""
        return saving.resume(self)

    def save(self, done=False, converged=False, reason=""):
        """Write the checkpoint (:func:`.saving.save`)."""
        saving.save(self, done, converged, reason)

    # -------------------------------------------------------------- the loop
    def loop(self):
        """The steps.  Everything that can be done once is done before; names are bound to
        locals so that the per-step work is the objective, the optimizer and a few checks."""
        model, guide, objective, rule = self.model, self.guide, self.objective, self.rule
        step_fn = self.step_fn
        if getattr(step_fn, "fused", False):  # the optimizer in the graph: read every N steps
            return fused_loop(self)
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
        strategy, signalled = self.strategy, False
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
                        if getattr(step_fn, "fused", False):
                            bar, handoff = None, bar
                            return fused_loop(self, handoff)
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
                            if strategy is not None:
                                strategy.fail(step + 1, error)  # the other ranks raise too
                            raise
                        value = float("nan")
                    if len(store) != num_in_store:
                        self._adopt()
                        num_in_store = len(store)
                    if strategy is not None:  # gradients and loss averaged over ranks
                        value, signalled = strategy.reduce(
                            value, refused is not None, self.signals.received is not None)
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
                        stop = callback_stop(callbacks, state, step, value, strategy)
                        if stop and not finished:
                            self.stop = stop
                            break
                    advance_bar(bar, step, losses, rule)
                    if finished:
                        break
                    if strategy is None:
                        signalled = self.signals.received is not None
                    if signalled:  # after a whole step: consistent (on every rank)
                        self.stopped_by = self.signals.name or "a signal on another rank"
                        self.stop = f"interrupted ({self.stopped_by}) after {step} steps"
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
            raise self._ranks(_nonfinite_error(
                step, value, sites, note, [], losses, self.skipped, cause=error
            )) from error
        bad = _nonfinite_grads(self.names, self.leaves)
        self.opt.zero_grad()
        sites, note = self._find(rng_state, self.leaves)
        raise self._ranks(_nonfinite_error(step, value, sites, note, bad, losses, self.skipped))

    def _ranks(self, error):
        return error if self.strategy is None else self.strategy.explain(error)

    def _adopt(self):
        """Parameters created after the first step join the optimizer (and reset the rule)."""
        known = set(self.names)
        new = [(n, self.store[n].unconstrained()) for n in self.store.keys() if n not in known]
        new = [(n, leaf) for n, leaf in new if leaf.requires_grad]
        if not new:
            return
        if self.strategy is not None:
            error = RuntimeError(
                f"fit: new parameters appeared at step {self.step + 1} ({[n for n, _ in new][:4]}); "
                "a data-parallel run needs every parameter created before step 1."
            )
            self.strategy.fail(self.step + 1, error)
            raise error
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
            distributed=None if self.strategy is None else self.strategy.ctx,
        )

    def _num_evaluations(self) -> int:
        stage = getattr(self, "stage", None)
        laplace = stage.result.num_evaluations if stage is not None and stage.result else 0
        return laplace + self.step * int(getattr(self.objective, "num_particles", 1) or 1)
