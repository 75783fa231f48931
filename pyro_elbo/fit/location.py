"""Where a checkpoint goes: checked before step 1, and held by one run at a time.

* :func:`check_location`: the path is a file path in a directory that can be created and
  written (a small file is written, ``fsync``-ed and removed, so a read-only file system,
  missing permissions or a full disk show now, not after the compute is spent);
* :func:`check_space`: room for one checkpoint (the caller's estimate);
* :func:`acquire_lock`: an advisory ``flock`` on ``<path>.lock`` holding the process id, taken
  before step 1 and released at the end of the run.  A second run on the same path gets
  :class:`~pyro_elbo.fit.checkpoint.CheckpointLockedError` naming the holder's pid.  The kernel
  drops a ``flock`` when its process dies, so the lock of a killed run is recovered by the next
  run, which also removes the temporary files the dead writer left.  Without ``fcntl``
  (Windows) the lock file is created exclusively and a file naming a dead pid is taken over.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
import time

from pyro_elbo.fit.checkpoint import (
    CheckpointLockedError,
    CheckpointPathError,
    _describe_os_error,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["acquire_lock", "check_location", "check_space", "claim", "estimate_bytes"]


def claim(path):
    """:func:`check_location`, then :func:`acquire_lock`: what ``fit`` does before step 1.
    Returns the lock (release it at the end of the run)."""
    check_location(path)
    return acquire_lock(path)


def estimate_bytes(leaves, num_steps: int) -> int:
    """A generous size of one checkpoint: the parameters and up to three optimizer tensors per
    parameter (Adam's two moments), the losses, and 64 KB for random states and framing."""
    params = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    return 4 * params + 16 * int(num_steps) + 64 * 1024


def check_location(path) -> str:
    """Refuse, with :class:`CheckpointPathError`, a checkpoint path that cannot be written: a
    directory, a parent that is a file, a directory that cannot be created or written (read-only
    file system, permissions, full disk: a small file is written, fsync-ed and removed).
    Creates the parent directory; returns it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointPathError(
            f"the checkpoint path {path!r} is a directory; pass a file path, e.g. "
            f"{os.path.join(path, 'fit.ckpt')!r}.",
            path=path,
        )
    directory = os.path.dirname(os.path.abspath(path))
    ancestor = directory
    while ancestor and not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor and not os.path.isdir(ancestor):
        raise CheckpointPathError(
            f"cannot put the checkpoint {path!r} under {ancestor!r}: that is a file, not a "
            "directory. Pass a checkpoint path in a directory.",
            path=path,
        )
    try:
        os.makedirs(directory, exist_ok=True)
        # not named like a checkpoint's temporary file: the lock holder removes those
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.", suffix=".tmp")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise CheckpointPathError(
            f"cannot write the checkpoint {path!r} ({_describe_os_error(error)}), found before "
            "step 1. Pass a checkpoint path in a writable directory with free space, or "
            "checkpoint=None.",
            path=path,
        ) from error
    return directory


def check_space(path, num_bytes: int) -> None:
    """Refuse, with :class:`CheckpointPathError`, a location with less than ``num_bytes`` free
    (the caller's estimate of one checkpoint; the previous one stays until the rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    if free < num_bytes:
        raise CheckpointPathError(
            f"not enough space for the checkpoint {path!r}: about {_size(num_bytes)} needed, "
            f"{_size(free)} free in {directory!r} (found before step 1). Free space, or pass "
            "another checkpoint path.",
            path=path,
        )


def _size(num_bytes) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


class _Lock:
    """An advisory lock on ``<path>.lock`` (see :func:`acquire_lock`)."""

    def __init__(self, path, fd, lock_path):
        self.path, self._fd, self.lock_path = path, fd, lock_path

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still holding it: no one else can be in it
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire_lock(path) -> _Lock:
    """Take the advisory lock of checkpoint ``path`` for this process, or raise
    :class:`CheckpointLockedError` naming the pid of the live run that holds it.  A lock left by
    a dead process is taken over (the kernel released it), and the temporary files that process
    left are removed."""
    path = os.fspath(path)
    lock_path = path + ".lock"
    while True:
        if fcntl is None:
            fd = _exclusive_create(path, lock_path)
            break
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            for _ in range(50):  # the holder writes its pid just after taking the lock
                if holder is not None:
                    break
                time.sleep(0.01)
                holder = _read_pid(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointPathError(
                    f"cannot lock the checkpoint {path!r} ({_describe_os_error(error)}); pass "
                    "a checkpoint path on a local file system.",
                    path=path,
                ) from error
            raise _locked(path, holder) from None
        try:  # the file may have been removed by its previous holder after we opened it
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a writer that died
        try:
            os.unlink(stale)
        except OSError:
            pass
    return _Lock(path, fd, lock_path)


def _exclusive_create(path, lock_path):
    for _ in range(2):
        try:
            return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(lock_path, "rb") as handle:
                holder = _parse_pid(handle.read())
            if holder is not None and _alive(holder):
                raise _locked(path, holder) from None
            os.unlink(lock_path)  # stale: its process is gone
    raise _locked(path, None)


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read_pid(fd):
    try:
        return _parse_pid(os.pread(fd, 64, 0))
    except OSError:
        return None


def _parse_pid(raw):
    try:
        return int(raw.decode().strip())
    except ValueError:
        return None


def _locked(path, pid) -> CheckpointLockedError:
    who = f"process {pid}" if pid is not None else "another process"
    return CheckpointLockedError(
        f"the checkpoint {path!r} is in use by {who} (a run of fit on the same path); two runs "
        "writing one checkpoint would mix their states. Wait for it to finish, stop it, or pass "
        "another checkpoint path.",
        path=path,
        pid=pid,
    )
