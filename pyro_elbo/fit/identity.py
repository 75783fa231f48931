"""The identity of a run, stored in its checkpoint and compared on resume.

A checkpoint can only be continued by the run that wrote it.  :func:`describe_run` records, as
plain values (loadable with ``torch.load(weights_only=True)``):

* ``structure``: every sample site of the model and the guide (name, distribution, shape,
  dtype, observed or not), as the checks before step 1 traced them;
* ``objective``: its class and settings (``num_particles``, ``estimator``, ``analytic_kl``...:
  the public attributes with plain values, so no memory address);
* ``optimizer``: its class, learning rate and other hyperparameters;
* ``data``: shape, dtype and a content hash (BLAKE2b; a strided sample and the sum for tensors
  over 16M elements) of every tensor or array in ``*args``/``**kwargs``, and of a ``data=``
  iterable: its type, length, batch size, sampler and, for in-memory datasets, their content;
* ``seed`` and torch's default dtype.

:func:`compare` raises :class:`~pyro_elbo.fit.checkpoint.CheckpointMismatchError` listing every
difference that cannot be mixed (all of the above except the learning rate), and returns the
ones that may change on purpose (the learning rate, the number of steps) for a one-line notice.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings

import numpy as np
import torch

from pyro_elbo.fit.checkpoint import CheckpointMismatchError

__all__ = [
    "ZeroLearningRateWarning",
    "check_resume",
    "compare",
    "describe_data",
    "describe_objective",
    "describe_optimizer",
    "describe_run",
    "describe_traces",
    "describe_value",
    "raise_if_empty",
    "load_batches",
    "load_optimizer",
    "of_run",
]

#: tensors up to this many elements are hashed whole; larger ones by a strided sample and sum
HASH_ALL_UP_TO = 1 << 24

_PLAIN = (bool, int, float, str, type(None))


class ZeroLearningRateWarning(UserWarning):
    """The optimizer's learning rate is 0: the steps will not move the parameters."""


# ------------------------------------------------------------------ fit's hooks


def of_run(run, preflight) -> dict | None:
    """The identity of a ``fit`` run after its checks before step 1 (``preflight`` holds their
    traces), ``None`` without a checkpoint (nothing to compare: the data are not hashed).  Warns
    of a learning rate of 0 (every step a no-op; its one use: the state before the steps)."""
    optimizer = describe_optimizer(run.opt)
    if optimizer["lr"] is not None and any(lr == 0 for lr in optimizer["lr"]):
        warnings.warn(
            f"fit: the optimizer's learning rate is 0 ({optimizer['type']}): no step will move "
            "the parameters. Pass a positive lr to fit.",
            ZeroLearningRateWarning,
            stacklevel=4,
        )
    if run.checkpoint is None:
        return None
    return describe_run(
        structure=describe_traces(preflight.model_trace, preflight.guide_trace),
        objective=run.objective,
        optimizer=optimizer,
        args=run.args,
        kwargs=run.kwargs,
        data=None if run.batches is None else run.batches.data,
        seed=run.seed,
    )


def check_resume(run, state, path) -> list[str]:
    """Compare the checkpoint's run with this one (:func:`compare`); return the notices."""
    notices = compare(state["run"], run.identity, path) if state.get("run") else []
    saved_target = state.get("target")
    if saved_target is not None and int(saved_target) != run.target:
        notices.append(f"up to {run.target} steps (the checkpoint's call asked for {saved_target})")
    return notices


def load_optimizer(run, state, path) -> None:
    """Restore the optimizer's state, with this run's learning rate when it was changed; a state
    that does not fit the optimizer is a :class:`CheckpointMismatchError`."""
    saved = (state.get("run") or {}).get("optimizer") or {}
    lrs = run.identity["optimizer"]["lr"]
    optim_state = state["optim"]["state"]
    if lrs is not None and saved.get("lr") is not None and saved["lr"] != lrs:
        optim_state = with_lr(optim_state, lrs, run.opt.kind)
    try:
        run.opt.load_state_dict(optim_state)
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise CheckpointMismatchError(
            f"the optimizer state in the checkpoint {path!r} does not fit this run's "
            f"{type(run.opt.optimizer).__name__} ({type(error).__name__}: {error}). Pass the "
            "optimizer of the run that wrote it, or resume=False to start over."
        ) from None


def with_lr(optim_state: dict, lrs: list, kind: str) -> dict:
    """A copy of an optimizer state (``torch``: one ``state_dict``; ``pyro``: one per parameter
    name) whose parameter groups have the learning rates ``lrs``."""

    def groups(state_dict, rates):
        new = dict(state_dict)
        new["param_groups"] = [
            {**group, "lr": rates[min(i, len(rates) - 1)]}
            for i, group in enumerate(state_dict["param_groups"])
        ]
        return new

    if kind == "torch":
        return groups(optim_state, lrs)
    return {
        name: groups(value, lrs[:1])
        if isinstance(value, dict) and "param_groups" in value
        else value
        for name, value in optim_state.items()
    }


