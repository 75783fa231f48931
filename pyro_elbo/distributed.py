r"""Data-parallel SVI on ``torch.distributed``: one process per core, GPU or machine.

Launch a script that calls :func:`fit_distributed` with ``torchrun`` (or, on one machine, with
:func:`launch`)::

    torchrun --nproc_per_node=4 my_script.py

Every process (rank r of R) holds the whole model and guide, and a shard of the data.

The objective is the full-data ELBO (Hoffman et al. 2013, "Stochastic variational inference",
JMLR 14)::

    L(phi) = E_q[log p(z) - log q(z)] + sum_{i=1..N} E_q[log p(x_i | z)]

At each step rank r draws its own minibatch B_r (n / R rows) and its own z_r ~ q, and estimates

    L_r = log p(z_r) - log q(z_r) + N / |B_r| * sum_{i in B_r} log p(x_i | z_r)

(the ``N / |B_r|`` factor is what ``pyro.plate("data", N, subsample=idx)`` applies).  Each L_r is
unbiased for L: B_r is a uniformly random subset and z_r ~ q.  So is their mean, and the gradient
that every rank applies is the mean over ranks of grad L_r.  That is the estimator of one process
with R particles and the same total batch n.  This is data parallelism as in PyTorch's DDP (Li
et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB),
done here with one all-reduce of the unconstrained parameters' gradients:

1. each rank seeds its RNG with ``seed + rank`` (its own particles);
2. the ranks run the model and guide once to create the parameters; rank 0's values are
   broadcast, so every rank starts from the same point;
3. the data are sharded with :class:`torch.utils.data.DistributedSampler` (one permutation per
   epoch, shared by all ranks; rank r takes every R-th index);
4. each step: ``loss.loss_and_grads`` on the rank's batch, one all-reduce (sum, then / R) of the
   gradients, packed in one buffer per dtype together with the loss, then the same optimizer
   step on every rank.  Parameters stay identical across ranks without being sent again;
5. checkpoints (optional) are written by rank 0 only, atomically: a temporary file, ``fsync``,
   then ``os.replace`` (:mod:`pyro_elbo.fit.checkpoint`).  As in ``fit``, rank 0 checks and
   locks the path before step 1, a resume compares the run's identity (parameters and their
   dtypes, objective, optimizer, data, seed, batches; :mod:`pyro_elbo.fit.identity`) and
   applies a new learning rate with a one-line notice, a failed write keeps the previous
   checkpoint (``checkpoint_error`` on the result), and SIGINT/SIGTERM on any rank stop every
   rank after the same step, checkpointed (the flag travels in the gradient all-reduce).

The model and the guide are called as::

    model(*batch, full_size=N, subsample=idx)

``batch`` holds the rank's rows of each data tensor, ``idx`` their row numbers in the full data
(on the batch's device), and ``N`` the number of rows in the full data.  The model's data plate
says how big the full data are and which rows this batch holds::

    def model(X, y, full_size, subsample):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
        with pyro.plate("data", full_size, subsample=subsample):
            pyro.sample("obs", dist.Normal((X * w).sum(-1), 1.0), obs=y)

``pyro.plate("data", full_size, subsample_size=len(y))`` scales the same way.  With explicit
indices, parameters of local latents (AutoNormal with ``create_plates``) are indexed by the rows
of the batch.  Do not let the plate draw its own subsample (``subsample_size`` with no data
passed in): each rank would then draw from the whole data with its own RNG, which is still
unbiased but is not a shard.

Backends: ``gloo`` when the data are on the CPU, ``nccl`` when they are on CUDA (each rank uses
``cuda:LOCAL_RANK``).  The nccl path has not been run by this package's tests (no GPU was
available); the gloo path is tested with 2 processes.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import pyro
import pyro.optim
import pyro.poutine as poutine
import pyro.util
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from pyro_elbo.fit import checkpoint as ckpt
from pyro_elbo.fit import identity, interrupt, location

__all__ = [
    "DistributedContext",
    "DistributedResult",
    "fit_distributed",
    "init_distributed",
    "is_main_process",
    "launch",
]

_LAUNCH_ENV = ("RANK", "WORLD_SIZE")


# ---------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device`` and ``backend``.

    ``backend`` is ``None`` for a single process without a process group (plain minibatch SVI).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(device, backend, local_rank) -> torch.device:
    if device is None:
        device = "cuda" if backend == "nccl" else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


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
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


# ---------------------------------------------------------------------------------- data


class _Shards:
    """This rank's minibatches: the row numbers of step ``s`` and the rows themselves."""

    def __init__(self, data, ctx: DistributedContext, batch_size: int, seed: int, shuffle: bool):
        self.kind, self.data, self.size = _inspect_data(data)
        self.device = ctx.device
        self.sampler = DistributedSampler(
            range(self.size),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=shuffle,
            seed=seed,
        )
        if self.size == 0:
            raise ValueError("data have no rows: pass data with at least batch_size rows")
        self.per_rank = batch_size // ctx.world_size
        self.batches_per_epoch = len(self.sampler) // self.per_rank
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"batch_size={batch_size} is too large: with {ctx.world_size} ranks each rank "
                f"holds {len(self.sampler)} of the {self.size} rows, fewer than its "
                f"{self.per_rank} rows per batch. Use batch_size <= "
                f"{len(self.sampler) * ctx.world_size}."
            )
        self._epoch, self._indices = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._indices = torch.tensor(list(self.sampler), dtype=torch.long)
            self._epoch = epoch
        return self._indices[pos * self.per_rank : (pos + 1) * self.per_rank]

    def batch(self, idx: torch.Tensor) -> tuple:
        if self.kind == "tensors":
            rows = []
            for t in self.data:
                i = idx.to(t.device)
                rows.append(t.index_select(0, i).to(self.device, non_blocking=True))
            return tuple(rows)
        items = torch.utils.data.default_collate([self.data[i] for i in idx.tolist()])
        if isinstance(items, (tuple, list)):
            return tuple(_to(x, self.device) for x in items)
        return (_to(items, self.device),)


