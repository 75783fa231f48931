"""The interface of ``fit``'s stopping rules (:class:`ConvergenceRule`) and the small helpers the
rules share."""

from __future__ import annotations

import abc

import torch

__all__ = ["ConvergenceRule"]


class ConvergenceRule(abc.ABC):
    """Interface of a stopping rule: ``fit`` calls :meth:`bind` once, then :meth:`update` after
    every step (``True`` stops the loop), then :meth:`finish` (which may change the parameters).
    ``state_dict``/``load_state_dict`` make checkpoints resume bit for bit."""

    converged: bool = False

    def bind(self, context) -> None:
        """``context`` has ``leaves``, ``names``, ``guide_names``, ``max_steps`` and ``fisher``
        (a function of the leaves returning the flat Fisher diagonal).  Default: nothing."""
        return None

    @abc.abstractmethod
    def update(self, step: int, loss: float) -> bool:
        """Take the step's loss; ``True`` stops the loop."""

    def finish(self) -> None:
        """Called once after the loop.  Default: nothing."""
        return None

    @property
    def status(self) -> str:
        """A short status for the progress bar."""
        return ""

    def reason(self, stopped: bool) -> str:
        """Why the run converged (``stopped``) or why it did not."""
        return ""

    def diagnostics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s value.  Default: a stateless rule has nothing to do."""
        return None



def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _common_dtype(leaves):
    dtype = torch.float32
    for leaf in leaves:
        if leaf.is_floating_point():
            dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


def _mean(values):
    return sum(values) / len(values)


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
