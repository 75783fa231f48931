"""Crash-safe checkpoints for :func:`pyro_elbo.fit`: atomic writes, safe loads, exact resume.

A checkpoint is one file written with ``torch.save`` holding only tensors and plain Python values:

* ``params``: the unconstrained value of every parameter the run optimizes, by name;
* ``fingerprint``: their shapes and dtypes (a checkpoint from another model/guide is refused);
* ``optim``: the optimizer's state (``state_dict`` of a torch optimizer, ``get_state()`` of a
  Pyro optimizer);
* ``rng``: the torch (and CUDA), numpy and Python random states;
* ``step``, ``losses``, ``skipped``, the convergence rule's state and the data position.

**Atomic write.**  The file is written to a temporary file of its own
(``<path>.<random>.tmp``, never shared by two writers), flushed and ``fsync``-ed, then renamed
over ``<path>`` with ``os.replace`` (atomic on POSIX and Windows), and the directory is
``fsync``-ed so the rename itself is durable.  A crash at any point leaves either the previous
checkpoint or the new one, never a torn file; a failed write removes its temporary file and
raises :class:`CheckpointWriteError` naming the path.

**One writer per path** (:mod:`.location`).  A run holds an advisory lock (``flock`` on ``<path>.lock``, holding its
process id) from before step 1 to its end: a second run on the same path is refused at start
with :class:`CheckpointLockedError`, naming the holder's pid.  The kernel drops the lock when its
process dies, so a killed run leaves no stale lock; the next run takes it over and removes the
temporary files the dead writer left.

**The location is checked before step 1** (:mod:`.location`): a
path whose parent is a file, a read-only or full directory is refused with
:class:`CheckpointPathError` before any compute is spent.

**Safe load.**  Files are read with ``torch.load(weights_only=True)``, which refuses to unpickle
arbitrary objects; nothing in a checkpoint needs more.

**Exact resume.**  With the parameters, optimizer moments, random states and convergence state
restored, the steps after a resume draw the same random numbers and do the same arithmetic as an
uninterrupted run: on CPU the losses and parameters agree bit for bit.
"""

from __future__ import annotations

import errno
import os
import random
import re
import tempfile

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointPathError",
    "CheckpointWriteError",
    "FORMAT",
    "ResumeNotice",
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
    """A checkpoint was written by a run that cannot be continued by this one (other parameters,
    objective, optimizer, data, dtype, seed or batches); the message says what differs."""


class CheckpointLockedError(CheckpointError):
    """Another live run holds the checkpoint path.  Attributes: ``path``, ``pid`` (the holder's
    process id, ``None`` if unknown)."""

    def __init__(self, message, *, path, pid):
        super().__init__(message)
        self.path, self.pid = path, pid


class CheckpointPathError(CheckpointError):
    """The checkpoint location cannot hold a checkpoint (found before step 1).  ``path``."""

    def __init__(self, message, *, path):
        super().__init__(message)
        self.path = path


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; the previous checkpoint (if any) is left as it was.
    Attributes: ``path``, ``errno`` (of the ``OSError`` behind it, or ``None``)."""

    def __init__(self, message, *, path, errno=None):
        super().__init__(message)
        self.path, self.errno = path, errno


class ResumeNotice(UserWarning):
    """One line when a resumed run differs from the checkpoint's on purpose (a new learning
    rate, another number of steps): the change is applied."""


# ------------------------------------------------------------------ writing and reading


def save_atomic(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file of its own, flush, fsync, rename.

    Raises :class:`CheckpointWriteError` (the temporary file removed, ``path`` untouched) when
    the write fails."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp"
        )
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            if _before_commit is not None:
                _before_commit(tmp, path)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(directory)
    except (OSError, RuntimeError) as error:
        code = getattr(error, "errno", None)
        raise CheckpointWriteError(
            f"could not write the checkpoint {path!r} ({_describe_os_error(error)}); the "
            "previous checkpoint there, if any, is unchanged. Free space or choose another "
            "checkpoint path.",
            path=path,
            errno=code,
        ) from error
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _describe_os_error(error) -> str:
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC:
        return "the disk is full (ENOSPC)"
    if code == errno.EROFS:
        return "the file system is read-only (EROFS)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    text = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return f"{type(error).__name__}: {text}"


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: keys every checkpoint of ``fit`` holds
REQUIRED_KEYS = ("fingerprint", "params", "optim", "rng", "step", "losses", "skipped", "done")


def load(path, format: str = FORMAT, required=()) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; raise :class:`CheckpointError`
    if it is not a readable checkpoint of ``format`` (``fit``'s by default; ``fit_distributed``
    writes its own) or lacks one of the ``required`` keys (``REQUIRED_KEYS`` to resume)."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read the checkpoint {path!r}: {_load_failure(error)}. Pass resume=False to "
            "start over (the file will be overwritten), or another checkpoint path."
        ) from None
    if not isinstance(state, dict) or state.get("format") != format:
        raise CheckpointError(
            f"{path!r} is not a {format.split('/')[0]} checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {format!r}). Pass resume=False to start over, or another checkpoint path."
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint {path!r} lacks {missing} (damaged, or written by another version "
            "of pyro_elbo); it cannot be resumed. Pass resume=False to start over (the file "
            "will be overwritten), or another checkpoint path."
        )
    return state


def _load_failure(error) -> str:
    """What went wrong, without torch's advice to retry with ``weights_only=False`` (which would
    run whatever the file's pickle holds)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "weights_only" in text.lower() or "weights only" in text.lower():
        what = f" ({found.group(1)})" if found else ""
        return (
            f"it holds pickled Python objects{what} besides tensors and plain values, and is "
            "loaded with torch.load(weights_only=True), which refuses them: unpickling them "
            "could run arbitrary code. A pyro_elbo checkpoint never holds such objects, so this "
            "file was written by something else or tampered with; do not load it with "
            "weights_only=False"
        )
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first} (a torn or foreign file)"


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
