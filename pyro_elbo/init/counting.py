"""Counting log-joint evaluations, so that methods can be compared on work done.

:class:`CountingPotential` wraps a potential ``U(u) = -log p(x, T(u)) - log|det dT/du|`` of one
flat vector and counts:

* ``num_gradients``: calls made with ``u`` requiring grad under grad mode (a value whose gradient
  is taken: one forward and one backward pass), plus ``d`` per ``d``-dimensional Hessian
  (:meth:`add_gradients`; a Hessian is ``d`` Hessian-vector products, each about one gradient);
* ``num_densities``: every other call (a value only, e.g. an ELBO estimate's draws).

Plain callables pass through :func:`add_gradients` and :func:`paused` untouched.
"""

from __future__ import annotations

import contextlib

__all__ = ["CountingPotential", "add_gradients", "paused"]


class CountingPotential:
    """``potential`` with evaluation counters (see the module docstring)."""

    def __init__(self, potential):
        self.potential = potential
        self.num_gradients = 0
        self.num_densities = 0
        self._paused = 0

    def __call__(self, u):
        if not self._paused:
            if u.requires_grad and _grad_enabled():
                self.num_gradients += 1
            else:
                self.num_densities += 1
        return self.potential(u)

    def counts(self) -> tuple[int, int]:
        """``(num_gradients, num_densities)`` so far."""
        return self.num_gradients, self.num_densities


def _grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def add_gradients(potential, count: int) -> None:
    """Add ``count`` gradient evaluations to ``potential``'s counter, if it has one."""
    if isinstance(potential, CountingPotential):
        potential.num_gradients += int(count)


@contextlib.contextmanager
def paused(potential):
    """Calls inside are not counted (their cost is added by hand, e.g. a Hessian's)."""
    if not isinstance(potential, CountingPotential):
        yield
        return
    potential._paused += 1
    try:
        yield
    finally:
        potential._paused -= 1
