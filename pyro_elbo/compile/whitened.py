r"""``fit``'s default optimizer, :class:`~pyro_elbo.init.conditioning.WhitenedAdam`, as graph ops.

After the Laplace stage ``fit`` steps a Gaussian autoguide's parameters in the whitened
coordinates ``psi`` of its starting Gaussian (the maps ``theta = forward(psi)`` of
:mod:`pyro_elbo.init.whitening`: full rank ``loc = m0 + L0 mu``, ``L = L0 R``; mean field
``loc = m0 + s0 mu``, ``scale = s0 exp(rho)``; low rank ``s = s0 exp(rho)``, ``F`` as is).
This module writes that step for the fused graph (:mod:`.fused`), over device-resident state:

1. the vector-Jacobian product ``g_psi = J_forward(psi)^T g_theta`` through each block's map
   (``torch.autograd.grad`` inside the captured graph);
2. Adam on ``psi`` (:func:`.optim._adam`, the torch single-tensor form) with the step
   ``lr * schedule(t) * lr_scale`` per coordinate block, ``schedule(t)`` read from a window of
   precomputed multipliers indexed by the device's step count (refilled on the host every
   :data:`WINDOW` calls);
3. Polyak-Ruppert sums ``S <- S + psi`` and their count after ``average_from`` steps (when set);
4. the write-back ``theta <- forward(psi)`` into the guide's parameters;
5. plain Adam (``other_lr``) on every other parameter (:class:`.optim.OptimizerPlan`).

Every update is masked by ``ok`` (finite so far) as the other optimizers' are.  ``psi`` and
Adam's moments are the optimizer's own tensors (updated in place); the step counts, the step
number, the averages and the record of what was written into the guide are written back into
the :class:`WhitenedAdam` by :meth:`WhitenedPlan.sync`, so its ``get_state`` (checkpoints) and
``finalize`` (the average) see what the eager optimizer would.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyro
import torch

from pyro_elbo.compile.optim import OptimizerPlan, Unsupported, _adam, _adam_rule

__all__ = ["WINDOW", "WhitenedPlan"]

#: calls between refills of the device's window of ``schedule`` multipliers
WINDOW = 64

_CONSTANTS = ("m0", "s0", "L0")


def _forward(block, psi, constants):
    """``block.forward(psi)`` with the block's reference tensors replaced by ``constants`` (the
    graph's inputs, so the compiled graph does not hold them as constants)."""
    names = [a for a in _CONSTANTS if isinstance(getattr(block, a, None), torch.Tensor)]
    saved = [getattr(block, a) for a in names]
    try:
        for a, value in zip(names, constants):
            setattr(block, a, value)
        return block.forward(psi)
    finally:
        for a, value in zip(names, saved):
            setattr(block, a, value)


def _constants(block):
    return [getattr(block, a) for a in _CONSTANTS if isinstance(getattr(block, a, None), torch.Tensor)]