def _to(x, device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def _inspect_data(data):
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = {t.shape[0] if t.dim() else None for t in data}
        if None in sizes or len(sizes) != 1:
            shapes = [tuple(t.shape) for t in data]
            raise ValueError(
                f"data tensors must share their first (data) dimension, got shapes {shapes}"
            )
        return "tensors", tuple(data), sizes.pop()
    if (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (tuple, list, str, bytes))
    ):
        return "dataset", data, len(data)
    raise TypeError(
        "data must be a tensor, a tuple of tensors with a common first dimension, or a "
        f"map-style torch Dataset (with __len__ and __getitem__), got {type(data).__name__}"
    )


def _data_device(data) -> str:
    """The data's device type: CUDA data means ``cuda:LOCAL_RANK`` on every rank."""
    tensors = (data,) if isinstance(data, torch.Tensor) else data
    if isinstance(tensors, (tuple, list)):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                return t.device.type
    return "cpu"


# ---------------------------------------------------------------------------------- optimizer


class _Optimizer:
    """One interface over a torch optimizer (+ scheduler) and a ``pyro.optim.PyroOptim``."""

    def __init__(self, optim, lr, scheduler, params):
        self.params = params
        self.pyro_optim = None
        self.scheduler = None
        if isinstance(optim, pyro.optim.PyroOptim):
            if scheduler is not None:
                raise ValueError(
                    "scheduler= works with torch optimizers; a PyroOptim carries its own "
                    "schedule (e.g. ClippedAdam's lrd)"
                )
            self.pyro_optim, self.torch_optim = optim, None
            return
        if optim is None:
            self.torch_optim = torch.optim.Adam(params, lr=lr)
        elif callable(optim):
            self.torch_optim = optim(params)
            if not isinstance(self.torch_optim, torch.optim.Optimizer):
                raise TypeError(
                    "optim must be a pyro.optim.PyroOptim or a callable params -> "
                    "torch.optim.Optimizer (e.g. lambda p: torch.optim.SGD(p, lr=0.1)); it "
                    f"returned a {type(self.torch_optim).__name__}"
                )
        else:
            raise TypeError(
                "optim must be None, a pyro.optim.PyroOptim or a callable params -> "
                f"torch.optim.Optimizer, got {type(optim).__name__}"
            )
        if scheduler is not None:
            self.scheduler = scheduler(self.torch_optim)

    def step(self):
        if self.pyro_optim is not None:
            self.pyro_optim(self.params)
        else:
            self.torch_optim.step()
            if self.scheduler is not None:
                self.scheduler.step()

    def state_dict(self):
        if self.pyro_optim is not None:
            return {"pyro": self.pyro_optim.get_state()}
        state = {"torch": self.torch_optim.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state):
        if self.pyro_optim is not None:
            self.pyro_optim.set_state(state["pyro"])
            return
        self.torch_optim.load_state_dict(state["torch"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


# ---------------------------------------------------------------------------------- collectives


class _Synchronizer:
    """Packs gradients (and the loss) into one flat buffer per (dtype, device) and averages
    them across ranks with one all-reduce per buffer."""

    def __init__(self, params, world_size):
        self.params, self.world_size = params, world_size
        groups = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        self.groups = list(groups.items())
        # the loss travels in the float64 buffer if there is one, else in the first
        keys = [key for key, _ in self.groups]
        f64 = [k for k in keys if k[0] == torch.float64]
        self.loss_key = f64[0] if f64 else keys[0]

    def broadcast_params(self):
        if self.world_size == 1:
            return
        with torch.no_grad():
            for _, members in self.groups:
                flat = torch.cat([self.params[i].detach().reshape(-1) for i in members])
                dist.broadcast(flat, src=0)
                self._unpack(flat, members, lambda i, v: self.params[i].copy_(v))

    def average(self, loss: float, stop: bool = False) -> tuple[float, bool]:
        """Average the parameters' ``.grad`` in place across ranks; return the mean loss and
        whether any rank asked to ``stop`` (a signal)."""
        mean_loss, stop_any = loss, stop
        for key, members in self.groups:
            parts = []
            for i in members:
                p = self.params[i]
                parts.append(
                    torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
                )
            carries_loss = key == self.loss_key
            if carries_loss:
                parts.append(torch.tensor([loss, float(stop)], dtype=key[0], device=key[1]))
            flat = torch.cat(parts)
            if self.world_size > 1:
                dist.all_reduce(flat)
                flat /= self.world_size
            if carries_loss:
                mean_loss, stop_any = float(flat[-2]), bool(flat[-1] > 0)
            self._unpack(flat, members, self._set_grad)
        return mean_loss, stop_any

    def _set_grad(self, i, value):
        p = self.params[i]
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)

    def _unpack(self, flat, members, put):
        pos = 0
        for i in members:
            n = self.params[i].numel()
            put(i, flat[pos : pos + n].view_as(self.params[i]))
            pos += n


def _all_ranks_ok(ctx, error: BaseException | None) -> None:
    """Fail on every rank if any rank failed (so no rank waits for a collective forever)."""
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else ctx.rank + 1], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag) > 0:
        raise RuntimeError(
            f"rank {int(flag) - 1} failed while setting up the parameters; see its traceback"
        )


