"""Ctrl-C and ``kill`` during ``fit``: finish the step, checkpoint a consistent state, stop.

A signal that lands in the middle of a step (between the optimizer update and the bookkeeping
of the loss, the step count or the convergence rule) leaves a state no resume can continue
exactly.  So while the steps run, :class:`DeferSignals` replaces the handlers of SIGINT and
(when there is a checkpoint to write) SIGTERM by one that only records the signal; the loop
checks the record between steps and stops there, and ``fit`` writes the checkpoint of that
step.  Resuming it is then bit for bit the uninterrupted run.

* A second SIGINT while the first is pending raises ``KeyboardInterrupt`` at once (the user
  insists); ``fit`` then keeps the last checkpoint written, since the state may be mid-step.
* After the checkpoint is written (or when an error ends the run), SIGTERM is sent again under
  the handler that was there before (by default: the process ends), so a job scheduler's
  ``kill`` still ends the job.
* Handlers can only be installed in the main thread; elsewhere nothing changes.  A signal the
  program ignores (``SIG_IGN``) stays ignored.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["DeferSignals", "redeliver"]


class DeferSignals:
    """Context manager: record SIGINT (and SIGTERM with ``sigterm=True``) instead of acting on
    them; ``received`` is the first signal number recorded, or ``None``."""

    def __init__(self, sigterm: bool = True):
        self.signals = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
        self.received = None
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handler)
        return self

    def __exit__(self, kind, error, tb):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if kind is not None:  # an error is on its way out: SIGTERM still ends the process
            redeliver(self.received)
        return False


def redeliver(signum) -> None:
    """Send SIGTERM again (under the handler restored by :class:`DeferSignals`); SIGINT is not
    re-sent: ``fit`` returns its result instead, as documented."""
    if signum == signal.SIGTERM:
        os.kill(os.getpid(), signal.SIGTERM)
