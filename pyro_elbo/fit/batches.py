"""``fit(..., data=...)``'s batch source: one batch per step from an iterable of batches, epoch
after epoch, with its position saved in checkpoints and replayed on resume; in a data-parallel
run (:mod:`.data_parallel`) each rank's shard of it (:class:`ShardedBatches`)."""

from __future__ import annotations

import itertools
import zlib

import torch
from torch.utils.data import DistributedSampler

from pyro_elbo.engine.traces import forked_rng
from pyro_elbo.fit import checkpoint as ckpt

__all__ = ["Batch", "ShardedBatches"]


class Batch:
    """A batch that passes both positional and keyword arguments: the model is called as
    ``model(*args, *batch.args, **kwargs, **batch.kwargs)``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args=(), kwargs=None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})


class _Batches:
    """Cycle over an iterable of batches, one per step, re-iterating it each epoch.

    The random state at the start of each epoch is kept, so a resume can rebuild the epoch's
    iterator (a shuffling DataLoader draws its permutation then) and skip the batches used.
    """

    def __init__(self, data):
        self.data = data
        self.epoch, self.index = 0, 0
        self._iterator = None
        self._epoch_rng = None
        self._pending = None  # a one-shot iterator's first batch, taken by the checks

    def first(self):
        """The first batch, for the checks before step 1 (not consumed from the epoch)."""
        try:
            if iter(self.data) is self.data:  # a one-shot iterator: keep the batch
                self._start()
                self._pending = next(self._iterator)
                return self._pending
            return next(iter(self.data))
        except StopIteration:
            raise ValueError("fit: data yielded no batches") from None

    def next(self):
        if self._pending is not None:
            batch, self._pending = self._pending, None
            self.index += 1
            return batch
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if iter(self.data) is self.data:
                raise  # a one-shot iterator is exhausted
            self.epoch += 1
            self._start()
            batch = next(self._iterator)
        self.index += 1
        return batch

    def _start(self):
        _set_epoch(self.data, self.epoch)
        self._epoch_rng = ckpt.get_rng_state()
        self.index = 0
        self._iterator = iter(self.data)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state):
        self.epoch, self._epoch_rng = int(state["epoch"]), state["epoch_rng"]
        self._iterator = None
        if self._epoch_rng is None:
            return
        _set_epoch(self.data, self.epoch)
        ckpt.set_rng_state(self._epoch_rng)
        self._iterator = iter(self.data)
        for _ in range(int(state["index"])):
            next(self._iterator)
        self.index = int(state["index"])


class ShardedBatches(_Batches):
    """This rank's shard of a ``data=`` source in a data-parallel run: batches ``rank``,
    ``rank + R``, ... of each epoch (``len(data) // R`` of them, the same number on every rank).
    Every rank starts each epoch's iterator from the same random state (seeded by the run's seed
    and the epoch), so a shuffling ``DataLoader`` draws one permutation for all ranks.  A
    ``DataLoader`` with a ``DistributedSampler`` (or a source with ``sharded = True``) is already
    this rank's shard: it is iterated whole, after ``set_epoch(epoch)``."""

    def __init__(self, data, rank, world_size, seed):
        if iter(data) is data:
            raise ValueError(
                "fit: a data-parallel run needs data= that can be iterated again each epoch (a "
                "DataLoader, a list of batches); a one-shot iterator cannot be sharded."
            )
        super().__init__(data)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        sampler = getattr(data, "sampler", None)
        self.split = not (getattr(data, "sharded", False) or isinstance(sampler, DistributedSampler))
        if self.split:
            try:
                count = len(data)
            except TypeError:
                raise ValueError(
                    "fit: a data-parallel run shards data= by batch and needs its len(); pass a "
                    "DataLoader or a list of batches, or a DataLoader with a DistributedSampler."
                ) from None
            self.per_epoch = count // world_size
            if self.per_epoch == 0:
                raise ValueError(
                    f"fit: data= has {count} batch(es), fewer than the {world_size} ranks that "
                    "share them; pass smaller batches."
                )

    def first(self):
        try:
            return next(self._epoch(0))
        except StopIteration:
            raise ValueError("fit: data yielded no batches") from None

    def _start(self):
        self.index = 0
        self._iterator = self._epoch(self.epoch)

    def _epoch(self, epoch):
        _set_epoch(self.data, epoch)
        with forked_rng():  # the same state on every rank; the run's own stream is untouched
            torch.manual_seed(zlib.crc32(f"pyro_elbo.fit.epoch:{self.seed}:{epoch}".encode()))
            iterator = iter(self.data)
            head = list(itertools.islice(iterator, 1))  # a DataLoader draws its seeds here
        batches = itertools.chain(head, iterator)
        if not self.split:
            return batches
        stop = self.per_epoch * self.world_size
        return itertools.islice(batches, self.rank, stop, self.world_size)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "epoch_rng": None}

    def load_state_dict(self, state):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iterator = self._epoch(self.epoch)
        for _ in range(self.index):
            next(self._iterator)


def _set_epoch(data, epoch):
    """``set_epoch(epoch)`` of the source or its sampler (a ``DistributedSampler``'s
    permutation is drawn from its seed and the epoch), where there is one."""
    set_epoch = getattr(data, "set_epoch", None) or getattr(
        getattr(data, "sampler", None), "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


def _with_batch(args, kwargs, batch):
    if isinstance(batch, Batch):
        return args + batch.args, {**kwargs, **batch.kwargs}
    if isinstance(batch, dict):
        return args, {**kwargs, **batch}
    if isinstance(batch, (tuple, list)):
        return args + tuple(batch), kwargs
    return args + (batch,), kwargs