class WhitenedPlan:
    """The :class:`~pyro_elbo.init.conditioning.WhitenedAdam` step of ``leaves`` as graph ops
    (see the module's docstring); the same interface as :class:`.optim.OptimizerPlan`."""

    def __init__(self, adapter, leaves):
        optim = adapter.optimizer
        self.adapter, self.optim, self.leaves = adapter, optim, list(leaves)
        if optim._adam is not None:
            for group in optim._adam.param_groups:
                _adam_rule(optim._adam, group)  # raises Unsupported for an option not held
        store = pyro.get_param_store()
        names = [store._param_to_name.get(leaf) for leaf in self.leaves]
        self.index = {n: i for i, n in enumerate(names) if n is not None}
        self.blocks = [b for b in optim.blocks if all(n in self.index for n in b.names())]
        self.others = [i for i, n in enumerate(names) if n not in optim._names]
        self.psi = [p for b in self.blocks for p in b.psi]
        group_of = {id(g["params"][0]): g for g in (optim._adam.param_groups if optim._adam else [])}
        self.groups = [group_of[id(p)] for p in self.psi]
        proxy = SimpleNamespace(kind="pyro", optimizer=optim, scheduler=None,
                                leaves=[self.leaves[i] for i in self.others])
        self.other_plan = OptimizerPlan(proxy, proxy.leaves, own_step=True) if self.others else None
        self.name = "WhitenedAdam" + (f" + {self.other_plan.name}" if self.other_plan else "")
        self.scalars = None
        self.table, self.calls = None, 0

    # -------------------------------------------------------------- state
    def _other_used(self, used):
        return [k for k, i in enumerate(self.others) if i in set(used)]

    def placeholders(self):
        """Stand-ins for :meth:`bind`'s state while capturing (the graph sees shapes only)."""
        other = self.other_plan.placeholders() if self.other_plan else []
        count = len(self.psi)
        psi = [p.detach().clone() for p in self.psi]
        ms, vs, sums = ([torch.zeros_like(p) for p in psi] for _ in range(3))
        scalars = torch.zeros(count + 3, dtype=torch.float64, device=self._device())
        table = torch.ones(WINDOW, dtype=torch.float64, device=self._device())
        constants = [c.clone() for b in self.blocks for c in _constants(b)]
        return [*other, *psi, *ms, *vs, scalars, table, *constants, *sums]

    def _device(self):
        return self.leaves[0].device

    def bind(self, used):
        """The state tensors for the graph's inputs: the other parameters' Adam state, then
        ``[*psi, *m, *v, scalars, table, *constants, *sums]`` (``scalars``: each ``psi``'s step
        count, the step number, the number of averaged iterates, the step number of
        ``table[0]``; ``table``: ``schedule``'s multipliers from that step)."""
        optim = self.optim
        other = self.other_plan.bind(self._other_used(used)) if self.other_plan else []
        store_values = {n: self.leaves[self.index[n]] for b in self.blocks for n in b.names()}
        with torch.no_grad():  # changed outside this optimizer: start from where the guide is
            for block in self.blocks:
                if any(n not in optim._written or not torch.equal(store_values[n].detach(),
                                                                   optim._written[n])
                       for n in block.names()):
                    values = {n: store_values[n].detach() for n in block.names()}
                    for leaf, value in zip(block.psi, block.reverse(values)):
                        leaf.copy_(value)
        ms, vs, steps = [], [], []
        for p in self.psi:
            state = optim._adam.state[p]
            if len(state) == 0:
                OptimizerPlan._initial_state(state, p, ("adam",))
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            steps.append(float(state["step"]))
        device = self._device()
        self.scalars = torch.tensor([*steps, optim.num_steps, optim._count, optim.num_steps],
                                    dtype=torch.float64, device=device)
        self.table = torch.ones(WINDOW, dtype=torch.float64, device=device)
        self._fill(optim.num_steps)
        sums = optim._sum if optim._sum is not None else [torch.zeros_like(p) for p in self.psi]
        self.sums = [s.detach().clone() for s in sums]
        constants = [c for b in self.blocks for c in _constants(b)]
        self.calls = 0
        return [*other, *self.psi, *ms, *vs, self.scalars, self.table, *constants, *self.sums]

    def _fill(self, base):
        """``table[j] = schedule(base + j)``, ``base`` the device's step number now."""
        if self.optim.schedule is None:
            return
        values = [float(self.optim.schedule(base + j)) for j in range(WINDOW)]
        self.table.copy_(torch.tensor(values, dtype=torch.float64))
        self.scalars[-1] = base

    def before_call(self):
        """Refill the multipliers' window when the step number may leave it (one host read
        every :data:`WINDOW` calls, only with a ``schedule``)."""
        self.calls += 1
        if self.optim.schedule is not None and self.calls % WINDOW == 0:
            self._fill(int(self.scalars[-3]))

    def sync(self):
        """Write the device's state back into the :class:`WhitenedAdam` (one host read)."""
        if self.other_plan is not None:
            self.other_plan.sync()
        if self.scalars is None:
            return
        optim, values = self.optim, self.scalars.tolist()
        count = len(self.psi)
        for p, step in zip(self.psi, values[:count]):
            optim._adam.state[p]["step"].fill_(step)
        optim.num_steps, optim._count = int(values[count]), int(values[count + 1])
        if optim._count:
            optim._sum = [s.clone() for s in self.sums]
        for block in self.blocks:
            for n in block.names():
                optim._written[n] = self.leaves[self.index[n]].detach().clone()

    # -------------------------------------------------------------- the update, as graph ops
    def update(self, params, grads, ok, state):
        """Update ``params`` and ``state`` (as :meth:`bind` lists it) in place where ``ok``."""
        optim = self.optim
        if self.other_plan is not None:
            size = 2 * len(self.others) + 1
            self.other_plan.update([params[i] for i in self.others],
                                   [grads[i] for i in self.others], ok, state[:size])
            state = state[size:]
        count = len(self.psi)
        psi, ms, vs = state[:count], state[count : 2 * count], state[2 * count : 3 * count]
        scalars, table = state[3 * count], state[3 * count + 1]
        rest = state[3 * count + 2 :]
        constants, sums = rest[: len(rest) - count], rest[len(rest) - count :]
        number = scalars[count]
        if optim.schedule is not None:
            offset = (number - scalars[count + 2]).clamp(0, WINDOW - 1).to(torch.long)
            multiplier = table.gather(0, offset.reshape(1)).reshape(())
        else:
            multiplier = 1.0
        new_scalars = list(scalars.unbind())
        gradients = self._vjp(params, grads, psi, constants)
        for j, g in enumerate(gradients):
            if g is None:
                continue
            group = self.groups[j]
            lr = optim.lr * multiplier * group["scale"]
            t = scalars[j] + 1
            b1, b2 = group["betas"]
            p_new, m_new, v_new = _adam(psi[j], g, ms[j], vs[j], t, lr, float(b1), float(b2),
                                        float(group["eps"]), float(group["weight_decay"]), False)
            psi[j].copy_(torch.where(ok, p_new, psi[j]))
            ms[j].copy_(torch.where(ok, m_new, ms[j]))
            vs[j].copy_(torch.where(ok, v_new, vs[j]))
            new_scalars[j] = t
        number = number + 1
        new_scalars[count] = number
        if optim.average_from is not None:
            averaging = ok & (number > optim.average_from)
            for s, p in zip(sums, psi):
                s.copy_(torch.where(averaging, s + p, s))
            new_scalars[count + 1] = torch.where(averaging, scalars[count + 1] + 1,
                                                 scalars[count + 1])
        scalars.copy_(torch.where(ok, torch.stack(new_scalars), scalars))
        self._write(params, psi, constants, ok)

    def _blocks_with(self, psi, constants):
        """``(block, its psi, its constants)`` for each block, over the graph's inputs."""
        at_psi, at_constant = 0, 0
        for block in self.blocks:
            size, width = len(block.psi), len(_constants(block))
            yield (block, psi[at_psi : at_psi + size],
                   constants[at_constant : at_constant + width])
            at_psi, at_constant = at_psi + size, at_constant + width

    def _vjp(self, params, grads, psi, constants):
        """The gradient of each ``psi`` (``None`` where no guide parameter it maps to has one)."""
        out = []
        for block, block_psi, block_constants in self._blocks_with(psi, constants):
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) for p in block_psi]
                values = _forward(block, leaves, block_constants)
                pairs = [(values[n], grads[self.index[n]]) for n in block.names()
                         if grads[self.index[n]] is not None]
                if not pairs:
                    out.extend([None] * len(leaves))
                    continue
                found = torch.autograd.grad([v for v, _ in pairs], leaves,
                                            [g for _, g in pairs], allow_unused=True)
            out.extend(g.detach() if g is not None else None for g in found)
        return out

    def _write(self, params, psi, constants, ok):
        for block, block_psi, block_constants in self._blocks_with(psi, constants):
            for n, value in _forward(block, block_psi, block_constants).items():
                target = params[self.index[n]]
                target.copy_(torch.where(ok, value.detach(), target))


def is_whitened(adapter) -> bool:
    from pyro_elbo.init.conditioning import WhitenedAdam

    return getattr(adapter, "kind", None) == "pyro" and isinstance(adapter.optimizer, WhitenedAdam)


def make_plan(adapter, leaves):
    """The optimizer's update as graph ops: :class:`WhitenedPlan` for ``WhitenedAdam``, else
    :class:`.optim.OptimizerPlan`.  :raises Unsupported: when it cannot run inside the graph."""
    if is_whitened(adapter):
        if getattr(adapter, "scheduler", None) is not None:
            raise Unsupported(f"a learning-rate scheduler ({type(adapter.scheduler).__name__})")
        return WhitenedPlan(adapter, leaves)
    return OptimizerPlan(adapter, leaves)
