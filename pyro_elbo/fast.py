"""The compiled fast path: one SVI step captured once as one FX graph and compiled by inductor.

Pyro's per-step cost is mostly Python: effect handlers run on every site of every step, then one
torch optimizer per parameter.  When the model's structure is static none of that has to be
repeated, so the step is captured once as a single graph of ``(unconstrained parameters,
optimizer state, data)`` (the machinery is in :mod:`pyro_elbo.compile`):

1. check that the structure is static: two runs of guide and model visit the same sites with
   the same shapes, distributions and plates (:func:`check_static_structure`);
2. capture the loss, its all-finite flag, its gradients and (when the optimizer is Adam, AdamW
   or ClippedAdam) the optimizer update with ``torch.fx.experimental.proxy_tensor.make_fx``.
   Pyro's handlers run only now; the graph holds aten ops only, including the backward pass,
   the sampling ops (random draws stay random) and the update, masked by "finite so far";
3. compile the graph with inductor, one graph per argument signature (the shapes of the data: a
   smaller last batch adds one graph, once);
4. each step: one call of the compiled graph, nothing read back; ``fit`` reads the losses and
   the non-finite flag every 50 steps (:mod:`pyro_elbo.fit.compiled_loop`).  An optimizer the
   graph cannot hold runs eagerly after the graph of loss and gradients
   (:class:`CompiledLossAndGrads`).

Random numbers: the graph's sampling ops draw from torch's global generator in the same order as
the eager objective (inductor's ``fallback_random``), so with the same seed the compiled losses
equal the eager ones up to float rounding; each call draws fresh numbers.

What cannot be captured falls back to the eager objective, with one line saying why (never an
error, never another estimator): a structure that changes between runs (e.g. a plate whose size
changes), Python that reads a tensor's value (``.item()``, ``float(x)``, ``if x > 0:``), ops with
data-dependent output shapes (boolean masks), non-tensor arguments that are not plain constants,
parameters created inside the step.  Randomness outside torch (``random``, numpy) would be
frozen into the graph: keep it out of models you compile.

Entry points: ``fit(..., compile="auto")`` (:mod:`pyro_elbo.fit.compiling`),
:func:`compiled` (wrap an objective for ``pyro.infer.SVI``) and :func:`compile_step`
(a stand-alone step with Adam in the graph).
"""

from __future__ import annotations

import warnings

import pyro
import torch

from pyro_elbo.compile.capture import (
    CaptureError,
    StaticStructureError,
    capture,
    check_static_structure,
)
from pyro_elbo.compile.fused import FusedStep
from pyro_elbo.compile.graphs import (
    CompiledLossAndGrads,
    compiled_loss_and_grads,
)
from pyro_elbo.compile.graphs import leaves_of as _leaves_of

__all__ = [
    "CaptureError",
    "CompiledLossAndGrads",
    "CompiledObjective",
    "CompiledStep",
    "FusedStep",
    "StaticStructureError",
    "capture",
    "check_static_structure",
    "compile_step",
    "compiled",
    "compiled_loss_and_grads",
]

#: how captured graphs are compiled: ``"inductor"``, or ``"eager"`` (run the captured FX graph
#: as it is: the same ops without compiling; used by tests that check only the capture)
DEFAULT_BACKEND = "inductor"


# ------------------------------------------------------------------ stand-alone step


class _AdamAdapter:
    """One ``torch.optim.Adam`` over every parameter, as ``fit``'s torch-optimizer adapter."""

    kind = "torch"

    def __init__(self, params, lr, options):
        self.optimizer = torch.optim.Adam(params, lr=lr, **options)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


