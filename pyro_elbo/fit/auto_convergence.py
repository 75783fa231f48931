r"""Convergence by stationarity and iterate averaging: the fluctuating iterates of stochastic VI
are treated as a Markov chain (Dhaka, Catalina, Welandawe, Andersen, Huggins & Vehtari 2020,
"Robust, accurate stochastic optimization for variational inference", NeurIPS; Welandawe,
Andersen, Vehtari & Huggins 2022, "Robust, automated, and accurate black-box variational
inference", the ``viabel`` package).

:class:`AutoConvergence` (``convergence="auto"``, the default), on the unconstrained parameters
``phi in R^P`` (every coordinate of every parameter the optimizer updates):

1. **Stationarity.**  Every ``check_every`` (default 200) steps ``k``, with
   ``W_max = min(floor(0.95 k), stored iterates) >= window`` (default 200), for 5 window sizes
   ``W`` evenly spaced in ``[window, W_max]`` compute the split-R-hat of every coordinate over the
   last ``W`` iterates (Gelman et al. 2013, BDA3 §11.4: the window cut in two halves of ``n``,
   ``R-hat = sqrt(((n - 1)/n * W_in + B/n) / W_in)`` with ``W_in`` the mean within-half variance
   and ``B/n`` the variance of the half means), and take the largest over coordinates.  If the
   smallest of those 5 maxima is ``<= rhat`` (default 1.1), the iterates are stationary from step
   ``k - W`` on (``W`` the best window).
2. **Iterate averaging.**  From then on the estimate is the average ``phi_bar`` of the iterates
   since stationarity.  At checkpoints (first immediately, then each time the averaging window has
   grown by the factor ``grow``, default 1.25) each coordinate's effective sample size
   ``ESS_i`` (Geyer's initial monotone sequence, as in Stan) and Monte Carlo standard error
   ``MCSE_i = sd_i / sqrt(ESS_i)`` are computed.  The MCSE is measured in units of the
   coordinate's scale ``s_i = 1 / sqrt(F_ii)``, where ``F = E_q[(d log q(z; phi) / d phi)^2]`` is
   the Fisher information of the guide (estimated with ``fisher_draws`` draws, default 32): for a
   Normal guide's location ``s = sd`` and for its log-scale ``s = 1/sqrt(2)``, which is the
   ``MCSE(mu)/sigma`` and ``MCSE(log sigma)`` rule of Welandawe et al.  Parameters the guide does
   not read (model parameters) use ``s_i = 1``.  Stop when ``max_i MCSE_i / s_i < mcse``
   (default 0.1) and ``min_i ESS_i > ess_min`` (default ``window / 8``), where a coordinate whose
   standard deviation over the window is itself below ``mcse * s_i`` needs no ESS (its average is
   that accurate whatever the autocorrelation: a zero-variance estimator such as STL at the
   optimum leaves iterates that barely move, with a tiny but unreliable ESS).
3. **Result.**  The guide's parameters are set to ``phi_bar`` (also when ``max_steps`` is reached
   after stationarity but before the MCSE target; ``.converged`` is then False).

The iterates are kept in a ring buffer of at most ``max_window`` rows (default 5000), further
limited to ``memory`` bytes (default 64 MB); the average itself uses every iterate since
stationarity (a running sum), and the ESS of a longer averaging window is scaled up from the
stored tail.  If not even ``window`` iterates fit, the rule cannot run: ``fit`` says so.

See :mod:`pyro_elbo.fit.convergence` for the rules side by side.
"""

from __future__ import annotations

import math
import warnings

import torch

from pyro_elbo.fit.iterate_stats import effective_sample_size, split_rhat
from pyro_elbo.fit.rule import ConvergenceRule, _common_dtype, _positive_int

__all__ = ["AutoConvergence"]


