"""Capturing one SVI step as one FX graph and compiling it with inductor.

1. :func:`check_static_structure`: two side runs of guide and model (:mod:`pyro_elbo.engine.traces`)
   visit the same sites with the same shapes, distributions and plates;
2. :func:`capture`: ``make_fx`` records the objective's loss, its all-finite flag and its
   gradients (and, for the fused step, the optimizer update) as aten ops.  The param store's own
   leaves are the graph's first inputs, so ``pyro.param``, autoguides, ``pyro.module`` and
   ``PyroModule`` parameters all read them; Pyro's handlers run only now;
3. :func:`compile_graph`: inductor compiles the graph (``fallback_random``: the sampling ops draw
   from torch's generator in the eager objective's order).  On CUDA, inductor's CUDA graphs are
   asked for (``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets).

What cannot be one graph raises :class:`CaptureError` with the reason in one line.
"""

from __future__ import annotations

import numbers
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.traces import forked_rng, side_trace_pair

__all__ = ["CaptureError", "StaticStructureError", "capture", "check_static_structure",
           "compile_graph", "signature", "tensors"]

_CONSTANT_TYPES = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device)


class CaptureError(RuntimeError):
    """The step cannot be captured as one graph; ``str(error)`` says why, in one line."""


class StaticStructureError(CaptureError):
    """The model or guide changes structure between runs, so it cannot be compiled."""


# ------------------------------------------------------------------ structure


def _structure(model, guide, args, kwargs):
    model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs, fork=False)
    signature = []
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            signature.append(
                (
                    role,
                    name,
                    type(site["fn"]).__name__,
                    tuple(site["value"].shape),
                    tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
                )
            )
    return tuple(signature)


def check_static_structure(model, guide, args, kwargs) -> None:
    """Raise :class:`StaticStructureError` if two runs visit different sites or shapes."""
    with forked_rng():
        first = _structure(model, guide, args, kwargs)
        second = _structure(model, guide, args, kwargs)
    if first != second:
        changed = sorted({s[:2] for s in set(first) ^ set(second)})
        raise StaticStructureError(
            f"the structure changes between runs (sites {changed[:4]} differ in presence, "
            "shape or plate size)"
        )


# ------------------------------------------------------------------ capture


def signature(args, kwargs):
    """The cache key of a call: tensor shapes/dtypes/devices and the constants' values."""
    key = []
    for where, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            key.append((where, "tensor", tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, _CONSTANT_TYPES) or (
            isinstance(value, tuple) and all(isinstance(v, _CONSTANT_TYPES) for v in value)
        ):
            key.append((where, "constant", type(value).__name__, value))
        else:
            raise CaptureError(
                f"argument {where!r} is a {type(value).__name__}: only tensors and plain "
                "constants (numbers, strings, None) can be passed to a compiled step"
            )
    return tuple(key)


def cached_graph(entries: dict, build, args, kwargs):
    """The compiled graph of this call's signature: from ``entries`` (by signature), else made by
    ``build(key, args, kwargs)`` (which stores it); None when the call runs eagerly (a signature
    that cannot be captured, or one whose capture failed)."""
    try:
        key = signature(args, kwargs)
    except CaptureError:
        return None
    entry = entries.get(key, False)
    return build(key, args, kwargs) if entry is False else entry


def tensors(args, kwargs):
    return [a for a in args if isinstance(a, torch.Tensor)] + [
        kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)
    ]


def _reason(error: BaseException) -> str:
    text = str(error)
    if "_local_scalar_dense" in text or "data-dependent" in text or "is_nonzero" in text:
        return (
            "the model or guide reads a tensor's value in Python (.item(), float(), or a "
            "Python `if` on a sampled value or the data), which one graph cannot hold"
        )
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"capturing the step raised {type(error).__name__}: {first}"[:300]