class CompiledStep:
    """A compiled SVI step for ``(model, guide, loss)``; call it with the model's arguments.

    :param loss: any pyro_elbo objective (default ``ELBO()``) or Pyro ELBO with
        ``differentiable_loss``.
    :param float lr: Adam learning rate.
    :param dict adam: extra ``torch.optim.Adam`` options (``betas``, ``eps``, ``weight_decay``...).

    Loss, gradients and the Adam update are one compiled graph; each call returns the loss (one
    host read).  A step whose loss or gradient is non-finite makes no update.
    ``step.params`` are the unconstrained leaves (the param store's own tensors, updated in
    place); ``step.optimizer`` is the ``torch.optim.Adam`` whose state the graph updates
    (:meth:`state_dict` writes the step counts back first).  Raises :class:`CaptureError` when the step
    cannot be compiled (:func:`compile_step` falls back).
    """

    def __init__(self, model, guide, *args, loss=None, lr: float = 0.01, adam=None, **kwargs):
        if loss is None:
            from pyro_elbo.objectives.elbo import ELBO

            loss = ELBO()
        self.model, self.guide, self.loss, self.kwargs = model, guide, loss, kwargs
        self.param_names, self.params = _leaves_of(loss, model, guide, args, kwargs)
        check_static_structure(model, guide, args, kwargs)
        adapter = _AdamAdapter(self.params, lr, dict(adam or {}))
        self.optimizer = adapter.optimizer
        from pyro_elbo.compile.optim import Unsupported

        try:
            self._step = FusedStep(model, guide, loss, self.param_names, self.params, adapter,
                                   args, kwargs)
        except Unsupported as error:
            raise CaptureError(f"the graph cannot hold {error}") from error

    def __call__(self, *args) -> float:
        step = self._step
        step(self.model, self.guide, *args, **self.kwargs)
        value, finite = step.read_last()
        if not finite:
            step.forgive()  # that step made no update; the next ones do
        return value

    def state_dict(self) -> dict:
        """The optimizer's ``state_dict()``, its step counts written back from the device."""
        self._step.sync()
        return self.optimizer.state_dict()


def compile_step(model, guide, *args, loss=None, lr: float = 0.01, adam=None, **kwargs):
    """A compiled step if the model's structure is static, else the normal SVI step.

    Returns a callable ``step(*args) -> float``.  The fallback warns once and says why.
    """
    try:
        return CompiledStep(model, guide, *args, loss=loss, lr=lr, adam=adam, **kwargs)
    except CaptureError as error:
        warnings.warn(f"compile_step: falling back to the eager step because {error}", stacklevel=2)
    from pyro.infer import SVI

    if loss is None:
        from pyro_elbo.objectives.elbo import ELBO

        loss = ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr, **(adam or {})}), loss=loss)
    return lambda *a: svi.step(*a, **kwargs)


# ------------------------------------------------------------------ SVI entry point


class CompiledObjective(pyro.infer.ELBO):
    """``objective`` with a compiled ``loss_and_grads``, for ``pyro.infer.SVI``::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=compiled(ELBO(4)))

    The first call for a (model, guide) pair runs eagerly (it creates the parameters); the
    second captures and compiles the step (or, when it cannot, keeps the eager objective and
    warns once, saying why).  ``loss`` and ``differentiable_loss`` are the wrapped objective's.
    ``.why`` maps each pair's ``(model, guide)`` names to why it runs eagerly (if it does).
    """

    def __init__(self, objective, *, backend=None):
        super().__init__(num_particles=getattr(objective, "num_particles", 1))
        self.objective, self.backend = objective, backend
        self._steps, self.why = {}, {}

    def __repr__(self):
        return f"compiled({self.objective!r})"

    def loss(self, model, guide, *args, **kwargs):
        return self.objective.loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.objective.differentiable_loss(model, guide, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        return self.objective._get_trace(model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        pair = (id(model), id(guide))
        step = self._steps.get(pair, False)
        if step is False:  # first call: eager, builds the parameters
            self._steps[pair] = True
            return self.objective.loss_and_grads(model, guide, *args, **kwargs)
        if step is True:
            step = self._steps[pair] = self._build(model, guide, args, kwargs)
        if step is None:
            return self.objective.loss_and_grads(model, guide, *args, **kwargs)
        value = step(model, guide, *args, **kwargs)
        for name in step.names:  # SVI collects the parameters it steps from these sites
            pyro.param(name)
        return value

    def _build(self, model, guide, args, kwargs):
        try:
            names, leaves = _leaves_of(self.objective, model, guide, args, kwargs)
            check_static_structure(model, guide, args, kwargs)
            return CompiledLossAndGrads(
                model, guide, self.objective, names, leaves, args, kwargs, backend=self.backend
            )
        except CaptureError as error:
            key = (getattr(model, "__name__", repr(model)), getattr(guide, "__name__", "guide"))
            self.why[key] = str(error)
            warnings.warn(f"compiled(...): running eagerly because {error}", stacklevel=4)
            return None


def compiled(objective=None, *, backend=None) -> CompiledObjective:
    """Wrap a pyro_elbo objective (default ``ELBO()``) so that ``pyro.infer.SVI`` runs each step
    as one compiled graph; see :class:`CompiledObjective`."""
    if objective is None:
        from pyro_elbo.objectives.elbo import ELBO

        objective = ELBO()
    if isinstance(objective, CompiledObjective):
        return objective
    return CompiledObjective(objective, backend=backend)

