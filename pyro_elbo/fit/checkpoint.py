"""Crash-safe checkpoints for :func:`pyro_elbo.fit`: atomic writes, safe loads, exact resume.

A checkpoint is one file written with ``torch.save`` holding only tensors and plain Python values:

* ``params``: the unconstrained value of every parameter the run optimizes, by name;
* ``fingerprint``: their shapes and dtypes (a checkpoint from another model/guide is refused);
* ``optim``: the optimizer's state (``state_dict`` of a torch optimizer, ``get_state()`` of a
  Pyro optimizer);
* ``rng``: the torch (and CUDA), numpy and Python random states;
* ``step``, ``losses``, ``skipped``, the convergence rule's state and the data position.

**Atomic write.**  The file is written to ``<path>.tmp``, flushed and ``fsync``-ed, then renamed
over ``<path>`` with ``os.replace`` (atomic on POSIX and Windows), and the directory is
``fsync``-ed so the rename itself is durable.  A crash at any point leaves either the previous
checkpoint or the new one, never a torn file.

**Safe load.**  Files are read with ``torch.load(weights_only=True)``, which refuses to unpickle
arbitrary objects; nothing in a checkpoint needs more.

**Exact resume.**  With the parameters, optimizer moments, random states and convergence state
restored, the steps after a resume draw the same random numbers and do the same arithmetic as an
uninterrupted run: on CPU the losses and parameters agree bit for bit.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "FORMAT",
    "check_fingerprint",
    "fingerprint",
    "get_rng_state",
    "load",
    "save_atomic",
    "set_rng_state",
]

#: the format tag stored in every checkpoint
FORMAT = "pyro_elbo.fit/1"

#: test hook: called as ``_before_commit(tmp_path, path)`` after the temporary file is written and
#: flushed, before it is fsync-ed and renamed (tests use it to simulate a crash mid-write)
_before_commit = None


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (not a fit checkpoint, or unsafe to load)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model/guide (parameter names or shapes)."""


# ------------------------------------------------------------------ writing and reading


def save_atomic(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically: temporary file, flush, fsync, rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        if _before_commit is not None:
            _before_commit(tmp, path)
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path, format: str = FORMAT) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; raise :class:`CheckpointError`
    if it is not a readable checkpoint of ``format`` (``fit``'s by default; ``fit_distributed``
    writes its own)."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read the checkpoint {path!r} ({type(error).__name__}: {error}). It is "
            "loaded with torch.load(weights_only=True), which refuses arbitrary pickled objects. "
            "Pass resume=False to start over (the file will be overwritten), or another "
            "checkpoint path."
        ) from error
    if not isinstance(state, dict) or state.get("format") != format:
        raise CheckpointError(
            f"{path!r} is not a {format.split('/')[0]} checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {format!r}). Pass resume=False to start over, or another checkpoint path."
        )
    return state


# ------------------------------------------------------------------ model/guide identity


def fingerprint(names, leaves) -> dict:
    """``{name: (shape, dtype)}`` of the optimized parameters."""
    return {
        name: [list(leaf.shape), str(leaf.dtype).replace("torch.", "")]
        for name, leaf in zip(names, leaves)
    }


def check_fingerprint(saved: dict, current: dict, path) -> None:
    """Raise :class:`CheckpointMismatchError` unless both runs optimize the same parameters."""
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    changed = [
        f"{name} (checkpoint {tuple(saved[name][0])} {saved[name][1]}, this run "
        f"{tuple(current[name][0])} {current[name][1]})"
        for name in sorted(set(saved) & set(current))
        if list(saved[name][0]) != list(current[name][0]) or saved[name][1] != current[name][1]
    ]
    if not (only_saved or only_current or changed):
        return
    parts = []
    if only_saved:
        parts.append(f"parameters only in the checkpoint: {_short(map(repr, only_saved))}")
    if only_current:
        parts.append(f"parameters only in this run: {_short(map(repr, only_current))}")
    if changed:
        parts.append(f"different shapes or dtypes: {_short(changed)}")
    raise CheckpointMismatchError(
        f"the checkpoint {os.fspath(path)!r} was written for a different model/guide: "
        + "; ".join(parts)
        + ". Pass resume=False to start over (the file will be overwritten), or use another "
        "checkpoint path."
    )


def _short(items, limit=6):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------ random states


def get_rng_state() -> dict:
    """torch (CPU and initialized CUDA devices), numpy and Python random states, as tensors and
    plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    py_state = state["python"]
    random.setstate(
        (py_state["version"], tuple(int(v) for v in py_state["internal"]), py_state["gauss_next"])
    )