def load_batches(batches, data_state, path) -> None:
    """Replay the data position; data with fewer batches than the checkpoint's position is a
    :class:`CheckpointMismatchError` (not a bare ``StopIteration``)."""
    try:
        batches.load_state_dict(data_state)
    except StopIteration:
        raise CheckpointMismatchError(
            f"the checkpoint {path!r} stopped at batch {data_state['index']} of an epoch, but "
            "this run's data yield fewer batches per epoch: it is not the data of that run. "
            "Pass the same data (dataset and batch size), or resume=False to start over."
        ) from None


def raise_if_empty(error, args, kwargs) -> None:
    """Explain a ``ZeroDivisionError`` from running the model (Pyro's plate scale ``N / 0``)
    with empty data: raise a ``ValueError`` naming the empty arguments (else return)."""
    empty = [
        f"{where} (shape {tuple(value.shape)})"
        for where, value in [*((f"args[{i}]", a) for i, a in enumerate(args)), *kwargs.items()]
        if isinstance(value, torch.Tensor) and value.dim() and 0 in value.shape
    ]
    if empty:
        raise ValueError(
            f"fit: the data are empty: {', '.join(empty)} has no rows, and the model's plate "
            "cannot scale a batch of 0 rows (ZeroDivisionError). Pass data with at least one "
            "row."
        ) from error


# ------------------------------------------------------------------ descriptions


def describe_run(*, structure, objective, optimizer, args, kwargs, data, seed) -> dict:
    """The identity of one run (see the module doc); every value is plain."""
    return {
        "structure": structure,
        "objective": describe_objective(objective),
        "optimizer": optimizer,
        "data": {"args": describe_value(args), "kwargs": describe_value(kwargs)}
        if data is None
        else {
            "args": describe_value(args),
            "kwargs": describe_value(kwargs),
            "batches": describe_data(data),
        },
        "seed": seed,
        "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
    }


def describe_traces(model_trace, guide_trace) -> dict:
    """``{"model": [...], "guide": [...]}``: one ``[name, distribution, shape, dtype,
    observed]`` per sample site."""

    def sites(trace):
        out = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = site["value"]
            shape = list(value.shape) if isinstance(value, torch.Tensor) else []
            dtype = (
                str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else ""
            )
            fn = site["fn"]
            while hasattr(fn, "base_dist") and type(fn).__name__ in (
                "Independent",
                "MaskedDistribution",
            ):
                fn = fn.base_dist
            out.append([str(name), type(fn).__name__, shape, dtype, bool(site["is_observed"])])
        return out

    return {"model": sites(model_trace), "guide": sites(guide_trace)}


def describe_objective(objective) -> dict:
    """Class and plain-valued public settings of an objective (no memory addresses)."""
    settings = {}
    for key, value in sorted(vars(objective).items()):
        if key.startswith("_"):
            continue
        plain = _plain(value)
        if plain is not _NOT_PLAIN:
            settings[key] = plain
    kind = type(objective)
    return {"type": f"{kind.__module__}.{kind.__qualname__}", "settings": settings}


