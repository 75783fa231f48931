"""The fused step: loss, gradients and the optimizer update as one compiled graph.

Each call of :class:`FusedStep` runs one compiled graph of
``(parameters, optimizer state, flags, data)`` that computes the loss and its gradients
(:func:`~.capture.capture`), then the optimizer update (:class:`~.optim.OptimizerPlan`, or
:class:`~.whitened.WhitenedPlan` for ``fit``'s default ``WhitenedAdam``) in place, masked by
``ok = finite and no earlier step was non-finite``.  Nothing is read back to the host: the call returns the loss as a device tensor, and two device flags record the number
of calls and the first call whose loss or gradient was non-finite.  :meth:`FusedStep.read`
reads the pending losses and that flag in one host read, so a loop can check every N steps:
when it finds a non-finite step ``k``, the parameters and the optimizer's state are those after
step ``k - 1`` (every later update was masked), exactly where the eager NaN guard stops.

One graph per argument signature (the data's shapes), as :class:`~.graphs.CompiledLossAndGrads`;
a signature that cannot be captured runs the eager objective and optimizer for that call.
"""

from __future__ import annotations

import math
import warnings

import torch

from pyro_elbo.compile.capture import (
    CaptureError,
    cached_graph,
    capture,
    compile_graph,
    signature,
    tensors,
)
from pyro_elbo.compile.graphs import default_backend
from pyro_elbo.compile.whitened import make_plan

__all__ = ["FusedStep"]


class FusedStep:
    """One compiled graph per step for ``(model, guide, objective)`` with the optimizer inside.

    :param adapter: ``fit``'s optimizer adapter (see :class:`~.optim.OptimizerPlan`).
    :raises CaptureError: when the first call's step cannot be captured.
    :raises Unsupported: when the optimizer cannot run inside the graph.
    """

    fused = True

    def __init__(self, model, guide, objective, names, leaves, adapter, args, kwargs, *,
                 backend=None):
        self.model, self.guide, self.objective, self.adapter = model, guide, objective, adapter
        self.names = list(names)
        self.params = list({id(leaf): leaf for leaf in leaves}.values())
        self.plan = make_plan(adapter, self.params)
        self.backend = backend or default_backend()
        self.flags = torch.zeros(2, dtype=torch.float64, device=self.params[0].device)
        self.calls = 0  # == flags[0]: calls of the step since it was built
        self.read_calls = 0  # calls whose losses were read
        self.pending = []  # the device losses of the calls not yet read
        self._entries, self.fallbacks = {}, {}
        self._used, self._state = None, None
        self._build(signature(args, kwargs), args, kwargs, strict=True)

    @property
    def num_graphs(self) -> int:
        return sum(entry is not None for entry in self._entries.values())

    # -------------------------------------------------------------- build
    def _placeholders(self):
        """Stand-ins for the optimizer state while capturing (the graph sees shapes only)."""
        return [*self.plan.placeholders(), self.flags.clone()]

    def _graph_update(self, params, grads, loss, finite, extra):
        flags, state = extra[-1], extra[:-1]
        count, clean = flags[0] + 1, flags[1] == 0
        self.plan.update(params, grads, finite & clean, state)
        bad = torch.where(clean & ~finite, count, flags[1])
        flags.copy_(torch.stack([count, bad]))
        return (torch.stack([loss.to(flags.dtype), bad]),)

    def _build(self, key, args, kwargs, strict=False):
        extra = self._placeholders()
        try:
            graph, index = capture(self.objective, self.model, self.guide, self.names,
                                   self.params, args, kwargs, extra=extra,
                                   update=self._graph_update)
            inputs = [*self.params, *extra, *tensors(args, kwargs)]
            fn = compile_graph(graph, inputs, self.backend, mutated=len(self.params) + len(extra))
        except CaptureError as error:
            if strict:
                raise
            warnings.warn(f"compiled step: the call with argument shapes {key} runs eagerly "
                          f"because {error}", stacklevel=4)
            self.fallbacks[key] = str(error)
            fn = index = None
        self._entries[key] = fn
        if index is not None and (self._used is None or not set(index) <= set(self._used)):
            self._used = sorted(set(index) | set(self._used or ()))
            if self._state is not None:  # the device's step counts into the optimizer first
                self.plan.sync()
            self._state = None  # bound again at the next call
        return fn

    def bind(self):
        """Take the optimizer's state as it is now (after a resume, or eager steps)."""
        self._state = self.plan.bind(self._used)

    # -------------------------------------------------------------- steps
    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """One step; returns ``[loss, first non-finite call (0: none)]`` as a float64 device
        tensor (no host read)."""
        fn = cached_graph(self._entries, self._build, args, kwargs)
        if self._state is None:
            self.bind()
        self.calls += 1
        self.plan.before_call()
        if fn is None:
            status = self._eager(args, kwargs)
        else:
            with torch.no_grad():
                (status,) = fn(*self.params, *self._state, self.flags, *tensors(args, kwargs))
        self.pending.append(status)
        return status

    def _eager(self, args, kwargs):
        """A call whose signature could not be captured: the eager objective and optimizer,
        with the same flags."""
        self.plan.sync()
        adapter = self.adapter
        value = self.objective.loss_and_grads(self.model, self.guide, *args, **kwargs)
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = math.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in grads)
        clean = float(self.flags[1]) == 0
        if finite and clean:
            adapter.step()
        adapter.zero_grad()
        self.flags[0] += 1
        if clean and not finite:
            self.flags[1] = self.flags[0]
        self.bind()
        value = torch.as_tensor(value, dtype=torch.float64, device=self.flags.device)
        return torch.stack([value, self.flags[1].clone()])

    def read(self):
        """``(losses, first_bad)``: the losses of the calls since the last read, and the index
        (into those losses) of the first non-finite call, or ``None``.  One host read."""
        rows = torch.stack(self.pending).tolist() if self.pending else []
        losses = [row[0] for row in rows]
        bad = rows[-1][1] if rows else 0.0
        first = int(bad) - self.read_calls - 1 if bad else None
        self.read_calls, self.pending = self.calls, []
        return losses, (first if first is not None and first >= 0 else None)

    def read_last(self):
        """``(loss, finite)`` of the last call (every earlier one read or forgiven), and forget
        the pending ones: one host read."""
        value, bad = self.pending[-1].tolist()
        self.read_calls, self.pending = self.calls, []
        return value, not bad

    def forgive(self):
        """Clear the non-finite flag (the loop skipped that step): later steps update again."""
        self.flags[1] = 0

    def sync(self):
        """Write the optimizer's step counts and learning rates back (for its ``state_dict``)."""
        self.plan.sync()
