"""``fit``'s optimizer adapters: one interface (``step``, ``zero_grad``, ``add``, ``state_dict``)
over a torch optimizer built over every parameter and a ``pyro.optim.PyroOptim`` (one torch
optimizer per parameter, its state keyed by name)."""

from __future__ import annotations

import pyro.optim
import torch

__all__ = ["DEFAULT_LR", "Scheduled"]

#: learning rate of the default optimizer, ``torch.optim.Adam``
DEFAULT_LR = 0.01


class Scheduled:
    """``optim=Scheduled(optimizer, scheduler)``: a torch optimizer (a class, a
    ``functools.partial`` of one, or a callable ``params -> torch.optim.Optimizer``) built over
    every parameter, and a learning-rate scheduler built on it (a callable ``optimizer ->
    LRScheduler``), stepped after every optimizer step; both states are checkpointed."""

    def __init__(self, optimizer, scheduler):
        if not callable(optimizer) or not callable(scheduler):
            raise TypeError("Scheduled(optimizer, scheduler) takes two callables: params -> "
                            "torch optimizer, and optimizer -> LR scheduler")
        self.optimizer, self.scheduler = optimizer, scheduler


class _TorchOptimizer:
    """One torch optimizer over all parameters."""

    kind = "torch"

    def __init__(self, spec, leaves, names):
        self.scheduler = None
        if isinstance(spec, Scheduled):
            self.optimizer = spec.optimizer(leaves)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "fit: optim must build a torch.optim.Optimizer from the parameters (e.g. "
                    "lambda p: torch.optim.SGD(p, lr=0.1)); it returned a "
                    f"{type(self.optimizer).__name__}"
                )
            self.scheduler = spec.scheduler(self.optimizer)
        elif spec is None:
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
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def add(self, leaves):
        self.optimizer.add_param_group({"params": list(leaves)})

    def state_dict(self):
        state = self.optimizer.state_dict()
        if self.scheduler is not None:
            state = {**state, "scheduler": self.scheduler.state_dict()}
        return state

    def load_state_dict(self, state):
        state = dict(state)
        scheduler = state.pop("scheduler", None)
        self.optimizer.load_state_dict(state)
        if self.scheduler is not None and scheduler is not None:
            self.scheduler.load_state_dict(scheduler)


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
    if isinstance(spec, Scheduled) and isinstance(spec.optimizer, pyro.optim.PyroOptim):
        raise ValueError("fit: a scheduler works with torch optimizers; a PyroOptim carries its "
                         "own schedule (e.g. ClippedAdam's lrd)")
    if isinstance(spec, pyro.optim.PyroOptim):
        return _PyroOptimizer(spec, leaves)
    return _TorchOptimizer(spec, leaves, names)
