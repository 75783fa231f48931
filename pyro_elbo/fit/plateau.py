r"""``LossPlateau``: stop a fixed-step-size run when its loss has stopped falling, measured against
the loss's own noise.  The flow stage of the escalating default uses it (:mod:`.escalate`).

A flow trained with a fixed Adam step and sticking the landing (Agrawal, Sheldon & Domke 2020)
has thousands of parameters, most of which never become stationary in the sense of
:class:`~pyro_elbo.fit.convergence.AutoConvergence` (split-R-hat per coordinate), and iterate
averaging of network weights is not meaningful.  What can be measured is the objective.  Every
``check_every`` steps ``k``, with ``W = max(window, floor(k / 3))`` (the last two thirds of the
run, at least two windows) and ``L_t`` the per-step losses (each a ``K``-particle estimate of
minus the ELBO):

.. math::

    g = \bar L_{[k-2W, k-W)} - \bar L_{[k-W, k)}, \qquad
    \mathrm{se}(g) = \sqrt{\mathrm{se}_1^2 + \mathrm{se}_2^2}, \qquad
    \mathrm{se}_j = \mathrm{sd}_j / \sqrt{\mathrm{ESS}_j},

the gain of the last window over the one before, with each window's standard error from the
effective sample size of its losses about their least-squares line (Geyer's initial monotone
sequence, as for MCMC: successive losses of a fixed-step run are correlated; the drift of a
still-falling loss is not counted as noise).  Stop when

.. math::

    g < \max(\mathrm{tol},\ z\, \mathrm{se}(g)),

i.e. the last ``W`` steps lowered the loss by less than ``tol`` nats per ``window`` steps
(default 0.01 per 200: ``tol`` scales with ``W / window``, a bound on the slope), or by an amount
the loss's noise cannot tell from zero (``z = 2``).  The windows grow with the run, so a longer
run resolves a smaller gain (the gain of a constant slope grows as ``W``, its standard error
shrinks as ``1 / sqrt(W)``): a slow late improvement is not mistaken for a plateau because the
first windows were noisy.  This is a plateau of the objective at the resolution the run can
measure, not a proof of convergence: ``reason`` reports ``g`` and its standard error, so the
user can see how noisy the last windows were.  The last iterate is kept (no averaging).

A flat loss is not always the end: a flow can sit on a plateau and then find the curvature it
was missing (on a banana, a plateau over steps 500-1000 is followed by a tenfold drop).  With
``accept`` (a function returning ``(ok, note)``), a plateau stops the run only when ``ok``: the
escalation's flow stage passes its PSIS k-hat test (k-hat < 0.7, its own purpose), tried at most
every ``accept_every`` steps; otherwise the run goes on, and ``reason`` says why.
"""

from __future__ import annotations

import math

import torch

from pyro_elbo.fit.convergence import ConvergenceRule, effective_sample_size

__all__ = ["LossPlateau"]


