"""The compiled fast path: one SVI step captured once as one FX graph and compiled by inductor.

Pyro's per-step cost is mostly Python: effect handlers run on every site of every step, then one
torch optimizer per parameter.  When the model's structure is static none of that has to be
repeated, so the objective's loss *and its gradients* are captured once as a single graph of
``(unconstrained parameters, data)``:

1. check that the structure is static: two runs of guide and model visit the same sites with
   the same shapes, distributions and plates (:func:`check_static_structure`);
2. capture ``(loss, all-finite flag, d loss / d params)`` with
   ``torch.fx.experimental.proxy_tensor.make_fx`` (real tensors: the param store's own leaves
   are the graph's inputs, so ``pyro.param``, autoguides, ``pyro.module`` and ``PyroModule``
   parameters all read them).  Pyro's handlers run only now; the graph holds aten ops only,
   including the backward pass and the sampling ops (random draws stay random);
3. compile the graph with inductor (``torch._inductor.compile_fx``), one graph per argument
   signature (the shapes of the data: a smaller last batch adds one graph, once);
4. each step: one call of the compiled graph, the gradients set as ``.grad``, one host read of
   ``(loss, finite)``, and the optimizer (:class:`CompiledStep`: one fused Adam).

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
(a stand-alone step with one compiled Adam).
"""

from __future__ import annotations

import numbers
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

__all__ = [
    "CaptureError",
    "CompiledLossAndGrads",
    "CompiledObjective",
    "CompiledStep",
    "StaticStructureError",
    "compile_step",
    "compiled",
    "compiled_loss_and_grads",
]

#: how captured graphs are compiled: ``"inductor"``, or ``"eager"`` (run the captured FX graph
#: as it is: the same ops without compiling; used by tests that check only the capture)
DEFAULT_BACKEND = "inductor"

_CONSTANT_TYPES = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device)


class CaptureError(RuntimeError):
    """The step cannot be captured as one graph; ``str(error)`` says why, in one line."""


class StaticStructureError(CaptureError):
    """The model or guide changes structure between runs, so it cannot be compiled."""


# ------------------------------------------------------------------ structure


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
    with _forked_rng():
        first = _structure(model, guide, args, kwargs)
        second = _structure(model, guide, args, kwargs)
    if first != second:
        changed = sorted({s[:2] for s in set(first) ^ set(second)})
        raise StaticStructureError(
            f"the structure changes between runs (sites {changed[:4]} differ in presence, "
            "shape or plate size)"
        )


def _forked_rng():
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


# ------------------------------------------------------------------ capture


def _signature(args, kwargs):
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


def _tensors(args, kwargs):
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