def _gather(ctx, obj):
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(ctx, obj):
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------- checkpoints


#: the format tag of ``fit_distributed``'s checkpoints
FORMAT = "pyro_elbo.distributed/1"


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`fit_distributed`: ``torch.load(weights_only=True)``
    (tensors and plain values only, as :mod:`pyro_elbo.fit.checkpoint` writes them)."""
    return ckpt.load(path, format=FORMAT)


# ---------------------------------------------------------------------------------- fitting


@dataclass
class DistributedResult:
    """What :func:`fit_distributed` returns (the same on every rank except ``rank``).

    * ``losses``: per step, the loss averaged over ranks: an estimate of the full-data loss
      (-ELBO for :class:`~pyro_elbo.ELBO`), from the whole global batch;
    * ``num_steps``: steps taken in total (including those before a resume);
    * ``start_step``: the step this run started from (0 unless resumed from a checkpoint);
    * ``seconds``: wall time of this call's steps; ``step_seconds``: each of them;
    * ``param_names``: the parameters optimized (in the param store);
    * ``rank``, ``world_size``, ``backend``, ``device``, ``batch_size`` (global),
      ``batch_size_per_rank``, ``epochs`` (passes over the data);
    * ``stopped_by``: ``"SIGINT"``/``"SIGTERM"`` when a signal to this rank ended the run early
      (``"a signal on another rank"`` when it went to another), else ``""``;
    * ``checkpoint_error``: the error of a checkpoint write that failed (rank 0), else ``None``.
    """

    losses: list[float]
    num_steps: int
    start_step: int
    seconds: float
    step_seconds: list[float] = field(repr=False)
    param_names: list[str] = field(repr=False)
    rank: int
    world_size: int
    backend: str | None
    device: torch.device
    batch_size: int
    batch_size_per_rank: int
    epochs: float
    stopped_by: str = ""
    checkpoint_error: Exception | None = None


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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
    """Fit ``guide`` to ``model`` by data-parallel SVI across the ranks of a torchrun launch.

    Call it on every rank (the same arguments everywhere).  Outside torchrun it runs as one
    process: plain minibatch SVI with the same batches as rank 0 of 1.

    :param model: called as ``model(*batch, full_size=N, subsample=idx)`` (see the module
        docstring); the data plate must be ``pyro.plate(name, full_size, subsample=subsample)``.
    :param guide: called with the same arguments; autoguides need nothing more.
    :param data: a tensor, a tuple of tensors sharing their first (data) dimension, or a
        map-style ``torch.utils.data.Dataset`` (items are collated with ``default_collate``).
    :param int num_steps: total optimizer steps (a resumed run goes on up to this number).
    :param int batch_size: the *global* batch: rank r takes ``batch_size // world_size`` rows a
        step, so results do not depend on the number of ranks.  Must be divisible by it.
    :param loss: any ``pyro.infer.ELBO`` with ``loss_and_grads`` (default
        :class:`pyro_elbo.ELBO`).
    :param optim: ``None`` (``torch.optim.Adam(lr=lr)`` over all parameters), a callable
        ``params -> torch.optim.Optimizer``, or a ``pyro.optim.PyroOptim`` (e.g.
        ``ClippedAdam``).
    :param float lr: learning rate of the default Adam.
    :param scheduler: a callable ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped
        after every step (torch optimizers only).
    :param int seed: rank r seeds Pyro's RNGs (torch, random, numpy) with ``seed + r``;
        the data permutation of each epoch uses ``seed`` on all ranks.
    :param backend: ``"gloo"`` or ``"nccl"``; default from the device (nccl on CUDA).
    :param device: where each rank computes; default the data's device type (CUDA data: each
        rank uses ``cuda:LOCAL_RANK``, so create the data and the model's tensors there, e.g. on
        ``init_distributed(device="cuda").device``).
    :param checkpoint: a file path: rank 0 writes ``{step, params, optimizer, rng, losses}``
        there every ``checkpoint_every`` steps and at the end.
    :param bool resume: when ``checkpoint`` exists, continue from it (rank 0 reads it and sends
        it to the others).  With the same number of ranks the continuation is exact (RNG
        states of all ranks are saved); with a different number, the ranks are reseeded.
        A checkpoint of another run (parameters or their dtypes, objective, optimizer, data,
        seed, batches) raises ``CheckpointMismatchError``; a new ``lr`` or ``num_steps`` is
        applied with a one-line ``ResumeNotice``.
    :param int log_every: rank 0 prints the mean loss every this many steps (0: never).
    """
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
    ctx = init_distributed(backend, device=device if device is not None else _data_device(data))
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by the number of "
            f"ranks ({ctx.world_size}); use e.g. batch_size="
            f"{max(1, batch_size // ctx.world_size) * ctx.world_size}"
        )
    shards = _Shards(data, ctx, batch_size, seed, shuffle)
    lock, error = None, None
    if checkpoint is not None and ctx.is_main:
        try:  # before any compute: a path that cannot be written, or a second writer
            lock = location.claim(checkpoint)
        except ckpt.CheckpointError as e:
            error = e
    if checkpoint is not None:
        _all_ranks_ok(ctx, error)
    try:
        return _fit(
            model, guide, data, ctx, shards, loss, optim, lr, scheduler, seed, shuffle,
            num_steps, batch_size, checkpoint, checkpoint_every, resume, log_every,
        )
    finally:
        if lock is not None:
            lock.release()


def _fit(
    model, guide, data, ctx, shards, loss, optim, lr, scheduler, seed, shuffle,
    num_steps, batch_size, checkpoint, checkpoint_every, resume, log_every,
):
    pyro.set_rng_seed(seed + ctx.rank)

    def args_of(step):
        idx = shards.indices(step)
        kwargs = {"full_size": shards.size, "subsample": idx.to(ctx.device)}
        return shards.batch(idx), kwargs

    # ---- parameters: create on every rank, check they agree, take rank 0's values
    error, names = None, []
    try:
        batch, kwargs = args_of(0)
        with poutine.trace(param_only=True) as capture:
            loss.loss(model, guide, *batch, **kwargs)
        names = sorted(capture.trace.nodes)
        if not names:
            raise ValueError("the model and guide have no parameters (pyro.param) to optimize")
    except TypeError as e:
        if "full_size" in str(e) or "subsample" in str(e):
            error = TypeError(
                "fit_distributed calls model(*batch, full_size=N, subsample=idx) and the guide "
                f"likewise; add those keyword arguments to their signatures ({e})"
            )
        else:
            error = e
    except Exception as e:
        error = e
    _all_ranks_ok(ctx, error)
    all_names = _gather(ctx, names)
    for r, other in enumerate(all_names):
        if other != names:
            raise RuntimeError(
                f"rank {r} has different parameters than rank {ctx.rank}: "
                f"{sorted(set(other) ^ set(names))[:5]}; every rank must build the same model "
                "and guide"
            )
    params = [pyro.param(name).unconstrained() for name in names]
    for name, p in zip(names, params):
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(f"parameter {name!r} is not a leaf tensor that requires grad")
        if p.device != ctx.device and ctx.backend == "nccl":
            raise ValueError(
                f"parameter {name!r} is on {p.device} but this rank computes on {ctx.device}; "
                "create the model's tensors on the data's device"
            )
    optimizer = _Optimizer(optim, lr, scheduler, params)
    run = _identity(loss, optimizer, data, seed, shuffle, batch_size, scheduler)
    if checkpoint is not None:
        error = None
        try:
            if ctx.is_main:
                location.check_space(checkpoint, location.estimate_bytes(params, num_steps))
        except ckpt.CheckpointError as e:
            error = e
        _all_ranks_ok(ctx, error)
    sync = _Synchronizer(params, ctx.world_size)
    num_params_in_store = len(pyro.get_param_store())

    # ---- resume (rank 0 reads, everybody receives), then rank 0's values everywhere
    start, losses = 0, []
    state = None
    if checkpoint is not None and resume:
        exists = _broadcast_object(ctx, os.path.exists(checkpoint) if ctx.is_main else None)
        if exists:
            state = _broadcast_object(ctx, load_checkpoint(checkpoint) if ctx.is_main else None)
    if state is not None:
        saved = sorted(state["params"])
        ckpt.check_fingerprint(
            ckpt.fingerprint(saved, [state["params"][n] for n in saved]),
            ckpt.fingerprint(names, params),
            checkpoint,
        )
        notices = identity.compare(state["run"], run, checkpoint) if "run" in state else []
        if state.get("num_steps", num_steps) != num_steps:
            notices.append(f"up to {num_steps} steps (the checkpoint's call asked for "
                           f"{state['num_steps']})")
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(state["params"][name].to(p.device))
        _load_optimizer(optimizer, state, run, checkpoint)
        start, losses = int(state["step"]), list(state["losses"])
        if notices and ctx.is_main:
            warnings.warn(f"resuming {checkpoint!r} at step {start}: {'; '.join(notices)}",
                          ckpt.ResumeNotice, stacklevel=3)
    sync.broadcast_params()
    if state is not None:
        if state["world_size"] == ctx.world_size:
            ckpt.set_rng_state(state["rng"][ctx.rank])
        else:
            warnings.warn(
                f"resuming a {state['world_size']}-rank checkpoint on {ctx.world_size} ranks: "
                "RNG streams are reseeded (seed + rank + world_size * step)",
                stacklevel=2,
            )
            pyro.set_rng_seed(seed + ctx.rank + ctx.world_size * start)

    written = {"error": None}

    def save(step):
        rng = _gather(ctx, ckpt.get_rng_state())
        if not ctx.is_main:
            return
        with torch.no_grad():
            values = {n: p.detach().cpu().clone() for n, p in zip(names, params)}
        state = {
            "format": FORMAT,
            "step": step,
            "params": values,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "losses": losses,
            "world_size": ctx.world_size,
            "seed": seed,
            "batch_size": batch_size,
            "run": run,
            "num_steps": num_steps,
        }
        try:
            ckpt.save_atomic(state, checkpoint)
        except ckpt.CheckpointWriteError as e:  # keep going: the parameters stay in memory
            if written["error"] is None:
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)
            written["error"] = e

    # ---- the loop
    step_seconds = []
    t_start = time.perf_counter()
    signals = interrupt.DeferSignals(sigterm=checkpoint is not None)
    with signals:
        done, stopped = _loop(
            model, guide, loss, ctx, args_of, params, optimizer, sync, names, losses,
            step_seconds, start, num_steps, log_every, checkpoint, checkpoint_every, save,
            signals, num_params_in_store,
        )
    seconds = time.perf_counter() - t_start
    if stopped and checkpoint is not None and done % checkpoint_every and done != num_steps:
        save(done)  # the step every rank stopped after
    result = DistributedResult(
        losses=losses,
        num_steps=len(losses),
        start_step=start,
        seconds=seconds,
        step_seconds=step_seconds,
        param_names=names,
        rank=ctx.rank,
        world_size=ctx.world_size,
        backend=ctx.backend,
        device=ctx.device,
        batch_size=batch_size,
        batch_size_per_rank=shards.per_rank,
        epochs=len(losses) / shards.batches_per_epoch,
        stopped_by=(signals.name or "a signal on another rank") if stopped else "",
        checkpoint_error=written["error"],
    )
    interrupt.redeliver(signals.received)  # SIGTERM ends the process, after the checkpoint
    return result


def _loop(
    model, guide, loss, ctx, args_of, params, optimizer, sync, names, losses, step_seconds,
    start, num_steps, log_every, checkpoint, checkpoint_every, save, signals,
    num_params_in_store,
):
    """The steps; returns ``(steps done, whether a signal stopped them)``."""
    done = start
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        batch, kwargs = args_of(step)
        for p in params:
            p.grad = None
        try:
            value = loss.loss_and_grads(model, guide, *batch, **kwargs)
        except ValueError as error:  # Pyro's validation refusing NaN data: say so
            if _nonfinite_rows(batch):
                raise _nonfinite(step, math.nan, batch) from error
            raise
        if len(pyro.get_param_store()) != num_params_in_store:
            raise RuntimeError(
                f"step {step}: the model or guide created new parameters after the first step "
                f"({sorted(set(pyro.get_param_store().keys()) - set(names))[:5]}); "
                "fit_distributed needs a static set of parameters"
            )
        mean_loss, stop = sync.average(float(value), signals.received is not None)
        if not math.isfinite(mean_loss):
            raise _nonfinite(step, mean_loss, batch)
        optimizer.step()
        losses.append(mean_loss)
        step_seconds.append(time.perf_counter() - t0)
        done = step + 1
        if log_every and done % log_every == 0 and ctx.is_main:
            print(f"step {done}/{num_steps}  loss {mean_loss:.6g}", flush=True)
        if checkpoint is not None and (done % checkpoint_every == 0 or done == num_steps):
            save(done)
        if stop:  # a signal on some rank: every rank stops after this same step
            return done, True
    return done, False


def _nonfinite(step, mean_loss, batch):
    """The error of a non-finite loss: NaN/inf in this step's data, or in the computation."""
    from pyro_elbo.fit.loop import NonFiniteError

    bad = _nonfinite_rows(batch)
    if bad:
        what = (
            f"this step's batch holds NaN/inf in data tensor(s) {bad} (on this rank); the "
            "learning rate is not the cause. Remove or impute those rows, or mask them"
        )
    else:
        what = (
            "this rank's batch is finite (if another rank reports NaN/inf in its data, that is "
            "the cause); else lower the learning rate, or check the model for operations that "
            "fail for some latent values"
        )
    return NonFiniteError(
        f"step {step + 1}: the loss averaged over ranks is {mean_loss}: {what}.", step=step + 1
    )


