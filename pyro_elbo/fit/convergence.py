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

The rules live in their own modules: :mod:`.rule` (the interface), :mod:`.auto_convergence`,
:mod:`.relative_tolerance`, and the diagnostics on iterates in :mod:`.iterate_stats`; this
module names them for ``fit``.
"""

from __future__ import annotations

from pyro_elbo.fit.auto_convergence import AutoConvergence
from pyro_elbo.fit.iterate_stats import (
    effective_sample_size,
    fisher_diagonal,
    fisher_seed,
    split_rhat,
)
from pyro_elbo.fit.relative_tolerance import RelativeTolerance
from pyro_elbo.fit.rule import ConvergenceRule

__all__ = [
    "AutoConvergence",
    "ConvergenceRule",
    "RelativeTolerance",
    "effective_sample_size",
    "fisher_diagonal",
    "fisher_seed",
    "make_rule",
    "split_rhat",
]


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

