"""The compiled ``loss_and_grads``: one captured graph per argument signature, cached.

:class:`CompiledLossAndGrads` replaces an objective's ``loss_and_grads``: each call runs the
compiled graph of ``(loss, all-finite flag, gradients)`` and sets the gradients as ``.grad``; the
optimizer then runs eagerly (the fallback of :class:`~pyro_elbo.compile.fused.FusedStep` for an
optimizer that cannot be written as graph ops).  A signature that cannot be captured runs the
eager objective, with one warning saying why.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.poutine as poutine
import torch

from pyro_elbo.compile.capture import (
    CaptureError,
    cached_graph,
    capture,
    check_static_structure,
    compile_graph,
    signature,
    tensors,
)
from pyro_elbo.engine.traces import forked_rng

__all__ = ["CompiledLossAndGrads", "compiled_loss_and_grads", "default_backend", "leaves_of"]


def default_backend() -> str:
    """``pyro_elbo.fast.DEFAULT_BACKEND`` (read at each build: tests set it)."""
    from pyro_elbo import fast

    return fast.DEFAULT_BACKEND


class _Entry:
    __slots__ = ("fn", "grad_leaves")

    def __init__(self, fn, grad_leaves):
        self.fn, self.grad_leaves = fn, grad_leaves


class CompiledLossAndGrads:
    """A compiled ``loss_and_grads(model, guide, *args, **kwargs)`` over fixed parameter leaves.

    One graph per call signature (tensor shapes, dtypes, devices and constant arguments), built
    on first use and kept.  A signature that cannot be captured runs the eager
    ``objective.loss_and_grads`` (with one warning saying why).  After each call,
    :meth:`grads_finite` says whether the loss and the gradients were finite, without another
    host read.
    """

    def __init__(self, model, guide, objective, names, params, args, kwargs, *, backend=None):
        self.model, self.guide, self.objective = model, guide, objective
        self.names = list(names)
        # one input per tensor: two store names may hold the same leaf (e.g. AutoIAFNormal's)
        self.params = list({id(leaf): leaf for leaf in params}.values())
        self.backend = backend or default_backend()
        self._entries = {}
        self._finite = True
        self.fallbacks = {}  # signature -> why it runs eagerly
        self._build(signature(args, kwargs), args, kwargs, strict=True)

    @property
    def num_graphs(self) -> int:
        """The number of compiled graphs (one per call signature seen)."""
        return sum(entry is not None for entry in self._entries.values())

    def _build(self, key, args, kwargs, strict=False):
        try:
            graph, index = capture(
                self.objective, self.model, self.guide, self.names, self.params, args, kwargs
            )
            fn = compile_graph(graph, [*self.params, *tensors(args, kwargs)], self.backend)
            entry = _Entry(fn, [self.params[i] for i in index])
        except CaptureError as error:
            if strict:
                raise
            why = str(error)
            warnings.warn(
                f"compiled step: the call with argument shapes {key} runs eagerly because {why}",
                stacklevel=4,
            )
            self.fallbacks[key] = why
            entry = None
        self._entries[key] = entry
        return entry

    def __call__(self, model, guide, *args, **kwargs) -> float:
        entry = cached_graph(self._entries, self._build, args, kwargs)
        if entry is None:
            self._finite = None
            return self.objective.loss_and_grads(model, guide, *args, **kwargs)
        with torch.no_grad():
            status, *grads = entry.fn(*self.params, *tensors(args, kwargs))
        for leaf, grad in zip(entry.grad_leaves, grads):
            if leaf.grad is None:
                leaf.grad = grad
            else:
                leaf.grad.add_(grad)
        loss, finite = status.tolist()  # the step's one host read
        self._finite = bool(finite)
        return loss

    def grads_finite(self, leaves) -> bool:
        """Whether the last call's gradients (and loss) were all finite: the flag computed in
        the graph, read with the loss (no second host read)."""
        if self._finite is None:  # the last call ran eagerly
            grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
            return all(bool(torch.isfinite(g).all()) for g in grads)
        return self._finite

    def loss(self, *args, **kwargs) -> torch.Tensor:
        """The compiled loss at the current parameters (no gradients kept)."""
        key = signature(args, kwargs)
        entry = self._entries.get(key, False)
        if entry is False:
            entry = self._build(key, args, kwargs)
        if entry is None:
            return torch.as_tensor(self.objective.loss(self.model, self.guide, *args, **kwargs))
        with torch.no_grad():
            return entry.fn(*self.params, *tensors(args, kwargs))[0][0]


def leaves_of(objective, model, guide, args, kwargs):
    """The names and unconstrained leaves of the parameters the objective reads."""
    with forked_rng(), poutine.block(), poutine.trace(param_only=True) as seen:
        with torch.no_grad():
            guide(*args, **kwargs)  # let autoguides build their parameters
        objective.differentiable_loss(model, guide, *args, **kwargs)
    names = sorted(seen.trace.nodes)
    leaves = [pyro.param(name).unconstrained() for name in names]
    keep = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
    names, leaves = [names[i] for i in keep], [leaves[i] for i in keep]
    if not names:
        raise CaptureError("the guide and model have no parameters to optimize")
    for name, leaf in zip(names, leaves):
        if not leaf.is_leaf:
            raise CaptureError(f"parameter {name!r} is not a leaf tensor")
    return names, leaves


def compiled_loss_and_grads(
    model, guide, objective, names, params, args, kwargs, *, batched=False, backend=None
):
    """A compiled ``loss_and_grads`` for ``fit``, or ``(None, why)``: returns
    ``(compiled, why)`` where ``why`` is one line (empty when compiled)."""
    try:
        if not all(p.is_leaf for p in params):
            raise CaptureError("a parameter is not a leaf tensor")
        check_static_structure(model, guide, args, kwargs)
        return (
            CompiledLossAndGrads(
                model, guide, objective, names, params, args, kwargs, backend=backend
            ),
            "",
        )
    except CaptureError as error:
        return None, str(error)
