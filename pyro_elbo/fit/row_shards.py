"""The batch source of :func:`pyro_elbo.distributed.fit_distributed`: the rows of in-memory data
(a tensor, a tuple of tensors sharing their first dimension, or a map-style ``Dataset``), this
rank's share of each global batch, with :class:`~torch.utils.data.DistributedSampler`'s
permutation of each epoch (one for all ranks, from the seed and the epoch)."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from pyro_elbo.fit.batches import Batch

__all__ = ["RowShards"]


class RowShards:
    """This rank's minibatches of in-memory rows, one epoch per iteration (``set_epoch`` picks
    the epoch's permutation, shared by all ranks: :class:`DistributedSampler`).  Each batch is
    the rank's rows of every data tensor, and for the old keyword contract
    ``full_size=N, subsample=idx`` (``idx``: the rows' numbers in the full data)."""

    sharded = True  # fit takes it as this rank's shard, as is

    def __init__(self, data, ctx, batch_size, seed, shuffle, keywords):
        self.kind, self.data, self.size = _inspect_data(data)
        self.device, self.keywords = ctx.device, keywords
        if self.size == 0:
            raise ValueError("data have no rows: pass data with at least batch_size rows")
        self.sampler = DistributedSampler(
            range(self.size), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
            seed=seed,
        )
        self.batch_size, self.shuffle = batch_size, bool(shuffle)
        self.per_rank = batch_size // ctx.world_size
        self.batches_per_epoch = len(self.sampler) // self.per_rank
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"batch_size={batch_size} is too large: with {ctx.world_size} ranks each rank "
                f"holds {len(self.sampler)} of the {self.size} rows, fewer than its "
                f"{self.per_rank} rows per batch. Use batch_size <= "
                f"{len(self.sampler) * ctx.world_size}."
            )

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.batches_per_epoch

    def __iter__(self):
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        for pos in range(self.batches_per_epoch):
            idx = indices[pos * self.per_rank : (pos + 1) * self.per_rank]
            rows = self._rows(idx)
            kwargs = {"full_size": self.size, "subsample": idx.to(self.device)}
            yield Batch(rows, kwargs if self.keywords else {})

    def _rows(self, idx):
        if self.kind == "tensors":
            return tuple(t.index_select(0, idx.to(t.device)).to(self.device, non_blocking=True)
                         for t in self.data)
        items = torch.utils.data.default_collate([self.data[i] for i in idx.tolist()])
        if isinstance(items, (tuple, list)):
            return tuple(_to(x, self.device) for x in items)
        return (_to(items, self.device),)

    def describe(self):
        """What the checkpoint's run identity records of the data (:mod:`pyro_elbo.fit.identity`)."""
        from pyro_elbo.fit.identity import describe_value

        rows = list(self.data) if self.kind == "tensors" else {"len": self.size}
        return {"rows": describe_value(rows), "batch_size": self.batch_size,
                "shuffle": self.shuffle}


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
