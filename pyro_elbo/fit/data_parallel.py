r"""Data-parallel training as a strategy of :func:`~pyro_elbo.fit.fit` (``distributed=``).

Every process (rank r of R, one per core, GPU or machine, launched by ``torchrun`` or
:func:`pyro_elbo.distributed.launch`) holds the whole model and guide, calls ``fit`` with the
same arguments, and sees its own part of the data.  The objective is the full-data ELBO
(Hoffman et al. 2013, "Stochastic variational inference", JMLR 14)::

    L(phi) = E_q[log p(z) - log q(z)] + sum_{i=1..N} E_q[log p(x_i | z)]

At each step rank r draws its own minibatch B_r and its own z_r ~ q and estimates

    L_r = log p(z_r) - log q(z_r) + N / |B_r| * sum_{i in B_r} log p(x_i | z_r)

(the ``N / |B_r|`` factor is what the model's ``pyro.plate("data", N, subsample_size=n)`` or
``subsample=idx`` applies).  Each L_r is unbiased for L, so is their mean, and the gradient every
rank applies is the mean over ranks of grad L_r: the estimator of one process with R times the
particles and batch.  As in PyTorch's DDP (Li et al. 2020, VLDB) it is one all-reduce of the
gradients per step, in one buffer per dtype:

1. rank r seeds Pyro's RNGs with ``seed + r`` (its own particles and plate subsamples; with
   ``seed=None`` rank 0 draws the seed and sends it), and the ranks' parameters start from rank
   0's values (broadcast once, after the checks before step 1);
2. a ``data=`` source is sharded (:class:`~pyro_elbo.fit.batches.ShardedBatches`): rank r takes
   batches r, r + R, ... of each epoch, every rank iterating the source from the same seeded
   random state (so a shuffling ``DataLoader`` draws one permutation for all); a ``DataLoader``
   whose sampler is a ``DistributedSampler`` is already a shard and gets ``set_epoch`` each epoch;
3. each step: ``loss.loss_and_grads`` on the rank's batch; one all-reduce (sum, then / R) of the
   gradients, packed with the loss and a few flags (non-finite on rank k, a signal, an error);
   then fit's NaN/inf guard on the averaged values (so every rank raises :class:`NonFiniteError`
   or skips together, before any optimizer step) and the same optimizer step on every rank:
   parameters stay identical without being sent again;
4. the convergence rule sees the averaged loss and the same parameters on every rank (its Fisher
   draws are averaged too), so every rank stops after the same step; a callback that stops one
   rank stops all; SIGINT/SIGTERM on any rank stops every rank after the same step;
5. rank 0 checks and locks the checkpoint path, and writes the checkpoints, with every rank's
   random and data state; a resume is read by rank 0 and sent to the others.  Errors in these
   steps, or before step 1, are raised on every rank (no rank waits for a collective forever).

Backends: ``gloo`` (CPU tensors) and ``nccl`` (CUDA; each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyro
import torch
import torch.distributed as dist

__all__ = ["DataParallel", "DistributedContext", "data_parallel_stage", "rank_state", "resolve"]


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


def current_context(device=None) -> DistributedContext | None:
    """The context of the initialized process group, or ``None`` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend, local_rank = dist.get_backend(), _local_rank()
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), local_rank,
        _resolve_device(device, backend, local_rank), backend,
    )


def resolve(distributed) -> DataParallel | None:
    """``fit``'s ``distributed=``: ``"auto"`` (the strategy runs when ``torch.distributed`` is
    initialized with more than one process), ``True`` (join the group ``torchrun`` set up, as
    :func:`pyro_elbo.distributed.init_distributed` does; one process runs plain ``fit``),
    ``False`` (never: each process fits on its own), or a :class:`DistributedContext`."""
    if distributed is False or distributed is None:
        return None
    if isinstance(distributed, str) and distributed == "auto":
        ctx = current_context()
    elif distributed is True:
        from pyro_elbo.distributed import init_distributed

        ctx = init_distributed()
    elif isinstance(distributed, DistributedContext):
        ctx = distributed
    else:
        raise ValueError(
            f"fit: distributed must be 'auto', True, False or a DistributedContext, got "
            f"{distributed!r}"
        )
    if ctx is None or ctx.world_size == 1:
        return None
    return DataParallel(ctx)


