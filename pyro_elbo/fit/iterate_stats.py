"""MCMC diagnostics on the iterates of stochastic optimization, for ``fit``'s convergence rules
(:mod:`.convergence`): split-R-hat (Gelman et al. 2013, BDA3 §11.4), the effective sample size by
Geyer's initial monotone sequence (as in Stan), and the diagonal of the guide's Fisher information
(the scale in which :class:`~pyro_elbo.fit.convergence.AutoConvergence` measures the Monte Carlo
error of the averaged iterates)."""

from __future__ import annotations

import math
import zlib

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.traces import quietly

__all__ = ["effective_sample_size", "fisher_diagonal", "fisher_seed", "split_rhat"]


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
    with quietly(grad=True):  # blocked, forked random stream (seeded below), autograd on
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



def fisher_seed(step: int) -> int:
    """A fixed seed per step for the Fisher draws (so checks do not depend on the main RNG)."""
    return zlib.crc32(f"pyro_elbo.fit.fisher:{step}".encode())

