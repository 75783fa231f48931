"""The compiled fast path: one SVI step as one traced torch function and one fused optimizer.

Pyro's per-step cost is mostly Python: effect handlers run on every site of every step
(about 57% of a ``Trace_ELBO`` step), then one torch optimizer per parameter (about 22%).  When
the model's structure is static, none of that work has to be repeated:

1. trace guide and model twice and check that the structure is static (same sites, shapes,
   distributions and plates); otherwise fall back to the normal path with a one-line warning;
2. capture the parameters (unconstrained leaves) once;
3. record the objective's ``differentiable_loss`` as a function of (parameters, data) with
   ``torch.jit.trace`` (random draws stay random: sampling ops are recorded, not their values);
4. each step: run the traced loss, ``backward``, and one ``torch.optim.Adam`` over all leaves
   (the ``fused`` implementation where torch has it, else ``foreach``).

The losses match the normal path at the same seed (the same ops draw the same random numbers;
the checks and the recording draw theirs from a forked generator).

Two entry points: ``fit(..., compile=True)`` (:func:`compiled_loss_and_grads`, under ``fit``'s
own optimizer, NaN guard, convergence rule and checkpoints) and :func:`compile_step` (a
stand-alone step with one fused Adam).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

__all__ = [
    "CompiledLossAndGrads",
    "CompiledStep",
    "StaticStructureError",
    "compile_step",
    "compiled_loss_and_grads",
]


class StaticStructureError(RuntimeError):
    """The model or guide changes structure between runs, so it cannot be compiled."""


def _structure(model, guide, args, kwargs):
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    signature = []
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            signature.append(
                (
                    role,
                    name,
                    type(fn).__name__,
                    tuple(site["value"].shape),
                    tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
                )
            )
    return tuple(signature)


def check_static_structure(model, guide, args, kwargs) -> None:
    """Raise :class:`StaticStructureError` if two runs visit different sites or shapes."""
    first = _structure(model, guide, args, kwargs)
    second = _structure(model, guide, args, kwargs)
    if first != second:
        changed = sorted({s[:2] for s in set(first) ^ set(second)})
        raise StaticStructureError(
            f"the structure changes between runs (sites {changed[:4]} differ)"
        )


def _fused_adam(params, lr, options):
    """One Adam over all parameters: the fused kernel (one launch per step; about half the time
    of ``foreach`` on (a)) where torch has it for these tensors, else ``foreach``."""
    if "fused" not in options and "foreach" not in options:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, **{"foreach": True, **options})


class CompiledStep:
    """A compiled SVI step for ``(model, guide, loss)``; call it with the model's arguments.

    :param loss: any pyro_elbo objective (default ``ELBO()``) or Pyro ELBO with
        ``differentiable_loss``.
    :param float lr: Adam learning rate.
    :param dict adam: extra ``torch.optim.Adam`` options (``betas``, ``eps``...).

    ``step.params`` are the unconstrained leaves (the param store's own tensors, updated in place);
    ``step.optimizer`` is the single Adam over all of them.
    """

    def __init__(self, model, guide, *args, loss=None, lr: float = 0.01, adam=None, **kwargs):
        if loss is None:
            from pyro_elbo.objectives.elbo import ELBO

            loss = ELBO()
        self.model, self.guide, self.loss, self.kwargs = model, guide, loss, kwargs
        with poutine.block(), torch.no_grad():
            guide(*args, **kwargs)  # let autoguides build their parameters
        check_static_structure(model, guide, args, kwargs)
        with poutine.block(), poutine.trace(param_only=True) as capture:
            loss.differentiable_loss(model, guide, *args, **kwargs)
        self.param_names = sorted(capture.trace.nodes)
        if not self.param_names:
            raise ValueError("the guide and model have no parameters to optimize")
        self.params = [pyro.param(name).unconstrained() for name in self.param_names]
        for name, leaf in zip(self.param_names, self.params):
            if not leaf.is_leaf:
                raise StaticStructureError(f"parameter {name!r} is not a leaf tensor")
        self._loss_and_grads = CompiledLossAndGrads(
            model, guide, loss, self.param_names, self.params, args, kwargs
        )
        self.optimizer = _fused_adam(self.params, lr, adam or {})

    def __call__(self, *args) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        value = self._loss_and_grads(self.model, self.guide, *args, **self.kwargs)
        self.optimizer.step()
        return value


def _trace_loss(model, guide, loss, names, params, args, kwargs):
    """``loss.differentiable_loss`` recorded by ``torch.jit.trace`` as a function of
    ``(*params, *args)``; the random draws of the recording are not taken from the global
    generators (the compiled steps then draw the same numbers as the normal path)."""

    def loss_of(*params_and_args):
        data = params_and_args[len(names) :]
        constrained = {name: pyro.param(name) for name in names}
        return poutine.replay(loss.differentiable_loss, params=constrained)(
            model, guide, *data, **kwargs
        )

    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(loss_of, tuple(params) + tuple(args), check_trace=False)


class CompiledLossAndGrads:
    """``loss_and_grads`` of ``fit``'s compiled fast path: the traced loss of ``(params, args)``
    and its backward.  A new argument shape (the last, smaller batch of an epoch) is traced once
    more; keyword arguments are fixed at tracing time."""

    def __init__(self, model, guide, objective, names, params, args, kwargs):
        self.model, self.guide, self.objective = model, guide, objective
        self.names, self.params, self.kwargs = list(names), list(params), dict(kwargs)
        self._traced = {}
        self._get(args)

    @staticmethod
    def _key(args):
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def _get(self, args):
        key = self._key(args)
        traced = self._traced.get(key)
        if traced is None:
            traced = self._traced[key] = _trace_loss(
                self.model, self.guide, self.objective, self.names, self.params, args,
                self.kwargs,
            )
        return traced

    def __call__(self, model, guide, *args, **kwargs) -> float:
        if kwargs.keys() != self.kwargs.keys():
            raise StaticStructureError(
                f"the compiled step was traced with keyword arguments {sorted(self.kwargs)} "
                f"and called with {sorted(kwargs)}"
            )
        loss = self.loss(*args)
        loss.backward()
        return loss.item()

    def loss(self, *args) -> torch.Tensor:
        """The traced loss at the current parameters (differentiable; no backward)."""
        return self._get(args)(*self.params, *args)


def compiled_loss_and_grads(model, guide, objective, names, params, args, kwargs, *, batched):
    """A compiled ``loss_and_grads(model, guide, *args, **kwargs)`` for ``fit(compile=True)``,
    or ``None`` after a one-line warning saying why the normal path is kept."""
    why = None
    if not all(isinstance(a, torch.Tensor) for a in args):
        kinds = sorted({type(a).__name__ for a in args if not isinstance(a, torch.Tensor)})
        why = f"the positional arguments must all be tensors to be traced (got {kinds})"
    elif batched and kwargs:
        why = "batches given as keyword arguments (a dict) cannot be traced; yield tuples"
    elif not all(p.is_leaf for p in params):
        why = "a parameter is not a leaf tensor"
    if why is None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=devices):  # the checks' draws are not the run's
                check_static_structure(model, guide, args, kwargs)
            return CompiledLossAndGrads(model, guide, objective, names, params, args, kwargs)
        except (StaticStructureError, torch.jit.Error, RuntimeError, TypeError) as error:
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
    warnings.warn(f"fit(compile=True): falling back to the normal path because {why}", stacklevel=3)
    return None


def compile_step(model, guide, *args, loss=None, lr: float = 0.01, adam=None, **kwargs):
    """A compiled step if the model's structure is static, else the normal SVI step.

    Returns a callable ``step(*args) -> float``.  The fallback warns once and says why.
    """
    try:
        return CompiledStep(model, guide, *args, loss=loss, lr=lr, adam=adam, **kwargs)
    except (StaticStructureError, torch.jit.Error, RuntimeError) as error:
        warnings.warn(
            f"compile=True: falling back to the normal path because {error}", stacklevel=2
        )
    from pyro.infer import SVI

    if loss is None:
        from pyro_elbo.objectives.elbo import ELBO

        loss = ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr, **(adam or {})}), loss=loss)
    return lambda *a: svi.step(*a, **kwargs)
