r"""When to stop stochastic optimization: the rules ``fit(..., convergence=...)`` uses.

Stochastic-gradient VI with a fixed learning rate does not converge to a point: after a transient,
the iterates ``phi_t`` fluctuate around the optimum.  Following Dhaka, Catalina, Welandawe,
Andersen, Huggins & Vehtari (2020, "Robust, accurate stochastic optimization for variational
inference", NeurIPS) and Welandawe, Andersen, Vehtari & Huggins (2022, "Robust, automated, and
accurate black-box variational inference", the ``viabel`` package), the fluctuating iterates are
treated as a Markov chain: stationarity is detected with the split-R-hat of MCMC, and the estimate
is the *average* of the stationary iterates, run until its Monte Carlo standard error is small.

* :class:`AutoConvergence` (``convergence="auto"``, the default; :mod:`.auto_convergence`):
  split-R-hat stationarity of the unconstrained parameters' iterates, then iterate averaging
  until the Monte Carlo SE of the average is below ``mcse`` (0.1) of each parameter's scale (the
  guide's Fisher information); the guide ends at the average.
* :class:`RelativeTolerance` (``convergence="relative"``; :mod:`.relative_tolerance`): Stan's
  ADVI rule on the relative change of the ELBO estimate (Kucukelbir et al. 2017, JMLR 18).

In a data-parallel run (:mod:`.data_parallel`) a rule sees the loss averaged over ranks and the
same parameters on every rank (its Fisher draws are averaged too), so every rank stops after the
same step.

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

