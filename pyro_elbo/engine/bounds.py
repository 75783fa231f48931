"""Evidence bounds from log importance weights ``log w_s = log p(x, z_s) - log q(z_s)``.

Pure functions shared by the objectives and the diagnostics (MATH.md §4):

* :func:`elbo_estimate`:  ``mean_s log w_s`` (<= log p(x));
* :func:`iw_estimate`:    ``log (1/S) sum_s w_s``, the importance-sampled log evidence, a
  stochastic lower bound that tightens with S (Burda et al. 2016);
* :func:`cubo_estimate`:  ``(1/n) log (1/S) sum_s w_s^n``, the chi upper bound CUBO_n
  (Dieng et al. 2017), >= log p(x) in expectation of its exponential.

Each returns ``(value, standard_error)``; the SE of the two log-mean-exp estimates is by the delta
method, ``sd(v) / (sqrt(S) * mean(v))`` with ``v = w`` or ``w^n``, computed in log space.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cubo_estimate", "elbo_estimate", "iw_estimate", "log_mean_exp"]


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/K) sum_k exp(x_k)`` along ``dim``, computed stably."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def _log_mean_exp_with_se(log_v: torch.Tensor):
    log_v = log_v.detach().reshape(-1)
    num = log_v.shape[0]
    value = log_mean_exp(log_v)
    if num < 2:
        return value, torch.tensor(float("nan"))
    ratio = torch.exp(log_v - value)  # v_s / mean(v), mean 1
    se = ratio.std(unbiased=True) / math.sqrt(num)
    return value, se


def elbo_estimate(log_weights: torch.Tensor):
    """``(mean log w, its SE)``."""
    log_weights = log_weights.detach().reshape(-1)
    num = log_weights.shape[0]
    se = log_weights.std() / math.sqrt(num) if num > 1 else torch.tensor(float("nan"))
    return log_weights.mean(), se


def iw_estimate(log_weights: torch.Tensor):
    """``(log mean w, delta-method SE)``: the importance-sampled log evidence."""
    return _log_mean_exp_with_se(log_weights)


def cubo_estimate(log_weights: torch.Tensor, n: float = 2.0):
    """``((1/n) log mean w^n, delta-method SE)``: the CUBO_n upper bound estimate."""
    value, se = _log_mean_exp_with_se(n * log_weights.detach())
    return value / n, se / n
