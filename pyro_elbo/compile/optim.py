r"""Adam and ClippedAdam as graph ops over the optimizer's own state, for the fused step.

The compiled step (:mod:`.fused`) runs the optimizer update inside its graph.  This module
writes the update of ``fit``'s optimizers as plain tensor ops, per parameter ``p`` with gradient
``g``, first moment ``m``, second moment ``v``, step count ``t`` and learning rate ``lr``:

* ``torch.optim.Adam`` (Kingma & Ba 2015, "Adam: a method for stochastic optimization", ICLR;
  torch's single-tensor form): ``g <- g + wd p``; ``m <- lerp(m, g, 1 - b1)``;
  ``v <- b2 v + (1 - b2) g^2``; ``t <- t + 1``;
  ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.  ``AdamW``
  (``decoupled_weight_decay``) scales ``p`` by ``1 - lr wd`` instead of adding to ``g``.
* Pyro's ``ClippedAdam``: ``lr <- lr * lrd``; ``g <- clamp(g, +-clip_norm)``, ``+ wd p``;
  ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g'^2`` (``g' = g - m`` with
  ``centered_variance``); ``p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.

Both as ``fit`` holds them (``pyro_elbo.fit.loop``'s adapters): one torch optimizer over every
parameter, or a ``pyro.optim`` wrapper with one per parameter.  ``m`` and ``v`` are the
optimizer's own state tensors (the graph updates them in place), so ``state_dict()`` holds them
as the eager step would; the step counts and learning rates live on the device during the run
(:attr:`OptimizerPlan.scalars`) and are written back by :meth:`OptimizerPlan.sync`.  Every
update is masked: ``where(ok, new, old)``, so a non-finite step changes nothing.

``fit``'s default ``WhitenedAdam`` is :mod:`.whitened`'s (its other parameters' plain Adam is
this module's).  Any other optimizer (or option: ``amsgrad``, ``maximize``, gradient clipping by
``clip_args``, a learning-rate scheduler) raises :class:`Unsupported`; the step then runs the
optimizer eagerly.
"""

from __future__ import annotations

import torch
from pyro.optim.clipped_adam import ClippedAdam

__all__ = ["OptimizerPlan", "Unsupported"]


class Unsupported(Exception):
    """The optimizer cannot run inside the graph; ``str(error)`` says why."""


def _adam_rule(optimizer, group):
    if isinstance(group["lr"], torch.Tensor):
        raise Unsupported("a tensor learning rate")
    for option in ("amsgrad", "maximize", "differentiable"):
        if group.get(option):
            raise Unsupported(f"Adam's {option}=True")
    decoupled = bool(group.get("decoupled_weight_decay", False))
    b1, b2 = group["betas"]
    return ("adam", float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            decoupled)


def _clipped_rule(optimizer, group):
    b1, b2 = group["betas"]
    return ("clipped", float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            float(group["clip_norm"]), float(group["lrd"]), bool(group["centered_variance"]))


def _rule_of(optimizer, leaf):
    """``(rule, group)`` of ``leaf`` in the torch optimizer ``optimizer``."""
    group = next(g for g in optimizer.param_groups if any(p is leaf for p in g["params"]))
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return _adam_rule(optimizer, group), group
    if kind is ClippedAdam:
        return _clipped_rule(optimizer, group), group
    raise Unsupported(f"{kind.__name__} is not one of the optimizers the graph holds "
                      "(torch.optim.Adam/AdamW, Pyro's Adam/ClippedAdam)")


def _torch_optimizers(adapter, leaves, own_step=False):
    """The torch optimizer of each leaf, as ``fit``'s adapter would step it (``own_step``: a
    ``PyroOptim`` subclass's plain per-parameter optimizers, for the parameters it does not step
    its own way)."""
    if getattr(adapter, "scheduler", None) is not None:  # stepped by the adapter after each step
        raise Unsupported(f"a learning-rate scheduler ({type(adapter.scheduler).__name__})")
    if adapter.kind == "torch":
        return [adapter.optimizer] * len(leaves)
    optim = adapter.optimizer  # a pyro.optim.PyroOptim: one optimizer per leaf, made lazily
    import pyro
    from pyro.optim.optim import PyroOptim, _load_state_dict

    if type(optim) is not PyroOptim and not own_step:  # a subclass steps its own way (e.g. WhitenedAdam)
        raise Unsupported(f"{type(optim).__name__}'s own step")

    found = []
    for leaf in adapter.leaves:  # as PyroOptim.__call__ makes them, for every leaf it steps
        if leaf not in optim.optim_objs:
            made = optim.optim_objs[leaf] = optim._get_optim(leaf)
            optim.grad_clip[leaf] = optim._get_grad_clip(leaf)
            name = pyro.get_param_store().param_name(leaf)
            state = optim._state_waiting_to_be_consumed.pop(name, None)
            if state is not None:
                _load_state_dict(made, state)
    for leaf in leaves:
        if optim.grad_clip.get(leaf) is not None:
            raise Unsupported("the optimizer clips gradients (clip_args)")
        made = optim.optim_objs[leaf]
        if not isinstance(made, torch.optim.Optimizer):
            raise Unsupported(f"a learning-rate scheduler ({type(made).__name__})")
        found.append(made)
    return found


