"""``fit``'s choice between the compiled step (:mod:`pyro_elbo.fast`) and the eager one.

``compile=True`` captures and compiles the step before step 1.  ``compile="auto"`` (the default)
compiles when the run is long enough to repay the compile (about 10 s in a fresh process with
inductor's cache warm, most of it importing inductor; 20-80 s cold on a 2-core machine):

* a run of known length (``num_steps``, or ``convergence=None``) of at least
  :data:`AUTO_MIN_STEPS` (2000) steps compiles before step 1;
* a run stopped by a convergence rule starts eager and switches once it has shown it is long:
  at step :data:`AUTO_AFTER` (2000), when at least :data:`AUTO_REMAINING` (2000) more steps may
  follow.  A fit that converges earlier never pays the compile (measured on the stress suite:
  switching at step 500 made fits that converge at 800-1700 steps 1.2-3.4x slower end to end;
  the eight-schools fits, 10,000 steps, run 2.2-2.5x faster).

The rule depends on step counts only, so a resumed run compiles from the same step as an
uninterrupted one (bit for bit on CPU).  ``compile=False`` is eager throughout.

The compiled step holds the optimizer update too when the optimizer is fit's default
``WhitenedAdam``, Adam, AdamW or ClippedAdam (:mod:`pyro_elbo.compile.fused`; the loop is then
:func:`pyro_elbo.fit.compiled_loop.fused_loop`, which reads the device every 50 steps); any other
optimizer runs eagerly after the compiled loss and gradients, and ``result.compiled.reason`` says
so.  The compiled and eager steps draw the same random numbers (:mod:`pyro_elbo.fast`), so the
switch changes speed, not the estimator.  When the step cannot be captured (a structure that
changes between runs, Python reading a tensor's value, ...), the run goes on eagerly and
``result.compiled`` says why in one line.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.poutine as poutine
import torch

from pyro_elbo.engine.traces import forked_rng

__all__ = ["AUTO_AFTER", "AUTO_MIN_STEPS", "AUTO_REMAINING", "CompileStatus", "Compiler"]

#: ``compile="auto"`` compiles a run of known length from step 1 when it has this many steps
AUTO_MIN_STEPS = 2000
#: ``compile="auto"`` switches to the compiled step at this step...
AUTO_AFTER = 2000
#: ... when at least this many more steps may follow
AUTO_REMAINING = 2000


class CompileStatus:
    """``result.compiled``: true when steps ran compiled; ``.reason`` says which and why;
    ``.from_step`` is the first compiled step (``None`` when none was)."""

    __slots__ = ("compiled", "reason", "from_step")

    def __init__(self, compiled: bool, reason: str, from_step: int | None = None):
        self.compiled, self.reason, self.from_step = bool(compiled), reason, from_step

    def __bool__(self):
        return self.compiled

    def __eq__(self, other):
        if isinstance(other, bool):
            return self.compiled is other
        if isinstance(other, CompileStatus):
            return (self.compiled, self.reason) == (other.compiled, other.reason)
        return NotImplemented

    def __hash__(self):
        return hash(self.compiled)

    def __repr__(self):
        return f"CompileStatus({self.compiled}, {self.reason!r})"


class Compiler:
    """The compile setting of one ``fit`` run: :meth:`start` before the loop gives the step
    function, :meth:`due` says at which step to call :meth:`switch`."""

    def __init__(self, setting, *, target, batched, known_length):
        if setting not in (True, False, "auto"):
            raise TypeError(f"fit: compile must be True, False or 'auto', got {setting!r}")
        self.setting, self.target, self.batched = setting, target, batched
        self.status = CompileStatus(False, "compile=False: eager steps")
        self.due = None  # the step at which "auto" switches
        if setting == "auto" and known_length:
            self.due = 0 if target >= AUTO_MIN_STEPS else None
            self.status = CompileStatus(
                False,
                f'compile="auto": eager, a run of {target} steps (compiling pays from '
                f"{AUTO_MIN_STEPS})",
            )
        elif setting == "auto":
            if target - AUTO_AFTER >= AUTO_REMAINING:
                self.due = AUTO_AFTER
                self.status = CompileStatus(
                    False,
                    f'compile="auto": eager, the run stopped before step {AUTO_AFTER} (a short '
                    "fit does not repay compiling)",
                )
            else:
                self.status = CompileStatus(
                    False,
                    f'compile="auto": eager, {target} steps at most (compiling pays from '
                    f"{AUTO_AFTER + AUTO_REMAINING})",
                )

    def start(self, run):
        """The step function before step 1 (the compiled one for ``compile=True``)."""
        if self.setting is True or self.due == 0:
            return self.switch(run, step=0)
        return run.objective.loss_and_grads

    def switch(self, run, step):
        """Capture and compile the step now: the fused step (loss, gradients and the optimizer
        update in one graph; :mod:`pyro_elbo.compile.fused`) when the optimizer can run in the
        graph, else the compiled loss and gradients with the optimizer after it, else the eager
        step (and why)."""
        from pyro_elbo.compile.capture import CaptureError
        from pyro_elbo.compile.fused import FusedStep
        from pyro_elbo.compile.optim import Unsupported
        from pyro_elbo.fast import compiled_loss_and_grads

        self.due = None
        args, kwargs = run.call
        label = "compile=True" if self.setting is True else 'compile="auto"'
        first = "step 1" if step == 0 else f"step {step + 1} (after {step} eager steps)"
        compiled, why, optimizer_note = None, "", ""
        try:
            if not all(p.is_leaf for p in run.leaves):
                raise CaptureError("a parameter is not a leaf tensor")
            from pyro_elbo.compile.capture import check_static_structure

            check_static_structure(run.model, run.guide, args, kwargs)
            if getattr(run, "strategy", None) is not None:  # gradients averaged over ranks
                raise Unsupported("a data-parallel run's all-reduce between gradients and update")
            compiled = FusedStep(run.model, run.guide, run.objective, run.names, run.leaves,
                                 run.opt, args, kwargs)
        except Unsupported as error:
            optimizer_note = (f"; the optimizer ({type(run.opt.optimizer).__name__}) runs "
                              f"eagerly after the graph because the graph cannot hold {error}")
        except CaptureError as error:
            why = str(error)
        if compiled is None and not why:
            compiled, why = compiled_loss_and_grads(
                run.model, run.guide, run.objective, run.names, run.leaves, args, kwargs,
                batched=self.batched,
            )
        if compiled is None:
            self.status = CompileStatus(False, f"{label}: eager, because {why}")
            warnings.warn(f"fit({label}): running eagerly because {why}", stacklevel=4)
            return run.objective.loss_and_grads
        what = ("loss, gradients and the optimizer update" if not optimizer_note
                else "loss and gradients")
        self.status = CompileStatus(
            True,
            f"{label}: one compiled graph per step ({compiled.backend}: {what}) from "
            f"{first}{optimizer_note}",
            from_step=step + 1,
        )
        return compiled

    def refusal(self, run, rng_state):
        """On a non-finite compiled step: re-run the step eagerly from ``rng_state`` (same
        draws), so that a distribution refusing a non-finite value under Pyro's validation
        (which the graph does not run) is reported as the eager path reports it."""
        if not self.status.compiled or not pyro.infer.util.is_validation_enabled():
            return None
        args, kwargs = run.call
        with forked_rng(), poutine.block(), torch.no_grad():
            torch.set_rng_state(rng_state)
            try:
                run.objective.loss(run.model, run.guide, *args, **kwargs)
            except ValueError as error:
                return run._refused(error, rng_state, run.leaves)
        return None