def _nonfinite_rows(batch) -> list[int]:
    """The data tensors of a batch that hold NaN/inf."""
    return [
        i
        for i, t in enumerate(batch)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())
    ]


def _identity(loss, optimizer, data, seed, shuffle, batch_size, scheduler) -> dict:
    """The run's identity (:mod:`pyro_elbo.fit.identity`), stored in its checkpoints."""
    described = identity.describe_optimizer(optimizer.torch_optim or optimizer.pyro_optim)
    if described["lr"] is not None and any(v == 0 for v in described["lr"]):
        raise ValueError(
            f"the optimizer's learning rate is 0 ({described['type']}): no step would move the "
            "parameters. Pass a positive lr."
        )
    kind, rows, _ = _inspect_data(data)
    return identity.describe_run(
        structure=None,
        objective=loss,
        optimizer=described,
        args=list(rows) if kind == "tensors" else (),
        kwargs={
            "batch_size": batch_size,
            "shuffle": bool(shuffle),
            "scheduler": None if scheduler is None else identity._name(scheduler),
        },
        data=None if kind == "tensors" else rows,
        seed=seed,
    )


def _load_optimizer(optimizer, state, run, path):
    saved = (state.get("run") or {}).get("optimizer") or {}
    lrs = run["optimizer"]["lr"]
    optim_state = state["optimizer"]
    if lrs is not None and saved.get("lr") is not None and saved["lr"] != lrs:
        if "torch" in optim_state:
            optim_state = {**optim_state, "torch": identity.with_lr(optim_state["torch"], lrs, "torch")}
        else:
            optim_state = {"pyro": identity.with_lr(optim_state["pyro"], lrs, "pyro")}
    try:
        optimizer.load_state_dict(optim_state)
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise ckpt.CheckpointMismatchError(
            f"the optimizer state in the checkpoint {path!r} does not fit this run's optimizer "
            f"({type(error).__name__}: {error}). Pass the optimizer of the run that wrote it, or "
            "resume=False to start over."
        ) from None