class LossPlateau(ConvergenceRule):
    """Stop when the mean loss over the last ``W`` steps is no lower than over the ``W`` before,
    by more than ``max(tol W / window, z * se)``, ``W = max(window, step // 3)`` (see the
    module docstring).

    :param int window: the smallest window (default 200); the first test is at ``2 window``.
    :param float tol: the smallest gain, in nats per ``window`` steps, worth continuing for
        (0.01).
    :param float z: standard errors a gain must exceed to count as real (2).
    :param int check_every: steps between tests (100).
    :param accept: ``None``, or a function ``() -> (ok, note)`` a plateau must also pass.
    :param int accept_every: the fewest steps between two calls of ``accept`` (500).
    """

    def __init__(self, window: int = 200, tol: float = 0.01, z: float = 2.0,
                 check_every: int = 100, accept=None, accept_every: int = 500):
        for name, value in (("window", window), ("check_every", check_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                raise ValueError(f"LossPlateau: {name} must be an integer >= 4, got {value!r}")
        for name, value in (("tol", tol), ("z", z)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"LossPlateau: {name} must be a number >= 0, got {value!r}")
        self.window, self.tol, self.z, self.check_every = int(window), float(tol), float(z), \
            int(check_every)
        self.accept, self.accept_every = accept, int(accept_every)
        self.converged = False
        self._losses: list[float] = []
        self._last = None  # (step, gain, se, width) of the latest test
        self._accepted = None  # (step, ok, note) of the latest call of accept

    def __repr__(self):
        return (f"LossPlateau(window={self.window}, tol={self.tol}, z={self.z}, "
                f"check_every={self.check_every})")

    def update(self, step: int, loss: float) -> bool:
        self._losses.append(float(loss))
        if step < 2 * self.window or step % self.check_every:
            return False
        width = max(self.window, min(step, len(self._losses)) // 3)
        recent = torch.tensor(self._losses[-2 * width :], dtype=torch.float64)
        if not bool(torch.isfinite(recent).all()):
            return False  # a skipped (non-finite) step in the windows: test later
        before, last = recent[:width], recent[width:]
        gain = float(before.mean() - last.mean())
        se = math.sqrt(_squared_se(before) + _squared_se(last))
        tol = self.tol * width / self.window
        self._last = (step, gain, se, width)
        flat = gain < max(tol, self.z * se)
        if flat and self.accept is not None:
            if self._accepted is not None and step - self._accepted[0] < self.accept_every:
                return False
            ok, note = self.accept()
            self._accepted = (step, bool(ok), str(note))
            flat = bool(ok)
        self.converged = flat
        return self.converged

    @property
    def status(self) -> str:
        if self._last is None:
            return ""
        _, gain, se, _ = self._last
        return f"gain {gain:.3g}±{se:.2g}"

    def reason(self, stopped: bool) -> str:
        if self._last is None:
            return f"the loss was not tested (the first test is at step {2 * self.window})"
        step, gain, se, width = self._last
        tol = self.tol * width / self.window
        text = (f"the last {width} steps (to step {step}) lowered the mean loss by "
                f"{gain:.3g} ± {se:.2g} nats against the {width} before (standard error from "
                "the losses' ESS)")
        if stopped:
            why = ("not distinguishable from the loss's noise" if self.z * se > tol else
                   "below the tolerance")
            return (f"the loss stopped falling: {text}, {why} "
                    f"(stop when < max(tol {tol:.3g}, {self.z:g} se)){self._accept_note()}")
        if self._accepted is not None and not self._accepted[1]:
            return (f"the loss plateaued, but at step {self._accepted[0]} "
                    f"{self._accepted[2]}; latest test: {text}")
        return f"the loss was still falling: {text}"

    def _accept_note(self):
        if self._accepted is None:
            return ""
        return f", and {self._accepted[2]}"

    def diagnostics(self) -> dict:
        if self._last is None:
            return {}
        step, gain, se, width = self._last
        return {"tested_at": step, "gain": gain, "gain_se": se, "window": width}

    def state_dict(self) -> dict:
        return {"losses": list(self._losses), "last": self._last,
                "accepted": self._accepted, "converged": self.converged}

    def load_state_dict(self, state: dict) -> None:
        self._losses = [float(x) for x in state["losses"]]
        self._last = None if state["last"] is None else tuple(state["last"])
        self._accepted = None if state["accepted"] is None else tuple(state["accepted"])
        self.converged = bool(state["converged"])


def _squared_se(losses: torch.Tensor) -> float:
    """(sd / sqrt(ESS))^2 of a window's mean loss, sd and ESS from the losses' residuals about
    their least-squares line (the drift of a still-falling loss is not noise); 0 when they do
    not vary."""
    t = torch.arange(len(losses), dtype=losses.dtype)
    t = t - t.mean()
    centered = losses - losses.mean()
    residuals = centered - t * (t @ centered) / (t @ t)
    var = float(residuals.var())
    if var == 0.0:
        return 0.0
    ess = float(effective_sample_size(residuals[:, None])[0])
    return var / max(ess, 1.0)