def describe_optimizer(opt) -> dict:
    """``{"type", "lr", "hyper"}`` of fit's optimizer wrapper (torch or Pyro) or of a torch
    optimizer / ``PyroOptim``: ``lr`` a list (one per parameter group) or ``None``."""
    optimizer = getattr(opt, "optimizer", opt)
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = [
            {k: _plain(v) for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
        ]
        kind = type(optimizer)
        return {
            "type": f"{kind.__module__}.{kind.__qualname__}",
            "lr": [g.pop("lr", None) for g in groups],
            "hyper": [{k: v for k, v in g.items() if v is not _NOT_PLAIN} for g in groups],
        }
    constructor = getattr(optimizer, "pt_optim_constructor", None)
    args = getattr(optimizer, "pt_optim_args", None)
    kind = type(optimizer)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if constructor is not None:
        name += f"[{getattr(constructor, '__module__', '')}.{getattr(constructor, '__qualname__', constructor)}]"
    if isinstance(args, dict):
        hyper = {k: _plain(v) for k, v in sorted(args.items())}
        lr = hyper.pop("lr", None)
        return {
            "type": name,
            "lr": None if lr is None else [lr],
            "hyper": [{k: v for k, v in hyper.items() if v is not _NOT_PLAIN}],
        }
    return {"type": name, "lr": None, "hyper": [_name(args)] if args is not None else []}


def describe_value(value, depth=0):
    """A plain description of an argument: tensors and arrays by shape, dtype and content hash;
    numbers and strings as they are; containers element by element; anything else by type."""
    if isinstance(value, torch.Tensor):
        return {
            "tensor": list(value.shape),
            "dtype": str(value.dtype).replace("torch.", ""),
            "hash": _hash_tensor(value),
        }
    if isinstance(value, np.ndarray):
        return describe_value(torch.from_numpy(np.ascontiguousarray(value)), depth)
    if isinstance(value, _PLAIN):
        return value if not (isinstance(value, float) and math.isnan(value)) else "nan"
    if isinstance(value, numbers.Number):
        return repr(value)
    if depth < 4 and isinstance(value, (tuple, list)):
        return [describe_value(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, dict):
        return {str(k): describe_value(v, depth + 1) for k, v in sorted(value.items(), key=str)}
    return {"object": _name(type(value))}


def describe_data(data) -> dict:
    """A ``data=`` iterable: type, number of batches, batch settings, and the content of an
    in-memory dataset (``TensorDataset``, a list of batches)."""
    out = {"type": _name(type(data))}
    if hasattr(data, "__next__"):  # a one-shot iterator: nothing more to read without using it
        return out
    try:
        out["len"] = len(data)
    except TypeError:
        pass
    if isinstance(data, torch.utils.data.DataLoader):
        out["batch_size"] = data.batch_size
        out["drop_last"] = bool(data.drop_last)
        out["sampler"] = _name(type(data.sampler))
        dataset = data.dataset
        try:
            out["dataset_len"] = len(dataset)
        except TypeError:
            pass
        if isinstance(dataset, torch.utils.data.TensorDataset):
            out["dataset"] = describe_value(list(dataset.tensors))
    elif isinstance(data, (list, tuple)):
        out["batches"] = describe_value(list(data))
    elif callable(getattr(data, "describe", None)):  # e.g. fit_distributed's row shards
        out.update(data.describe())
    return out


def compare(saved: dict, current: dict, path) -> list[str]:
    """Raise :class:`CheckpointMismatchError` if the runs cannot be mixed; return the notices
    for what may change on purpose (the learning rate)."""
    differences, notices = [], []
    for key, label in (
        ("structure", "model/guide structure (sample sites, distributions, shapes)"),
        ("objective", "objective"),
        ("data", "data"),
        ("dtype", "default dtype"),
    ):
        old, new = saved.get(key), current.get(key)
        if key == "objective" and old and new and old.get("type") != new.get("type"):
            old, new = old.get("type"), new.get("type")
        if old != new:
            differences.append(f"{label}: {_difference(old, new)}")
    if current.get("seed") is not None and saved.get("seed") != current.get("seed"):
        differences.append(
            f"seed: checkpoint {saved.get('seed')}, this run {current.get('seed')} (a resumed run "
            "continues the checkpoint's random stream; pass its seed, or seed=None)"
        )
    old, new = saved.get("optimizer") or {}, current.get("optimizer") or {}
    if old.get("type") != new.get("type"):
        differences.append(
            f"optimizer: checkpoint {old.get('type')}, this run {new.get('type')} (its state "
            "cannot be carried over)"
        )
    elif old.get("hyper") != new.get("hyper"):
        differences.append(f"optimizer {_difference(old.get('hyper'), new.get('hyper'))}")
    elif old.get("lr") != new.get("lr"):
        notices.append(f"learning rate {_lr(old.get('lr'))} -> {_lr(new.get('lr'))} (applied)")
    if differences:
        raise CheckpointMismatchError(
            f"the checkpoint {str(path)!r} was written by a run that cannot be continued by this "
            "one: " + "; ".join(differences) + ". Pass resume=False to start over (the file will "
            "be overwritten), or use another checkpoint path."
        )
    return notices


def _difference(old, new, where="") -> str:
    """The first place where two plain descriptions differ, in words."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=lambda k: (k != "type", str(k)))  # type first
        for key in keys:
            if old.get(key) != new.get(key):
                return _difference(
                    old.get(key), new.get(key), f"{where}.{key}" if where else str(key)
                )
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _difference(a, b, f"{where}[{i}]")
    at = f"{where}: " if where else ""
    return f"{at}checkpoint {_short(old)}, this run {_short(new)}"


def _short(value, limit=120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lr(values):
    if not values:
        return values
    return values[0] if len(set(map(repr, values))) == 1 else values


_NOT_PLAIN = object()


def _plain(value):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value) if isinstance(value, numbers.Real) else repr(value)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _hash_tensor(tensor) -> str:
    tensor = tensor.detach()
    if tensor.is_sparse:
        tensor = tensor.to_dense()
    flat = tensor.reshape(-1)
    digest = hashlib.blake2b(digest_size=16)
    if flat.numel() > HASH_ALL_UP_TO:
        stride = flat.numel() // (HASH_ALL_UP_TO // 16) + 1
        digest.update(repr(float(flat.double().sum())).encode())
        flat = flat[::stride]
    data = flat.cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    digest.update(data.numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
