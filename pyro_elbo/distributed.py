r"""Data-parallel SVI on ``torch.distributed``: one process per core, GPU or machine.

The training itself is :func:`pyro_elbo.fit` (its data-parallel strategy,
:mod:`pyro_elbo.fit.data_parallel`: one all-reduce of the gradients per step, a sharded batch
source, rank 0 writes the checkpoints, the same NaN guard, convergence rule and result).  Call
``fit`` on every rank of a ``torchrun`` launch, after ``init_distributed()`` (or with
``distributed=True``), with the model written as for one process: a subsampled plate
(``pyro.plate("data", N, subsample_size=n)``: each rank draws its own subsample) or a
``data=`` minibatch source whose plate has the full size N::

    ctx = init_distributed()                             # joins the group torchrun set up
    result = fit(model, guide, data=loader, seed=0)      # rank r takes batches r, r + R, ...

This module keeps the launcher-facing pieces: :func:`init_distributed` (join the group),
:func:`launch` (``torchrun --nproc_per_node`` on one machine, for scripts and tests),
:func:`is_main_process`, and :func:`fit_distributed`, a thin wrapper over ``fit`` for in-memory
data: it shards the rows of a tensor, tuple of tensors or map-style ``Dataset`` with
``DistributedSampler`` into global batches of ``batch_size`` and calls ``fit``.  Its older
keyword contract (``model(*batch, full_size=N, subsample=idx)``) still works, with a
``DeprecationWarning``.

Backends: ``gloo`` when the data are on the CPU, ``nccl`` when they are on CUDA (each rank uses
``cuda:LOCAL_RANK``).  The gloo path is tested with 2 processes.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import socket
import time
import warnings
from dataclasses import dataclass, field, fields
from datetime import timedelta

import pyro.optim
import torch
import torch.distributed as dist

from pyro_elbo.fit import checkpoint as ckpt
from pyro_elbo.fit.data_parallel import DistributedContext, _local_rank, _resolve_device
from pyro_elbo.fit.optimizers import Scheduled
from pyro_elbo.fit.result import FitResult
from pyro_elbo.fit.row_shards import RowShards, _data_device

__all__ = [
    "DistributedContext",
    "DistributedResult",
    "fit_distributed",
    "init_distributed",
    "is_main_process",
    "launch",
    "load_checkpoint",
]

_LAUNCH_ENV = ("RANK", "WORLD_SIZE")


# ---------------------------------------------------------------------------------- process group


def init_distributed(
    backend: str | None = None, *, device=None, timeout: timedelta | None = None
) -> DistributedContext:
    """Join the process group that ``torchrun`` (or :func:`launch`) set up; return the context.

    * Already initialized: the existing group is used as it is.
    * Launched by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment): calls
      ``torch.distributed.init_process_group(backend, init_method="env://")``.
    * Otherwise: a single process, rank 0 of 1, and no group (nothing to synchronize).

    :param backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when ``device`` is CUDA, else
        ``"gloo"``.
    :param device: the device this rank computes on; a bare ``"cuda"`` means
        ``cuda:LOCAL_RANK``, and nccl without a device means the same.
    :param timeout: how long a collective may wait for the other ranks before failing
        (torch's default is 30 minutes for gloo).
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
    local_rank = _local_rank()
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        return DistributedContext(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            _resolve_device(device, backend, local_rank),
            backend,
        )
    if not all(key in os.environ for key in _LAUNCH_ENV):
        device = _resolve_device(device, backend, 0)
        return DistributedContext(0, 1, 0, device, None)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    device = _resolve_device(device, backend, local_rank)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs a CUDA device, got device={device}")
        torch.cuda.set_device(device)
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", **options)
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend()
    )