def capture(objective, model, guide, names, leaves, args, kwargs, *, extra=(), update=None):
    """The FX graph of one step over the inputs ``(*leaves, *extra, *tensor arguments)``.

    Without ``update`` the graph returns ``(status, *grads)``: ``status`` is ``[loss, 1 if the
    loss and every gradient are finite else 0]`` and ``grads`` the gradients of the leaves the
    loss depends on.  With ``update``, the graph returns ``update(leaves, grads, loss, finite,
    extra)`` (``grads`` with ``None`` for unused leaves), which may update ``leaves`` and
    ``extra`` in place (the leaves' and ``extra``'s values are restored after the capture).
    Returns ``(graph_module, grad_index)`` with ``grad_index`` the positions of the used leaves.
    Raises :class:`CaptureError` with the reason when the step cannot be one graph.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    store = pyro.get_param_store()
    known = set(store.keys())
    used = {}
    num_leaves, num_extra = len(leaves), len(extra)

    def joint(*inputs):
        data = iter(inputs[num_leaves + num_extra :])
        call_args = [next(data) if isinstance(a, torch.Tensor) else a for a in args]
        call_kwargs = {
            k: next(data) if isinstance(kwargs[k], torch.Tensor) else kwargs[k]
            for k in sorted(kwargs)
        }
        with poutine.block(), poutine.trace(param_only=True) as params_read:
            loss = objective.differentiable_loss(model, guide, *call_args, **call_kwargs)
        used["params"] = set(params_read.trace.nodes)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        used["index"] = [i for i, g in enumerate(grads) if g is not None]
        live = [g for g in grads if g is not None]
        finite = torch.isfinite(loss)
        for g in live:
            finite = finite & torch.isfinite(g).all()
        loss = loss.detach()
        if update is not None:
            with torch.no_grad():
                return update(list(inputs[:num_leaves]), grads, loss, finite,
                              list(inputs[num_leaves : num_leaves + num_extra]))
        return (torch.stack([loss, finite.to(loss.dtype)]), *live)

    saved = [t.detach().clone() for t in (*leaves, *extra)] if update is not None else []
    with forked_rng(), pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = make_fx(joint)(*leaves, *extra, *tensors(args, kwargs))
        except CaptureError:
            raise
        except Exception as error:
            raise CaptureError(_reason(error)) from error
        finally:
            with torch.no_grad():
                for tensor, value in zip((*leaves, *extra), saved):
                    tensor.copy_(value)
    created = set(store.keys()) - known
    if created:
        raise CaptureError(f"the step creates parameters {sorted(created)[:4]} on each run")
    outside = used["params"] - set(names)
    if outside:
        raise CaptureError(
            f"the step reads parameters {sorted(outside)[:4]} that are not optimized"
        )
    dynamic = sorted({str(node.target) for node in graph.graph.nodes if _value_shaped(node)})
    if dynamic:
        raise CaptureError(
            f"the step uses ops whose output shape depends on values ({', '.join(dynamic[:3])}, "
            "e.g. a boolean mask), which one graph cannot hold"
        )
    return graph, used["index"]


def _value_shaped(node) -> bool:
    """Whether the node's output shape depends on tensor values (``nonzero``, a boolean
    mask...); ``aten.index`` only when one of its indices is boolean."""
    if node.op != "call_function":
        return False
    if node.target in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default):
        indices = node.args[1] if len(node.args) > 1 else ()
        return any(
            index is not None
            and getattr(index.meta.get("val"), "dtype", None) in (torch.bool, torch.uint8)
            for index in indices
        )
    return torch.Tag.dynamic_output_shape in getattr(node.target, "tags", ())


def compile_graph(graph, example_inputs, backend, *, mutated=0):
    """Compile the captured graph with inductor.  The inputs are given as fake tensors under a
    tracing context with a shape environment, as ``torch.compile`` does, so that inductor's
    FX-graph cache can hit (a warm compile takes about a second instead of ten).  The graph runs
    once before it is returned (on copies of its first ``mutated`` inputs, which it updates in
    place), so that the compile is finished before the first step."""
    if backend == "eager":
        return graph
    if backend != "inductor":
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    patches = {"fallback_random": True}  # draw as the eager objective does
    if any(t.is_cuda for t in example_inputs):
        patches["triton.cudagraphs"] = True  # what torch.compile(mode="reduce-overhead") sets
    try:
        with torch.no_grad(), forked_rng():
            fake_mode = FakeTensorMode(shape_env=ShapeEnv())
            fake_inputs = [fake_mode.from_tensor(t, static_shapes=True) for t in example_inputs]
            with tracing(TracingContext(fake_mode)):
                compiled_fn = compile_fx(graph, fake_inputs, config_patches=patches)
            warm = [t.clone() if i < mutated else t for i, t in enumerate(example_inputs)]
            compiled_fn(*warm)  # finish compiling now, not at the first step
    except Exception as error:  # e.g. no C++ compiler for inductor's CPU kernels
        first = (str(error).strip().splitlines() or [""])[0]
        raise CaptureError(
            f"inductor could not compile the captured graph ({type(error).__name__}: {first})"[:300]
        ) from error
    return compiled_fn


