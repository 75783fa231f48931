r""":class:`RelativeTolerance` (``convergence="relative"``) is Stan's ADVI rule (Kucukelbir et al.
2017, JMLR 18): every ``eval_every`` (100) steps the ELBO estimate ``L_j`` (here: minus the mean
training loss over those steps) gives a relative change ``|L_j - L_{j-1}| / |L_j|``; stop when the
mean or the median of the last ``buffer`` changes (Stan: ``max(2, 0.1 max_steps / eval_every)``)
is below ``tol`` (default 0.01).  Unlike Stan it waits until the buffer is full, so one lucky pair
of windows cannot stop the run.  No averaging is done.
"""

from __future__ import annotations

import math

from pyro_elbo.fit.rule import ConvergenceRule, _mean, _median, _positive_int

__all__ = ["RelativeTolerance"]


class RelativeTolerance(ConvergenceRule):
    """Stan's ADVI stopping rule on the relative change of the ELBO (see the module doc).

    :param float tol: relative tolerance (Stan's ``tol_rel_obj``, 0.01).
    :param int eval_every: steps per ELBO estimate (Stan's ``eval_elbo``, 100).
    :param buffer: number of relative changes averaged (default ``max(2, 0.1 max_steps /
        eval_every)``, as in Stan).
    """

    def __init__(self, tol: float = 0.01, eval_every: int = 100, buffer: int | None = None):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"RelativeTolerance: tol must be a number > 0, got {tol!r}")
        _positive_int("eval_every", eval_every)
        if buffer is not None:
            _positive_int("buffer", buffer)
        self.tol = float(tol)
        self.eval_every = int(eval_every)
        self.buffer = buffer
        self.converged = False

    def __repr__(self):
        return f"RelativeTolerance(tol={self.tol}, eval_every={self.eval_every})"

    def bind(self, context) -> None:
        self.size = int(self.buffer or max(2, int(0.1 * context.max_steps / self.eval_every)))
        self._total = 0.0
        self._seen = 0
        self._count = 0
        self._previous = None
        self._changes = []
        self.converged = False

    def update(self, step: int, loss: float) -> bool:
        self._count += 1
        if math.isfinite(loss):
            self._total += loss
            self._seen += 1
        if self._count % self.eval_every:
            return False
        elbo = -self._total / self._seen if self._seen else float("nan")
        self._total, self._seen = 0.0, 0
        if self._previous is not None:
            change = abs((elbo - self._previous) / elbo) if elbo != 0 else float("inf")
            self._changes = (self._changes + [change])[-self.size :]
        self._previous = elbo
        if len(self._changes) < self.size:
            return False
        if _mean(self._changes) < self.tol or _median(self._changes) < self.tol:
            self.converged = True
            return True
        return False

    @property
    def status(self) -> str:
        if self.converged:
            return "converged"
        if not self._changes:
            return "warming up"
        return f"rel. change {_median(self._changes):.2g}"

    def reason(self, stopped: bool) -> str:
        if len(self._changes) < self.size:
            needed = (self.size + 1) * self.eval_every
            return (
                f"never tested: RelativeTolerance compares the mean or median of {self.size} "
                f"relative ELBO changes (one every {self.eval_every} steps) with tol={self.tol}, "
                f"so its first test is at step {needed}, and the run stopped after "
                f"{self._count} steps ({len(self._changes)} change(s)). Raise max_steps to at "
                f"least {needed}."
            )
        mean, median = _mean(self._changes), _median(self._changes)
        if self.converged:
            return (
                f"converged: relative ELBO change mean {mean:.3g} / median {median:.3g} over the "
                f"last {len(self._changes)} evaluations (every {self.eval_every} steps) < "
                f"tol={self.tol}"
            )
        return (
            f"not converged: relative ELBO change mean {mean:.3g} / median {median:.3g} "
            f"(last {len(self._changes)} of {self.size} evaluations) not < tol={self.tol}. "
            "Raise max_steps."
        )

    def diagnostics(self) -> dict:
        return {"relative_changes": list(self._changes)}

    def state_dict(self) -> dict:
        return {
            "total": self._total,
            "seen": self._seen,
            "count": self._count,
            "previous": self._previous,
            "changes": list(self._changes),
        }

    def load_state_dict(self, state: dict) -> None:
        self._total = float(state["total"])
        self._seen = int(state["seen"])
        self._count = int(state["count"])
        self._previous = state["previous"]
        self._changes = [float(c) for c in state["changes"]]