def is_main_process() -> bool:
    """True on rank 0, and in a process that belongs to no process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(rank, fn, nprocs, port, num_threads, args):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    finished = False
    try:
        fn(*args)
        finished = True
    finally:
        if dist.is_initialized():
            if finished:
                _leave_together(rank, nprocs)
            dist.destroy_process_group()


def _leave_together(rank, nprocs, timeout=60.0):
    """Every rank has finished its last collective before any tears gloo down (else one can
    abort: "terminate called without an active exception"): a gloo barrier, then counters on
    the group's store (outside gloo): "left" (the barrier returned) and "seen" (the other ranks
    are done with the store, so rank 0, its host, goes last)."""
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.add("pyro_elbo.launch.left", 1)
    deadline = time.monotonic() + timeout
    while store.add("pyro_elbo.launch.left", 0) < nprocs and time.monotonic() < deadline:
        time.sleep(0.005)
    if rank != 0:
        store.add("pyro_elbo.launch.seen", 1)
        return
    while store.add("pyro_elbo.launch.seen", 0) < nprocs - 1 and time.monotonic() < deadline:
        time.sleep(0.005)


def launch(fn, *args, nprocs: int = 2, num_threads: int | None = 1) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes, as ``torchrun --nproc_per_node`` would.

    Sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (a free
    port) in each child, so :func:`init_distributed` and :func:`fit_distributed` inside ``fn``
    join one group.  ``fn`` must be importable by name (a module-level function: the children
    are started with ``spawn``).  Results come back through files or other IPC, not the return
    value.  An exception in a child is raised here (``torch.multiprocessing.ProcessRaisedException``).

    :param num_threads: ``torch.set_num_threads`` in each child (1 by default, as torchrun does
        with ``OMP_NUM_THREADS``); ``None`` leaves it.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, numbers.Integral) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs!r}")
    import torch.multiprocessing as mp

    mp.spawn(
        _launched,
        args=(fn, int(nprocs), _free_port(), num_threads, args),
        nprocs=int(nprocs),
        join=True,
    )


# ---------------------------------------------------------------------------------- fit_distributed


#: the format tag of the checkpoints of ``fit_distributed`` before it ran through ``fit``
FORMAT = "pyro_elbo.distributed/1"


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`fit_distributed` (``fit``'s format; with
    ``world_size`` and every rank's random state in ``rng``), or by its older versions."""
    try:
        return ckpt.load(path)
    except ckpt.CheckpointError:
        return ckpt.load(path, format=FORMAT)