class AutoConvergence(ConvergenceRule):
    """Split-R-hat stationarity, then iterate averaging to a target MCSE (see the module doc).

    :param int window: smallest window of iterates for R-hat (``W_min``, 200).
    :param float rhat: R-hat threshold (1.1).
    :param float mcse: MCSE target, in units of each parameter's scale (0.1).
    :param int check_every: steps between R-hat checks (``window``).
    :param ess_min: smallest ESS accepted for the average (``window / 8``).
    :param float grow: factor by which the averaging window grows between MCSE checks (1.25).
    :param int fisher_draws: guide draws for the Fisher-information scale (32).
    :param int max_window: most iterates kept (5000).
    :param int memory: most bytes for the stored iterates (64 MB).
    """

    def __init__(
        self,
        window: int = 200,
        rhat: float = 1.1,
        mcse: float = 0.1,
        *,
        check_every: int | None = None,
        ess_min: float | None = None,
        grow: float = 1.25,
        fisher_draws: int = 32,
        max_window: int = 5000,
        memory: int = 64 * 2**20,
    ):
        _positive_int("window", window, minimum=4)
        _positive_int("max_window", max_window, minimum=window)
        _positive_int("fisher_draws", fisher_draws)
        if check_every is not None:
            _positive_int("check_every", check_every)
        for name, value, low in (("rhat", rhat, 1.0), ("mcse", mcse, 0.0), ("grow", grow, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"AutoConvergence: {name} must be a number > {low}, got {value!r}")
        self.window = int(window)
        self.rhat = float(rhat)
        self.mcse = float(mcse)
        self.check_every = int(check_every or window)
        self.ess_min = float(window / 8 if ess_min is None else ess_min)
        self.grow = float(grow)
        self.fisher_draws = int(fisher_draws)
        self.max_window = int(max_window)
        self.memory = int(memory)
        self.converged = False

    def __repr__(self):
        return (
            f"AutoConvergence(window={self.window}, rhat={self.rhat}, mcse={self.mcse}, "
            f"check_every={self.check_every})"
        )

    # -------------------------------------------------------------- set-up
    def bind(self, context) -> None:
        self._context = context
        leaves = context.leaves
        # flat views share the leaves' storage: they follow the optimizer's in-place updates
        self._contiguous = all(leaf.is_contiguous() for leaf in leaves)
        self._leaves = [leaf.detach() for leaf in leaves]
        self._views = [leaf.view(-1) if leaf.is_contiguous() else leaf for leaf in self._leaves]
        self._sizes = [leaf.numel() for leaf in leaves]
        self._dim = sum(self._sizes)
        dtype = torch.promote_types(torch.float32, _common_dtype(leaves))
        item = torch.empty((), dtype=dtype).element_size()
        capacity = min(self.max_window, self.memory // max(1, self._dim * item))
        self.capacity = int(capacity)
        self.enabled = self.capacity >= self.window
        device = leaves[0].device if leaves else None
        self._buffer = (
            torch.empty(self.capacity, self._dim, dtype=dtype, device=device)
            if self.enabled
            else None
        )
        if not self.enabled:
            warnings.warn(f"fit: {self.reason(False)}", stacklevel=4)
        self._rows = list(self._buffer.unbind(0)) if self.enabled else []
        owned = torch.tensor([name in context.guide_names for name in context.names])
        self._is_guide = owned.repeat_interleave(torch.tensor(self._sizes, dtype=torch.long)).to(
            device
        )
        self._reset()

    def _reset(self):
        self.converged = False
        self._count = 0  # iterates seen
        self._head = 0  # next row of the ring buffer
        self._filled = 0
        self._avg_start = None  # iterate count at which averaging starts
        self._avg_from_step = None  # the global step of that count
        self._sum = None
        self._next_check = None  # averaging length at the next MCSE check
        self._last = {}  # diagnostics of the last check

    # -------------------------------------------------------------- per step
    def update(self, step: int, loss: float) -> bool:
        if not self.enabled:
            return False
        row = self._rows[self._head]
        if self._contiguous:
            torch.cat(self._views, out=row)
        else:
            torch.cat([leaf.reshape(-1) for leaf in self._leaves], out=row)
        self._head = (self._head + 1) % self.capacity
        self._filled = min(self._filled + 1, self.capacity)
        self._count += 1
        if self._sum is not None:
            self._sum.add_(row)
            if self._count - self._avg_start >= self._next_check:
                return self._check_mcse(step)
        elif self._count % self.check_every == 0:
            return self._check_stationarity(step)
        return False

    def _recent(self, n: int) -> torch.Tensor:
        """The last ``n`` stored iterates, oldest first."""
        start = self._head - n
        if start >= 0:
            return self._buffer[start : self._head]
        return torch.cat([self._buffer[start:], self._buffer[: self._head]])

    def _check_stationarity(self, step: int) -> bool:
        upper = min(int(0.95 * self._count), self._filled)
        if upper < self.window:
            return False
        windows = sorted({round(self.window + i * (upper - self.window) / 4) for i in range(5)})
        best = None
        for size in windows:
            rhat = split_rhat(self._recent(size))
            worst = int(torch.argmax(rhat))
            value = float(rhat[worst])
            if best is None or value < best[0]:
                best = (value, size, worst)
        value, size, worst = best
        self._last = {"rhat": value, "rhat_window": size, "rhat_worst": self._coordinate(worst)}
        if value > self.rhat:
            return False
        self._avg_start = self._count - size
        self._avg_from_step = step - size
        self._sum = self._recent(size).to(torch.float64).sum(0)
        self._next_check = size
        return self._check_mcse(step)

    def _check_mcse(self, step: int) -> bool:
        length = self._count - self._avg_start
        tail = self._recent(min(length, self._filled))
        ess = effective_sample_size(tail) * (length / tail.shape[0])
        sd = tail.double().std(0, correction=1)
        mcse = sd / ess.sqrt()
        fisher = self._context.fisher().to(mcse.device)
        scale_inv = torch.where(self._is_guide, fisher.sqrt(), torch.ones_like(fisher))
        scaled = mcse * scale_inv
        # A coordinate whose whole spread over the window is below the target needs no ESS
        # (the average is that accurate whatever the autocorrelation): this is what a
        # zero-variance estimator (STL at the optimum) produces.
        settled = sd * scale_inv < self.mcse
        needs_ess = ~settled
        worst = int(torch.argmax(scaled))
        min_ess = float(ess[needs_ess].min()) if bool(needs_ess.any()) else float("inf")
        self._last.update(
            mcse=float(scaled[worst]),
            mcse_worst=self._coordinate(worst),
            ess=min_ess,
            averaged=length,
        )
        if float(scaled[worst]) < self.mcse and min_ess > self.ess_min:
            self.converged = True
            return True
        self._next_check = max(length + 1, math.ceil(self.grow * length))
        return False

    def _coordinate(self, index: int) -> str:
        for name, size in zip(self._context.names, self._sizes):
            if index < size:
                return name if size == 1 else f"{name}[{index}]"
            index -= size
        return "?"

    # -------------------------------------------------------------- end
    @property
    def averaging(self) -> bool:
        return self._sum is not None

    def average(self) -> torch.Tensor | None:
        """The average of the iterates since stationarity (flat, float64), or ``None``."""
        if self._sum is None:
            return None
        return self._sum / (self._count - self._avg_start)

    def finish(self) -> None:
        """Set the parameters to the averaged iterates (when stationarity was reached)."""
        average = self.average()
        if average is None:
            return
        offset = 0
        with torch.no_grad():
            for leaf, size in zip(self._context.leaves, self._sizes):
                leaf.copy_(average[offset : offset + size].view_as(leaf).to(leaf.dtype))
                offset += size

    @property
    def status(self) -> str:
        if not self.enabled:
            return ""
        if self.converged:
            return "converged"
        if self._sum is not None:
            mcse = self._last.get("mcse")
            shown = f" MCSE {mcse:.2g}" if mcse is not None else ""
            return f"averaging{shown}"
        rhat = self._last.get("rhat")
        return f"R-hat {rhat:.3g}" if rhat is not None else "warming up"

    def reason(self, stopped: bool) -> str:
        if not self.enabled:
            return (
                f"automatic convergence was off: {self._dim} parameter coordinates leave room "
                f"for only {self.capacity} stored iterates (< window={self.window}); raise "
                "AutoConvergence(memory=...) or use convergence='relative'"
            )
        last = self._last
        if self.converged:
            return (
                f"converged: iterates stationary from step {self._avg_from_step} (split-R-hat "
                f"{last['rhat']:.3f} <= {self.rhat}), averaged over {last['averaged']} steps to "
                f"MCSE {last['mcse']:.3g} < {self.mcse} of scale (ESS >= {last['ess']:.0f})"
            )
        if self._sum is not None:
            if last["mcse"] >= self.mcse:
                short = (
                    f"the MCSE of the average, {last['mcse']:.3g} of scale at "
                    f"{last['mcse_worst']!r}, is not yet < {self.mcse}"
                )
            else:
                short = (
                    f"the MCSE of the average is {last['mcse']:.3g} of scale but its ESS, "
                    f"{last['ess']:.0f}, is not yet > {self.ess_min:g}"
                )
            return (
                f"stationary from step {self._avg_from_step} (split-R-hat {last['rhat']:.3f}), "
                f"but {short}; the parameters are the average of the {last['averaged']} "
                "stationary iterates. Raise max_steps."
            )
        if "rhat" in last:
            return (
                f"not stationary: split-R-hat {last['rhat']:.3g} > {self.rhat} at "
                f"{last['rhat_worst']!r} (best window {last['rhat_window']} steps); the "
                "parameters are still moving. Raise max_steps or the learning rate."
            )
        first = self.first_test()
        return (
            f"stationarity was never tested: split-R-hat is tested every {self.check_every} "
            f"steps once 95% of the steps hold a window of {self.window} iterates, so the first "
            f"test is at step {first}, and the run stopped after {self._count} steps. Raise "
            f"max_steps to more than {first} (or lower AutoConvergence(window=...))."
        )

    def first_test(self) -> int:
        """The first step at which stationarity is tested (``floor(0.95 k) >= window``)."""
        step = self.check_every
        while int(0.95 * step) < self.window:
            step += self.check_every
        return step

    def diagnostics(self) -> dict:
        out = dict(self._last)
        if self._avg_from_step is not None:
            out["stationary_from"] = self._avg_from_step
        return out

    def state_dict(self) -> dict:
        if not self.enabled:
            return {"count": self._count}
        return {
            "count": self._count,
            "iterates": self._recent(self._filled).clone(),
            "avg_start": self._avg_start,
            "avg_from_step": self._avg_from_step,
            "sum": self._sum,
            "next_check": self._next_check,
            "last": {k: v for k, v in self._last.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self._count = int(state["count"])
        if not self.enabled:
            return
        iterates = state["iterates"]
        if iterates.shape[1:] != self._buffer.shape[1:] or iterates.shape[0] > self.capacity:
            raise ValueError(
                f"the checkpoint's convergence state holds iterates of shape "
                f"{tuple(iterates.shape)}, which do not fit this run's buffer "
                f"{tuple(self._buffer.shape)}"
            )
        self._filled = iterates.shape[0]
        self._buffer[: self._filled] = iterates.to(self._buffer)
        self._head = self._filled % self.capacity
        self._avg_start = state["avg_start"]
        self._avg_from_step = state["avg_from_step"]
        self._sum = None if state["sum"] is None else state["sum"].to(self._buffer.device)
        self._next_check = state["next_check"]
        self._last = dict(state["last"])