def capture(objective, model, guide, names, leaves, args, kwargs):
    """The FX graph of ``(status, *grads) = f(*leaves, *tensor arguments)``.

    ``status`` is ``[loss, 1 if the loss and every gradient are finite else 0]``; ``grads``
    holds the gradients of the leaves that the loss depends on.  Returns
    ``(graph_module, grad_index)`` with ``grad_index`` the positions of those leaves.  Raises
    :class:`CaptureError` with the reason when the step cannot be one graph.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    store = pyro.get_param_store()
    known = set(store.keys())
    used = {}

    def joint(*inputs):
        data = iter(inputs[len(leaves) :])
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
        return (torch.stack([loss, finite.to(loss.dtype)]), *live)

    with _forked_rng(), pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = make_fx(joint)(*leaves, *_tensors(args, kwargs))
        except CaptureError:
            raise
        except Exception as error:
            raise CaptureError(_reason(error)) from error
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


def _compile(graph, example_inputs, backend):
    """Compile the captured graph with inductor.  The inputs are given as fake tensors under a
    tracing context with a shape environment, as ``torch.compile`` does, so that inductor's
    FX-graph cache can hit (a warm compile takes about a second instead of ten)."""
    if backend == "eager":
        return graph
    if backend != "inductor":
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    patches = {"fallback_random": True}  # draw as the eager objective does
    try:
        with torch.no_grad(), _forked_rng():
            fake_mode = FakeTensorMode(shape_env=ShapeEnv())
            fake_inputs = [fake_mode.from_tensor(t, static_shapes=True) for t in example_inputs]
            with tracing(TracingContext(fake_mode)):
                compiled_fn = compile_fx(graph, fake_inputs, config_patches=patches)
            compiled_fn(*example_inputs)  # finish compiling now, not at the first step
    except Exception as error:  # e.g. no C++ compiler for inductor's CPU kernels
        first = (str(error).strip().splitlines() or [""])[0]
        raise CaptureError(
            f"inductor could not compile the captured graph ({type(error).__name__}: {first})"[:300]
        ) from error
    return compiled_fn


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
        self.backend = backend or DEFAULT_BACKEND
        self._entries = {}
        self._finite = True
        self.fallbacks = {}  # signature -> why it runs eagerly
        self._build(_signature(args, kwargs), args, kwargs, strict=True)

    @property
    def num_graphs(self) -> int:
        """The number of compiled graphs (one per call signature seen)."""
        return sum(entry is not None for entry in self._entries.values())

    def _build(self, key, args, kwargs, strict=False):
        try:
            graph, index = capture(
                self.objective, self.model, self.guide, self.names, self.params, args, kwargs
            )
            fn = _compile(graph, [*self.params, *_tensors(args, kwargs)], self.backend)
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
        try:
            key = _signature(args, kwargs)
        except CaptureError:
            key = None
        entry = self._entries.get(key, False) if key is not None else None
        if entry is False:
            entry = self._build(key, args, kwargs)
        if entry is None:
            self._finite = None
            return self.objective.loss_and_grads(model, guide, *args, **kwargs)
        with torch.no_grad():
            status, *grads = entry.fn(*self.params, *_tensors(args, kwargs))
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
        key = _signature(args, kwargs)
        entry = self._entries.get(key, False)
        if entry is False:
            entry = self._build(key, args, kwargs)
        if entry is None:
            return torch.as_tensor(self.objective.loss(self.model, self.guide, *args, **kwargs))
        with torch.no_grad():
            return entry.fn(*self.params, *_tensors(args, kwargs))[0][0]


def _leaves_of(objective, model, guide, args, kwargs):
    """The names and unconstrained leaves of the parameters the objective reads."""
    with _forked_rng(), poutine.block(), poutine.trace(param_only=True) as seen:
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


# ------------------------------------------------------------------ stand-alone step


def _adam(params, lr, options):
    """One Adam over all parameters: the fused kernel (one launch per step) where torch has it
    for these tensors, else ``foreach``.  (It runs eagerly: compiling it with ``torch.compile``
    adds a dynamo compile, tens of seconds cold, for one kernel launch per step.)"""
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

    ``step.params`` are the unconstrained leaves (the param store's own tensors, updated in
    place); ``step.optimizer`` is the single Adam over all of them.  Raises
    :class:`CaptureError` when the step cannot be compiled (:func:`compile_step` falls back).
    """

    def __init__(self, model, guide, *args, loss=None, lr: float = 0.01, adam=None, **kwargs):
        if loss is None:
            from pyro_elbo.objectives.elbo import ELBO

            loss = ELBO()
        self.model, self.guide, self.loss, self.kwargs = model, guide, loss, kwargs
        self.param_names, self.params = _leaves_of(loss, model, guide, args, kwargs)
        check_static_structure(model, guide, args, kwargs)
        self._loss_and_grads = CompiledLossAndGrads(
            model, guide, loss, self.param_names, self.params, args, kwargs
        )
        self.optimizer = _adam(self.params, lr, adam or {})

    def __call__(self, *args) -> float:
        for leaf in self.params:
            leaf.grad = None
        value = self._loss_and_grads(self.model, self.guide, *args, **self.kwargs)
        self.optimizer.step()
        return value


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