@dataclass(repr=False)
class DistributedResult(FitResult):
    """What :func:`fit_distributed` returns: a :class:`~pyro_elbo.fit.FitResult` (``losses``
    here a list: per step, the loss averaged over ranks, an estimate of the full-data loss;
    ``converged``, ``reason``, ``plot()``...) with the launch's figures:

    * ``start_step``: the step this run started from (0 unless resumed from a checkpoint);
    * ``step_seconds``: each step's wall time; ``param_names``: the parameters optimized;
    * ``rank``, ``world_size``, ``backend``, ``device``, ``batch_size`` (global),
      ``batch_size_per_rank``, ``epochs`` (passes over the data);
    * ``stopped_by``: ``"SIGINT"``/``"SIGTERM"`` when a signal to this rank ended the run early
      (``"a signal on another rank"`` when it went to another), else ``""``.
    """

    start_step: int = 0
    step_seconds: list = field(default_factory=list)
    param_names: list = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: object = None
    batch_size: int = 0
    batch_size_per_rank: int = 0
    epochs: float = 0.0
    stopped_by: str = ""


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _takes_keywords(fn) -> bool:
    """Whether ``fn`` is written for the old contract ``model(*batch, full_size=, subsample=)``."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "full_size" in parameters and "subsample" in parameters


def _optimizer(optim, lr, scheduler):
    """``fit_distributed``'s ``optim``/``lr``/``scheduler`` as ``fit``'s ``optim``."""
    if isinstance(optim, pyro.optim.PyroOptim):
        if scheduler is not None:
            raise ValueError("scheduler= works with torch optimizers; a PyroOptim carries its own "
                             "schedule (e.g. ClippedAdam's lrd)")
        return optim
    if optim is None:
        optim = functools.partial(torch.optim.Adam, lr=lr)
    elif not callable(optim):
        raise TypeError(
            "optim must be None, a pyro.optim.PyroOptim or a callable params -> "
            f"torch.optim.Optimizer, got {type(optim).__name__}"
        )
    return Scheduled(optim, scheduler if scheduler is not None else _no_schedule)


def _no_schedule(optimizer):
    return None


def fit_distributed(
    model,
    guide,
    data,
    *,
    num_steps: int,
    batch_size: int,
    loss=None,
    optim=None,
    lr: float = 0.01,
    scheduler=None,
    seed: int = 0,
    shuffle: bool = True,
    backend: str | None = None,
    device=None,
    checkpoint: str | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    log_every: int = 0,
) -> DistributedResult:
    """Fit ``guide`` to ``model`` by data-parallel SVI across the ranks of a torchrun launch:
    :func:`init_distributed`, then :func:`pyro_elbo.fit` on this rank's shard of ``data``.

    Call it on every rank (the same arguments everywhere).  Outside torchrun it runs as one
    process: plain minibatch SVI with the same batches as rank 0 of 1.

    :param model: called as ``model(*batch)`` with the rank's rows of each data tensor; its data
        plate has the full size (``pyro.plate("data", N, subsample_size=len(batch))``).  A model
        with ``full_size`` and ``subsample`` parameters gets the old keyword contract
        ``model(*batch, full_size=N, subsample=idx)`` (deprecated: write the plate as above, or
        call ``fit(..., data=loader)``).
    :param guide: called with the same arguments; autoguides need nothing more.
    :param data: a tensor, a tuple of tensors sharing their first (data) dimension, or a
        map-style ``torch.utils.data.Dataset`` (items are collated with ``default_collate``).
    :param int num_steps: total optimizer steps (a resumed run goes on up to this number).
    :param int batch_size: the *global* batch: rank r takes ``batch_size // world_size`` rows a
        step, so results do not depend on the number of ranks.  Must be divisible by it.
    :param loss: any ``pyro.infer.ELBO`` with ``loss_and_grads`` (default
        :class:`pyro_elbo.ELBO`).
    :param optim: ``None`` (``torch.optim.Adam(lr=lr)``), a callable ``params ->
        torch.optim.Optimizer``, or a ``pyro.optim.PyroOptim`` (e.g. ``ClippedAdam``).
    :param float lr: learning rate of the default Adam.
    :param scheduler: a callable ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped
        after every step (torch optimizers only).
    :param int seed: rank r seeds Pyro's RNGs with ``seed + r``; the data permutation of each
        epoch uses ``seed`` on all ranks.
    :param backend: ``"gloo"`` or ``"nccl"``; default from the device (nccl on CUDA).
    :param device: where each rank computes; default the data's device type.
    :param checkpoint: a file path: rank 0 writes ``fit``'s checkpoint there every
        ``checkpoint_every`` steps and at the end; ``resume`` continues from it as ``fit`` does
        (the same number of ranks: every rank's random state is in it).
    :param int log_every: rank 0 prints the mean loss every this many steps (0: never).
    :returns: a :class:`DistributedResult` (a ``FitResult``).
    """
    from pyro_elbo.fit.loop import fit

    num_steps = _positive_int("num_steps", num_steps)
    batch_size = _positive_int("batch_size", batch_size)
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (0 < lr < math.inf):
        raise ValueError(
            f"lr must be a positive number, got {lr!r} (with lr=0 no step would move the "
            "parameters)"
        )
    if loss is None:
        from pyro_elbo.objectives.elbo import ELBO

        loss = ELBO()
    if not hasattr(loss, "loss_and_grads"):
        raise TypeError(
            f"loss must be a pyro.infer.ELBO with loss_and_grads, got {type(loss).__name__}"
        )
    optim = _optimizer(optim, lr, scheduler)
    ctx = init_distributed(backend, device=device if device is not None else _data_device(data))
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by the number of "
            f"ranks ({ctx.world_size}); use e.g. batch_size="
            f"{max(1, batch_size // ctx.world_size) * ctx.world_size}"
        )
    keywords = _takes_keywords(model)
    if keywords:
        warnings.warn(
            "fit_distributed: the model(*batch, full_size=N, subsample=idx) contract is "
            "deprecated and will be removed in the next release; write the data plate as "
            "pyro.plate('data', N, subsample_size=len(batch)) and drop those parameters, or "
            "call pyro_elbo.fit(model, guide, data=loader) on every rank.",
            DeprecationWarning,
            stacklevel=2,
        )
    shards = RowShards(data, ctx, batch_size, seed, shuffle, keywords)
    timer = _StepTimer(ctx.is_main, log_every, num_steps)
    result = fit(
        model, guide, loss=loss, optim=optim, num_steps=num_steps, progress=False,
        convergence=None, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        resume=resume, seed=seed, callbacks=(timer,), compile=False, data=shards, init=None,
        method="svi", distributed=ctx if ctx.world_size > 1 else False,
    )
    names = timer.names or sorted(pyro.get_param_store().keys())
    values = {f.name: getattr(result, f.name) for f in fields(FitResult)}
    values["losses"] = [float(v) for v in result.losses]
    stopped = result.reason.startswith("interrupted (") and "KeyboardInterrupt" not in result.reason
    return DistributedResult(
        **values,
        start_step=result.resumed_from or 0,
        step_seconds=timer.seconds,
        param_names=names,
        rank=ctx.rank,
        world_size=ctx.world_size,
        backend=ctx.backend,
        device=ctx.device,
        batch_size=batch_size,
        batch_size_per_rank=shards.per_rank,
        epochs=result.num_steps / shards.batches_per_epoch,
        stopped_by=result.reason[len("interrupted ("):].split(")")[0] if stopped else "",
    )


class _StepTimer:
    """fit_distributed's callback: each step's wall time, the parameter names, and rank 0's log
    line every ``log_every`` steps."""

    __name__ = "fit_distributed's step timer"

    def __init__(self, main, log_every, num_steps):
        self.main, self.log_every, self.num_steps = main, log_every, num_steps
        self.seconds, self.names, self.last = [], [], None

    def __call__(self, state):
        now = time.perf_counter()
        if self.last is not None:
            self.seconds.append(now - self.last)
        self.last = now
        if not self.names:
            self.names = sorted(state._names)
        if self.log_every and state.step % self.log_every == 0 and self.main:
            print(f"step {state.step}/{self.num_steps}  loss {state.loss:.6g}", flush=True)
        return False
