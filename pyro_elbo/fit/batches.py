"""``fit(..., data=...)``'s batch source: one batch per step from an iterable of batches, epoch
after epoch, with its position saved in checkpoints and replayed on resume."""

from __future__ import annotations

from pyro_elbo.fit import checkpoint as ckpt

__all__ = []


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
        ckpt.set_rng_state(self._epoch_rng)
        self._iterator = iter(self.data)
        for _ in range(int(state["index"])):
            next(self._iterator)
        self.index = int(state["index"])


def _with_batch(args, kwargs, batch):
    if isinstance(batch, dict):
        return args, {**kwargs, **batch}
    if isinstance(batch, (tuple, list)):
        return args + tuple(batch), kwargs
    return args + (batch,), kwargs