class OptimizerPlan:
    """The optimizer update of ``leaves`` as graph ops (see the module's docstring).

    :param adapter: ``fit``'s optimizer adapter (``kind`` ``"torch"`` or ``"pyro"``,
        ``optimizer``; the ``"pyro"`` one has ``leaves``).
    :raises Unsupported: when the optimizer cannot run inside the graph.
    """

    def __init__(self, adapter, leaves, *, own_step=False):
        self.adapter, self.leaves, self.own_step = adapter, list(leaves), own_step
        self._resolve()
        self.name = ", ".join(sorted({type(o).__name__ for o in self.optimizers}))
        self.scalars = None
        self.used = []

    def _resolve(self):
        """The torch optimizer, update rule and parameter group of each leaf (again after a
        resume: ``load_state_dict`` may replace a ``pyro.optim`` wrapper's optimizers)."""
        self.optimizers = _torch_optimizers(self.adapter, self.leaves, self.own_step)
        found = [_rule_of(o, leaf) for o, leaf in zip(self.optimizers, self.leaves)]
        self.rules = [rule for rule, _ in found]
        self.groups = [group for _, group in found]

    # -------------------------------------------------------------- state
    def placeholders(self):
        """Stand-ins for :meth:`bind`'s state while capturing (the graph sees shapes only)."""
        zeros = [torch.zeros_like(p, requires_grad=False) for p in self.leaves]
        scalars = torch.zeros(2, len(self.leaves), dtype=torch.float64,
                              device=self.leaves[0].device)
        return [*zeros, *[z.clone() for z in zeros], scalars]

    def before_call(self):
        """Nothing to do on the host before a call."""

    def bind(self, used):
        """The state tensors for the graph's inputs: ``[*m, *v, scalars]`` with one ``m`` and
        ``v`` per leaf (the optimizer's own, made as it makes them when missing; a placeholder
        for a leaf without gradient) and ``scalars[0]`` the step counts, ``scalars[1]`` the
        learning rates (float64, on the leaves' device)."""
        self.used = list(used)
        self._resolve()
        ms, vs, steps, lrs = [], [], [], []
        for i, (leaf, optimizer, rule, group) in enumerate(
            zip(self.leaves, self.optimizers, self.rules, self.groups)
        ):
            if i not in self.used:
                ms.append(torch.zeros_like(leaf, requires_grad=False))
                vs.append(torch.zeros_like(leaf, requires_grad=False))
                steps.append(0.0)
                lrs.append(0.0)
                continue
            state = optimizer.state[leaf]
            if len(state) == 0:
                self._initial_state(state, leaf, rule)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            steps.append(float(state["step"]))
            lrs.append(float(group["lr"]))
        device = self.leaves[0].device
        self.scalars = torch.tensor([steps, lrs], dtype=torch.float64, device=device)
        return [*ms, *vs, self.scalars]

    @staticmethod
    def _initial_state(state, leaf, rule):
        if rule[0] == "clipped":
            state["step"] = 0
        else:
            from torch.optim.optimizer import _get_scalar_dtype

            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        state["exp_avg"] = torch.zeros_like(leaf, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(leaf, memory_format=torch.preserve_format)

    def sync(self):
        """Write the device's step counts and learning rates back into the optimizers' state
        (one host read), as the eager optimizer holds them."""
        if self.scalars is None:
            return
        steps, lrs = self.scalars.tolist()
        for i in self.used:
            state, rule, group = self.optimizers[i].state[self.leaves[i]], self.rules[i], self.groups[i]
            if rule[0] == "clipped":
                state["step"] = int(steps[i])
                group["lr"] = lrs[i]
            else:
                state["step"].fill_(steps[i])

    # -------------------------------------------------------------- the update, as graph ops
    def update(self, params, grads, ok, state):
        """Update ``params`` and ``state`` (as :meth:`bind` lists it) in place where ``ok``."""
        count = len(params)
        ms, vs, scalars = state[:count], state[count : 2 * count], state[2 * count]
        new_steps, new_lrs = list(scalars[0].unbind()), list(scalars[1].unbind())
        for i, g in enumerate(grads):
            if g is None:
                continue
            p, m, v, t, lr = params[i], ms[i], vs[i], scalars[0, i] + 1, scalars[1, i]
            if self.rules[i][0] == "adam":
                p_new, m_new, v_new = _adam(p, g, m, v, t, lr, *self.rules[i][1:])
            else:
                lr = lr * self.rules[i][6]
                p_new, m_new, v_new = _clipped(p, g, m, v, t, lr, *self.rules[i][1:])
            p.copy_(torch.where(ok, p_new, p))
            m.copy_(torch.where(ok, m_new, m))
            v.copy_(torch.where(ok, v_new, v))
            new_steps[i], new_lrs[i] = t, lr
        fresh = torch.stack([torch.stack(new_steps), torch.stack(new_lrs)])
        scalars.copy_(torch.where(ok, fresh, scalars))


def _adam(p, g, m, v, t, lr, b1, b2, eps, weight_decay, decoupled):
    if weight_decay and decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * p
    m = torch.lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    step_size = lr / (1 - b1**t)
    denom = v.sqrt() / (1 - b2**t).sqrt() + eps
    return p - step_size * (m / denom), m, v


def _clipped(p, g, m, v, t, lr, b1, b2, eps, weight_decay, clip_norm, lrd, centered):
    g = g.clamp(-clip_norm, clip_norm)
    if weight_decay:
        g = g + weight_decay * p
    m = m * b1 + (1 - b1) * g
    spread = g - m if centered else g
    v = v * b2 + (1 - b2) * spread * spread
    denom = v.sqrt() + eps
    step_size = lr * (1 - b2**t).sqrt() / (1 - b1**t)
    return p - step_size * (m / denom), m, v
