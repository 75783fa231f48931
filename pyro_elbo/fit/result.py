"""What :func:`~pyro_elbo.fit.fit` returns (:class:`FitResult`, with its loss plot) and what
its callbacks see after each step (:class:`FitState`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyro

__all__ = ["FitResult", "FitState"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    * ``losses``: the loss of every step (numpy float64; NaN/inf for skipped steps);
    * ``num_steps``: steps taken in total (including those before a resume);
    * ``converged`` and ``reason``: whether the convergence rule was met, and why (or why not);
    * ``seconds``: wall time of this call;
    * ``skipped_steps``: steps skipped by the NaN guard (``skip_nonfinite``);
    * ``diagnostics``: the convergence rule's figures (R-hat, MCSE, ESS, ``stationary_from``);
    * ``resumed_from``: the step a checkpoint was resumed from, or ``None``;
    * ``checkpoint_error``: the :class:`~pyro_elbo.fit.checkpoint.CheckpointWriteError` of a
      checkpoint that could not be written (the previous one is kept), else ``None``;
    * ``guide``, ``loss``, ``optim``: the guide fitted, the objective and the optimizer used
      (the recommended ones when ``fit`` chose them);
    * ``init``: what the stage before step 1 did (a :class:`~pyro_elbo.fit.initial.LaplaceStage`:
      ``.ran``, ``.result``, ``.message``, ``.seconds``);
    * ``compiled``: whether the steps ran on the compiled fast path (true or false), and
      ``compiled.reason``: which path and why (:class:`~pyro_elbo.fit.compiling.CompileStatus`);
    * ``num_evaluations``: log-joint gradient evaluations made, particles included (for
      ``method="svi"``: the Laplace stage's plus steps x particles);
    * ``defaults``: the objective ``fit`` chose when ``loss`` was not given, and why ("" else);
    * ``stages``, ``khat``, ``resample``: for ``fit(model, None, ...)``, what each stage of the
      escalation did (:class:`~pyro_elbo.fit.escalate.Stage`), the returned guide's PSIS k-hat,
      and ``"psis"`` when its draws are importance-resampled (:mod:`.escalate`);
    * ``model``: the model fitted (``reparam="noncentered"``: the rewritten one);
    * ``distributed``: in a data-parallel run, this process's
      :class:`~pyro_elbo.fit.data_parallel.DistributedContext` (``rank``, ``world_size``,
      ``backend``, ``device``); else ``None``.
    """

    losses: np.ndarray
    num_steps: int
    converged: bool
    reason: str
    seconds: float
    skipped_steps: tuple = ()
    diagnostics: dict = field(default_factory=dict)
    resumed_from: int | None = None
    checkpoint_error: Exception | None = None
    guide: object = None
    loss: object = None
    optim: object = None
    init: object = None
    compiled: object = False
    num_evaluations: int = 0
    defaults: str = ""
    stages: list = field(default_factory=list)
    khat: float = math.nan
    resample: str | None = None
    model: object = None
    distributed: object = None

    def to_inference_data(self, *args, num_samples: int = 1000, **kwargs):
        """ArviZ data from the fitted guide (:func:`pyro_elbo.to_inference_data`), PSIS-
        resampled when ``self.resample == "psis"``; ``args`` are the model's arguments."""
        from pyro_elbo.fit.escalate import to_inference_data

        return to_inference_data(self, *args, num_samples=num_samples, **kwargs)

    def __repr__(self):
        last = f", final loss {self.losses[-1]:.6g}" if len(self.losses) else ""
        return (
            f"FitResult(num_steps={self.num_steps}, converged={self.converged}, "
            f"seconds={self.seconds:.3g}{last}, reason={self.reason!r})"
        )

    def plot(self, ax=None):
        """The losses relative to the final value, with a running mean, the averaged window,
        skipped steps and the Laplace stage marked (:mod:`pyro_elbo.fit.plot`).

        Returns a ``matplotlib.figure.Figure`` (drawn on ``ax`` when given).
        """
        from pyro_elbo.fit.plot import plot_fit

        return plot_fit(self, ax)


class FitState:
    """What callbacks receive after each step: ``step``, ``loss``, ``losses`` (the live list),
    ``status`` (the convergence status), ``objective``, ``optimizer`` and ``params`` (a dict of
    the constrained parameter values).  A callback that returns ``True`` stops the run."""

    __slots__ = ("step", "loss", "losses", "objective", "optimizer", "_rule", "_names", "_store")

    def __init__(self, losses, objective, optimizer, rule, names):
        self.step, self.loss, self.losses = 0, float("nan"), losses
        self.objective, self.optimizer, self._rule, self._names = objective, optimizer, rule, names

    @property
    def status(self) -> str:
        return self._rule.status if self._rule is not None else ""

    @property
    def params(self) -> dict:
        store = getattr(self, "_store", None) or pyro.get_param_store()
        return {name: store[name] for name in self._names}

