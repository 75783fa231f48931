r"""When to stop stochastic optimization: the rules ``fit(..., convergence=...)`` uses.

Stochastic-gradient VI with a fixed learning rate does not converge to a point: after a transient,
the iterates ``phi_t`` fluctuate around the optimum.  Following Dhaka, Catalina, Welandawe,
Andersen, Huggins & Vehtari (2020, "Robust, accurate stochastic optimization for variational
inference", NeurIPS) and Welandawe, Andersen, Vehtari & Huggins (2022, "Robust, automated, and
accurate black-box variational inference", the ``viabel`` package), the fluctuating iterates are
treated as a Markov chain: stationarity is detected with the split-R-hat of MCMC, and the estimate
is the *average* of the stationary iterates, run until its Monte Carlo standard error is small.

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

:class:`RelativeTolerance` (``convergence="relative"``) is Stan's ADVI rule (Kucukelbir et al.
2017, JMLR 18): every ``eval_every`` (100) steps the ELBO estimate ``L_j`` (here: minus the mean
training loss over those steps) gives a relative change ``|L_j - L_{j-1}| / |L_j|``; stop when the
mean or the median of the last ``buffer`` changes (Stan: ``max(2, 0.1 max_steps / eval_every)``)
is below ``tol`` (default 0.01).  Unlike Stan it waits until the buffer is full, so one lucky pair
of windows cannot stop the run.  No averaging is done.
"""

from __future__ import annotations

import abc
import math
import warnings
import zlib

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

__all__ = [
    "AutoConvergence",
    "ConvergenceRule",
    "RelativeTolerance",
    "effective_sample_size",
    "fisher_diagonal",
    "make_rule",
    "split_rhat",
]


# ------------------------------------------------------------------ MCMC diagnostics on iterates


def split_rhat(x: torch.Tensor, jitter: float = 1e-8) -> torch.Tensor:
    """Split-R-hat of each column of ``x`` (iterations by coordinates), one chain cut in two.

    The first row is dropped when the number of rows is odd.  ``jitter`` is added to the
    within-half variance so that a constant coordinate gets R-hat < 1 instead of NaN (viabel).
    """
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    n = x.shape[0] // 2
    if n < 2:
        raise ValueError(f"split_rhat needs at least 4 iterations, got {x.shape[0]}")
    halves = x[x.shape[0] - 2 * n :].reshape(2, n, -1)
    means = halves.mean(1)
    within = halves.var(1, correction=1).mean(0) + jitter
    between_over_n = (means[0] - means[1]).pow(2) / 2  # var of the 2 half means, ddof=1
    return torch.sqrt(((n - 1) / n * within + between_over_n) / within)


def effective_sample_size(x: torch.Tensor) -> torch.Tensor:
    """ESS of each column of ``x`` (iterations by coordinates) as one chain.

    Autocorrelations by FFT; Geyer's initial positive sequence made monotone (Geyer 1992, as in
    Stan and ArviZ), ``tau = -1 + 2 sum_m (rho_2m + rho_2m+1)``, ``ESS = n / max(tau, 1/log10 n)``.
    A constant column gets ESS = n.
    """
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    x = x.double()
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"effective_sample_size needs at least 4 iterations, got {n}")
    centered = x - x.mean(0)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(centered, n=size, dim=0)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=0)[:n] / n
    acov0 = acov[0]
    constant = acov0 <= 0
    safe0 = torch.where(constant, torch.ones_like(acov0), acov0)
    # one chain: rho_t = 1 - (mean_var - acov_t) / var_plus, with var_plus = acov_0 (Stan)
    rho = acov / safe0 - 1.0 / (n - 1)
    rho[0] = 1.0
    num_pairs = n // 2
    pairs = rho[: 2 * num_pairs].reshape(num_pairs, 2, -1).sum(1)  # (num_pairs, P)
    negative = pairs < 0
    negative[0] = False
    # truncate at the first negative pair sum (initial positive sequence)
    first = torch.where(
        negative.any(0), negative.float().argmax(0), torch.full_like(acov0, num_pairs).long()
    )
    keep = torch.arange(num_pairs, device=x.device).unsqueeze(-1) < first
    monotone = torch.cummin(pairs, dim=0).values  # initial monotone sequence
    tau = -1.0 + 2.0 * (monotone * keep).sum(0)
    tau = torch.clamp(tau, min=1.0 / math.log10(n))
    ess = n / tau
    return torch.where(constant, torch.full_like(ess, float(n)), ess)


def fisher_diagonal(
    guide, args, kwargs, leaves, *, num_draws: int = 32, seed: int = 0
) -> torch.Tensor:
    """Monte Carlo diagonal of the guide's Fisher information, flattened over ``leaves``.

    ``F_ii = E_{z ~ q}[(d log q(z; phi) / d phi_i)^2]`` with ``z`` held fixed: each draw traces the
    guide without gradients, replays it on its own samples with the parameters live, and squares
    the gradient of log q.  The draws use a forked, seeded torch RNG, so the caller's random
    stream is untouched.  Leaves the guide does not read get 0.
    """
    totals = [torch.zeros_like(leaf, dtype=torch.float64) for leaf in leaves]
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), poutine.block():
        torch.manual_seed(seed)
        for _ in range(num_draws):
            with torch.no_grad():
                trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replayed = poutine.trace(poutine.replay(guide, trace=trace)).get_trace(*args, **kwargs)
            log_q = prune_subsample_sites(replayed).log_prob_sum()
            if not log_q.requires_grad:
                break
            grads = torch.autograd.grad(log_q, leaves, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total.add_(grad.double().pow(2))
    return torch.cat([t.reshape(-1) for t in totals]) / num_draws


# ------------------------------------------------------------------ rules


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


def make_rule(convergence) -> ConvergenceRule | None:
    """``"auto"``, ``"relative"``, ``None``/``False`` or a :class:`ConvergenceRule` instance."""
    if convergence is None or convergence is False:
        return None
    if isinstance(convergence, str):
        if convergence == "auto":
            return AutoConvergence()
        if convergence == "relative":
            return RelativeTolerance()
    elif isinstance(convergence, ConvergenceRule):
        return convergence
    raise ValueError(
        f"convergence must be 'auto', 'relative', None or a rule such as "
        f"AutoConvergence(...) / RelativeTolerance(...), got {convergence!r}"
    )


def fisher_seed(step: int) -> int:
    """A fixed seed per step for the Fisher draws (so checks do not depend on the main RNG)."""
    return zlib.crc32(f"pyro_elbo.fit.fisher:{step}".encode())


# ------------------------------------------------------------------ helpers


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