def data_parallel_stage(init):
    """The stage before step 1 of a data-parallel run: none (each rank would find the mode of
    its own data), said in ``result.init``; ``init="laplace"`` is refused."""
    from pyro_elbo.fit.initial import _refuse_or_skip

    if init is None:
        return _refuse_or_skip(None, "init=None: started from the guide as it is")
    return _refuse_or_skip(init, "the Laplace stage does not run data-parallel (each rank would "
                                 "find the mode of its own data)")


def rank_state(state: dict, rank: int, world_size: int, path) -> dict:
    """The checkpoint ``state`` with its random and data states those of ``rank``; a checkpoint
    written by another number of processes is a ``CheckpointMismatchError``."""
    from pyro_elbo.fit.checkpoint import CheckpointMismatchError

    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise CheckpointMismatchError(
            f"the checkpoint {path!r} was written by a run on {saved} process(es) and this run "
            f"has {world_size}: each process's random stream and data position are in it. "
            f"Resume with {saved} process(es), or pass resume=False to start over."
        )
    if saved == 1:
        return state
    return {**state, "rng": state["rng"][rank],
            "data": None if state.get("data") is None else state["data"][rank]}


class DataParallel:
    """The collectives ``fit`` makes in a data-parallel run (see the module doc)."""

    def __init__(self, ctx: DistributedContext):
        self.ctx, self.rank, self.world_size = ctx, ctx.rank, ctx.world_size
        self.writes = ctx.rank == 0  # rank 0 writes checkpoints
        self.nonfinite_ranks: list[int] = []
        self.base_seed = None

    # ---------------------------------------------------------------- before step 1
    def seed(self, seed):
        """Seed rank r with ``seed + r``; ``seed=None``: rank 0 draws one and sends it."""
        if seed is None:
            seed = self.broadcast(int.from_bytes(os.urandom(4), "little") if self.writes else None)
        self.base_seed = int(seed)
        pyro.set_rng_seed(self.base_seed + self.rank)

    def batches(self, data):
        from pyro_elbo.fit.batches import ShardedBatches

        return ShardedBatches(data, self.rank, self.world_size, self.base_seed)

    def together(self, fn, when, *args):
        """``fn(*args)`` on every rank; an error on any rank is raised on all."""
        try:
            value = fn(*args)
        except BaseException as error:
            self.agree_ok(error, when)
            raise
        self.agree_ok(None, when)
        return value

    def agree_ok(self, error, when):
        """Fail on every rank if any rank failed: the others raise a ``RuntimeError`` naming
        the first failed rank and its error."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.ctx.device)
        dist.all_reduce(flag)
        if float(flag) > 0:
            self._raise_remote(error, when)

    def _raise_remote(self, error, when):
        text = None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
        texts = self.gather(text)
        if error is None:
            rank = next(r for r, t in enumerate(texts) if t is not None)
            raise RuntimeError(
                f"fit: rank {rank} of {self.world_size} failed {when} ({texts[rank]}); every rank "
                "stops (see that rank's traceback)."
            )

    def start(self, run):
        """After the checks before step 1: every rank has the same parameters (names, shapes,
        dtypes), which take rank 0's values."""
        described = [(n, tuple(leaf.shape), str(leaf.dtype)) for n, leaf in zip(run.names, run.leaves)]
        for rank, other in enumerate(self.gather(described)):
            if other != described:
                diff = sorted(set(map(str, other)) ^ set(map(str, described)))[:4]
                raise RuntimeError(
                    f"fit: rank {rank} has other parameters than rank {self.rank} ({diff}); "
                    "every rank must build the same model and guide."
                )
        self.leaves = run.leaves
        groups = {}
        for i, leaf in enumerate(run.leaves):
            groups.setdefault((leaf.dtype, leaf.device), []).append(i)
        self.groups = list(groups.items())
        keys = [key for key, _ in self.groups]
        float64 = [k for k in keys if k[0] == torch.float64]
        self.loss_key = float64[0] if float64 else keys[0]  # the loss and flags travel here
        with torch.no_grad():
            for _, members in self.groups:
                flat = torch.cat([self.leaves[i].detach().reshape(-1) for i in members])
                dist.broadcast(flat, src=0)
                self._unpack(flat, members, lambda i, v: self.leaves[i].copy_(v))

    # ---------------------------------------------------------------- each step
    def reduce(self, value: float, nonfinite: bool, signalled: bool, failed=None):
        """Average the gradients in place and the loss across ranks; return the mean loss and
        whether any rank was signalled.  ``nonfinite``: this rank's step was refused or its loss
        is not finite (the ranks that were are kept in ``nonfinite_ranks``).  ``failed``: this
        rank raised ``failed`` (the others then raise too)."""
        R = self.world_size
        flags = [0.0] * (R + 2)
        flags[self.rank] = float(nonfinite or value != value or abs(value) == float("inf"))
        flags[R], flags[R + 1] = float(signalled), float(failed is not None)
        mean, extra = value, flags
        for key, members in self.groups:
            parts = [
                torch.zeros_like(self.leaves[i]).reshape(-1) if self.leaves[i].grad is None
                else self.leaves[i].grad.reshape(-1)
                for i in members
            ]
            carries = key == self.loss_key
            if carries:
                parts.append(torch.tensor([value, *flags], dtype=key[0], device=key[1]))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            flat /= R
            if carries:
                tail = flat[-(R + 3):].tolist()
                mean, extra = tail[0], [v * R for v in tail[1:]]
            self._unpack(flat, members, self._set_grad)
        self.nonfinite_ranks = [r for r in range(R) if extra[r] > 0.5]
        if extra[R + 1] > 0.5:
            self._raise_remote(failed, "in a step")
        return mean, extra[R] > 0.5

    def fail(self, step, error):
        """This rank raises ``error`` in step ``step``: tell the others (then raise it)."""
        self.reduce(float("nan"), True, False, failed=error)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        box = torch.tensor([float(flag)], device=self.ctx.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item() > 0)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (the convergence rule's Fisher diagonal)."""
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.world_size

    def explain(self, error):
        """Add to a :class:`NonFiniteError` which ranks' own steps were non-finite."""
        error.ranks = list(self.nonfinite_ranks)
        where = f"ranks {self.nonfinite_ranks}" if self.nonfinite_ranks else "no rank's own loss"
        error.args = (
            f"{error.args[0]}\nData-parallel run on {self.world_size} ranks: the gradients are "
            f"averaged, so every rank stops here; non-finite loss on {where} (this is rank "
            f"{self.rank}; the site named above is from this rank's re-run).",
        )
        return error

    # ---------------------------------------------------------------- checkpoints
    def claim(self, path):
        """Rank 0 checks and locks the checkpoint path; its error is raised on every rank."""
        from pyro_elbo.fit import location

        return self.together(lambda: location.claim(path) if self.writes else None,
                             "checking the checkpoint path")

    def on_main(self, fn, when):
        """``fn()`` on rank 0, its value sent to every rank (its error raised on every rank)."""
        value = self.together(lambda: fn() if self.writes else None, when)
        return self.broadcast(value)

    def gather(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---------------------------------------------------------------- helpers
    def _set_grad(self, i, value):
        leaf = self.leaves[i]
        if leaf.grad is None:
            leaf.grad = value.clone()
        else:
            leaf.grad.copy_(value)

    def _unpack(self, flat, members, put):
        pos = 0
        for i in members:
            n = self.leaves[i].numel()
            put(i, flat[pos: pos + n].view_as(self.leaves[i]))
            pos += n
