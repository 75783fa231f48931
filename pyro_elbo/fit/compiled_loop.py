"""``fit``'s loop over the fused compiled step, reading the device every N steps.

The fused step (:class:`pyro_elbo.compile.fused.FusedStep`) runs loss, gradients and the
optimizer update as one graph and leaves the loss on the device; the update is masked on device
by "this step and every earlier one were finite".  This loop therefore reads the losses and the
non-finite flag back only every :data:`READ_EVERY` steps (the progress bar's cadence), before a
checkpoint, and when the run stops, which changes nothing the user sees:

* every step's loss is in ``result.losses``;
* a non-finite step ``k`` raises :class:`~pyro_elbo.fit.loop.NonFiniteError` naming step ``k``,
  with the parameters and the optimizer's state after step ``k - 1`` (the later updates were
  masked) and the step re-run eagerly on its own random numbers to name the site;
* checkpoints hold the state at their step, as the eager loop writes them.

What needs every step's loss on the host reads every step (still one host read per step, the
update still in the graph): callbacks, ``skip_nonfinite > 0``, and a convergence rule other than
:class:`~pyro_elbo.fit.convergence.AutoConvergence` (which reads the parameters, not the loss).
"""

from __future__ import annotations

import math
import warnings

import torch

from pyro_elbo.engine.traces import forked_rng
from pyro_elbo.fit.batches import _with_batch
from pyro_elbo.fit.convergence import AutoConvergence
from pyro_elbo.fit.nan import _annotate
from pyro_elbo.fit.progress import (
    _postfix,
    _progress_bar,
    advance_bar,
    callback_stop,
)
from pyro_elbo.fit.result import FitState

__all__ = ["READ_EVERY", "fused_loop"]

#: steps between host reads of the losses and the non-finite flag
READ_EVERY = 50


class _Pending:
    """What a step that turns out non-finite needs: its random state and its arguments."""

    def __init__(self, step_fn, run):
        self.step_fn, self.run = step_fn, run
        self.rng, self.calls, self.first = [], [], run.step + 1

    def add(self, args, kwargs):
        if not self.rng:
            self.first = self.run.step + 1
        self.rng.append(torch.get_rng_state())
        self.calls.append((args, kwargs))

    def settle(self):
        """Read the pending losses into ``run.losses``; at a non-finite step skip it (within
        ``skip_nonfinite``) or raise as the eager loop does."""
        run, step_fn = self.run, self.step_fn
        values, bad = step_fn.read()
        rng, calls, first = self.rng, self.calls, self.first
        self.rng, self.calls = [], []
        if bad is None:
            run.losses.extend(values)
            return
        run.losses.extend(values[:bad])
        step = first + bad
        if len(run.skipped) < run.skip_nonfinite and bad == len(values) - 1:
            run.skipped.append(step)
            run.losses.append(values[bad])
            step_fn.forgive()
            return
        step_fn.sync()
        run.step, run.call = step, calls[bad]
        args, kwargs = calls[bad]
        with forked_rng():  # the step's gradients, as the eager guard has them to report
            torch.set_rng_state(rng[bad])
            try:
                run.objective.loss_and_grads(run.model, run.guide, *args, **kwargs)
            except Exception:  # noqa: S110  (a refusal: reported by the re-run below)
                pass
        run._raise_nonfinite(values[bad], None, rng[bad])


def fused_loop(run, bar=None):
    """The steps of ``run`` (a ``fit`` run whose ``step_fn`` is a fused step); ``bar``: the
    progress bar when the run switches to the fused step mid-way."""
    model, guide, rule, step_fn = run.model, run.guide, run.rule, run.step_fn
    batches, callbacks, losses = run.batches, run.callbacks, run.losses
    checkpoint, every, target = run.checkpoint, run.checkpoint_every, run.target
    args, kwargs = run.call
    state = FitState(losses, run.objective, run.opt.optimizer, rule, run.names)
    state._store = run.store
    if bar is None:
        bar = _progress_bar(run.show, target, run.step)
    per_step = bool(callbacks) or run.skip_nonfinite > 0 or (
        rule is not None and not isinstance(rule, AutoConvergence))
    every_read = 1 if per_step else READ_EVERY
    step_fn.bind()  # the optimizer's state as it is now (after a resume or eager steps)
    pending = _Pending(step_fn, run)
    step = run.step
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            warnings.filterwarnings("ignore", message="Encountered \\+?-?inf", category=UserWarning)
            while step < target:
                if batches is not None:
                    try:
                        batch = batches.next()
                    except StopIteration:
                        pending.settle()
                        run.stop = f"the data iterator was exhausted after {step} steps"
                        break
                    args, kwargs = run.call = _with_batch(run.args, run.kwargs, batch)
                pending.add(args, kwargs)
                try:
                    step_fn(model, guide, *args, **kwargs)
                except Exception as error:
                    _annotate(error, step + 1)
                    raise
                run.step = step = step + 1
                if step % every_read == 0 or step == target:
                    pending.settle()
                value = losses[-1] if per_step else math.nan  # AutoConvergence reads no loss
                finished = rule is not None and rule.update(step, value)
                run.torn = False
                if checkpoint is not None and step % every == 0 and not finished:
                    pending.settle()
                    step_fn.sync()
                    run.save()
                if callbacks:
                    step_fn.sync()
                    stop = callback_stop(callbacks, state, step, value)
                    if stop and not finished:
                        run.stop = stop
                        break
                advance_bar(bar, step, losses, rule)
                if finished:
                    pending.settle()
                    break
                if run.signals.received is not None:
                    pending.settle()
                    run.stopped_by = run.signals.name
                    run.stop = f"interrupted ({run.signals.name}) after {step} steps"
                    warnings.warn(f"fit: {run.stop}; checkpointing and returning the state "
                                  "reached", stacklevel=4)
                    break
                run.torn = True
            run.torn = False
    except KeyboardInterrupt:
        pending.settle()
        run.step = len(losses)
        run.stop = f"interrupted (KeyboardInterrupt) after {run.step} steps" + (
            "; mid-step, so the checkpoint keeps the last state written" if run.torn else "")
        warnings.warn(f"fit: {run.stop}; returning the state reached", stacklevel=4)
    finally:
        step_fn.sync()
        run.opt.zero_grad()
        if bar is not None:
            bar.update(run.step - bar.n)
            bar.set_postfix_str(_postfix(losses, rule), refresh=True)
            bar.close()
