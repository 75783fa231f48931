r"""Batch-and-Match: closed-form Gaussian updates from a batch of draws and their scores.

Cai, Modi, Pillaud-Vivien, Margossian, Gower, Blei & Saul, "Batch and match: black-box
variational inference with a score-based divergence", ICML 2024 (arXiv 2402.14758), Algorithm 1.
BaM minimizes the covariance-weighted Fisher divergence
``E_q || grad log q - grad log p ||^2_Sigma`` by a proximal-point iteration whose every step is
solved in closed form.  At iteration ``t`` with ``q_t = N(mu, Sigma)``:

1. **batch**: draw ``z_1..z_B ~ q_t`` and evaluate the scores ``g_b = grad log p(z_b)``;
2. **statistics**: ``zbar, gbar`` the means, ``C = 1/B sum (z_b - zbar)(z_b - zbar)^T``,
   ``Gamma = 1/B sum (g_b - gbar)(g_b - gbar)^T``;
3. **match**, with the learning rate ``lambda_t``::

       U = lambda Gamma + lambda / (1 + lambda) gbar gbar^T
       V = Sigma + lambda C + lambda / (1 + lambda) (mu - zbar)(mu - zbar)^T
       Sigma' = 2 V (I + (I + 4 U V)^(1/2))^-1            (the PD root of Sigma' U Sigma' + Sigma' = V)
       mu'    = mu / (1 + lambda) + lambda / (1 + lambda) (Sigma' gbar + zbar)

   computed symmetrically: with ``V = L L^T`` and ``L^T U L = Q diag(w) Q^T``,
   ``Sigma' = L Q diag(2 / (1 + sqrt(1 + 4 w))) Q^T L^T``.

The learning rate is ``lambda_t = B D / t`` (t = 1, 2, ...), the schedule of AdvancedVI.jl's
``FisherMinBatchMatch``; ``lr=`` overrides it with a constant.

* **Gaussian targets**: ``p`` itself is a fixed point for every ``lambda`` and the error
  contracts by about ``1 / (1 + lambda_t)`` per iteration; with ``B > D`` and the default
  schedule the mean and covariance are exact to 1e-6 (relative, float64) after 4 iterations
  from ``N(0, I)`` on the 3-D example of ``tests/test_vi_methods.py`` (errors 3e-2, 7e-4,
  2e-5, 9e-7 for the mean; the test runs 5).
* **lambda = inf, B >= D + 1** (:func:`_score_match`): the proximal term drops out and the
  update matches the batch's scores, ``Sigma' Gamma Sigma' = C``, ``mu' = zbar + Sigma' gbar``:
  exact on a Gaussian target in *one* iteration from any start (``Gamma = P C P`` there).  It
  needs ``C`` of full rank, i.e. ``D + 1`` draws: the fewest gradient evaluations that can
  determine a ``D``-dimensional Gaussian (``D + 1`` scores give ``P`` on ``D`` directions).
  ``fit(method="bam")`` takes this step first (:mod:`pyro_elbo.vi.bam_run`).
* **B = 1, lambda = inf** is GSM (Modi, Gower, Margossian, Wang, Gower, Blei & Saul, "Variational
  inference with Gaussian score matching", NeurIPS 2023): ``mu' = Sigma' g + z`` and
  ``Sigma' = Sigma + (mu - z)(mu - z)^T - (mu' - z)(mu' - z)^T`` (tested against GSM's own
  formulas).
* **Diagonal** (``AutoNormal``, ``AutoDiagonalNormal``): the same update coordinate by coordinate
  with ``U, V`` replaced by their diagonals, ``sigma_i'^2 = 2 v_i / (1 + sqrt(1 + 4 u_i v_i))``.
  Exact for a target with diagonal covariance.  For a correlated target its fixed point matches
  scores, not KL: ``sigma_i^2 sum_j P_ij^2 sigma_j^2 = 1`` (P the target precision), narrower
  than mean-field KL's ``1 / P_ii``; use a full-covariance guide for correlated posteriors.

**Stopping** (:mod:`pyro_elbo.vi.bam_run` adds a score-match test before this one: the
estimate above on a few draws of ``q_t``, with its standard error) (honest about the noise of B
draws): the step's size is measured by
``KL(q_{t+1} || q_t)``, affine invariant, so relative to the Gaussian's own scale in every
direction; the run has converged when it stays below ``tol`` for ``patience`` iterations in a
row.  Each iteration also estimates the ELBO of ``q_t`` (from the batch: no extra evaluations)
and the covariance-weighted Fisher divergence ``1/B sum |u_b + L^T g_b|^2`` (``z_b = mu + L u_b``)
with its standard error: ``diagnostics["fisher"]`` and ``["fisher_se"]``.

**Non-finite draws** (the model cannot be evaluated there) are dropped from the batch; an
iteration with fewer than 2 finite draws, or a non-finite update, raises
:class:`~pyro_elbo.fit.NonFiniteError`.

The functions are pure (BlackJAX's ``blackjax/vi`` style): :func:`init` gives a
:class:`BaMState`, :func:`step` maps a state, the batch and its scores to the next state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["BaMInfo", "BaMState", "default_lr", "fisher_per_draw", "init", "mean_and_se", "match", "step"]


class BaMState(NamedTuple):
    """``mu`` (D,), ``cov`` (D, D) or the variances (D,) when ``diagonal``, ``iteration``."""

    mu: torch.Tensor
    cov: torch.Tensor
    iteration: int
    diagonal: bool


class BaMInfo(NamedTuple):
    """One iteration: ``elbo`` (estimate for the state before the step), ``fisher`` and its
    ``fisher_se``, ``kl_step`` = KL(q_new || q_old), ``num_finite`` draws used, ``lr``."""

    elbo: float
    fisher: float
    fisher_se: float
    kl_step: float
    num_finite: int
    lr: float


def init(mu: torch.Tensor, cov: torch.Tensor, diagonal: bool = False) -> BaMState:
    """The state ``N(mu, cov)`` (``cov`` the variances when ``diagonal``)."""
    return BaMState(mu.detach().clone(), cov.detach().clone(), 0, diagonal)


def default_lr(batch_size: int, dim: int, iteration: int) -> float:
    """``lambda_t = B D / t`` for the step to iteration ``t`` (1-based)."""
    return batch_size * dim / iteration


def scale_of(state: BaMState) -> torch.Tensor:
    """``L`` with ``Sigma = L L^T`` (the sds as a vector when diagonal)."""
    if state.diagonal:
        return state.cov.sqrt()
    return torch.linalg.cholesky(state.cov)


def sample(state: BaMState, num: int, generator=None):
    """``(z, eps)``: ``num`` draws ``z = mu + L eps`` from the state's Gaussian."""
    eps = torch.randn(num, len(state.mu), generator=generator, dtype=state.mu.dtype)
    scale = scale_of(state)
    z = state.mu + (eps * scale if state.diagonal else eps @ scale.T)
    return z, eps


def match(mu, cov, z, g, lr: float, diagonal: bool = False):
    """One BaM update ``(mu', Sigma')`` from draws ``z`` (B, D) and scores ``g`` (B, D)
    (module docstring, step 3).  ``lr=math.inf`` with ``B = 1`` is GSM's update."""
    B = z.shape[0]
    zbar, gbar = z.mean(0), g.mean(0)
    dz, dg = z - zbar, g - gbar
    if math.isinf(lr) and B > 1:
        return _score_match(zbar, gbar, dz, dg, diagonal)
    if math.isinf(lr):
        w, keep = 1.0, 0.0  # lambda / (1 + lambda), 1 / (1 + lambda)
    else:
        w, keep = lr / (1 + lr), 1 / (1 + lr)
    d = mu - zbar
    if diagonal:
        u = w * gbar.pow(2)
        v = cov + w * d.pow(2)
        if B > 1:
            u = u + lr * dg.pow(2).mean(0)
            v = v + lr * dz.pow(2).mean(0)
        new_cov = 2 * v / (1 + (1 + 4 * u * v).sqrt())
        new_mu = keep * mu + w * (new_cov * gbar + zbar)
        return new_mu, new_cov
    U = w * torch.outer(gbar, gbar)
    V = cov + w * torch.outer(d, d)
    if B > 1:  # (for B = 1 the batch covariances are 0, and lambda may be inf)
        U = U + lr * (dg.T @ dg) / B
        V = V + lr * (dz.T @ dz) / B
    V = 0.5 * (V + V.T)
    L = torch.linalg.cholesky(V)
    W = L.T @ (0.5 * (U + U.T)) @ L
    lam, Q = torch.linalg.eigh(0.5 * (W + W.T))
    factor = 2 / (1 + (1 + 4 * lam.clamp(min=0)).sqrt())
    LQ = L @ Q
    new_cov = (LQ * factor) @ LQ.T
    new_cov = 0.5 * (new_cov + new_cov.T)
    new_mu = keep * mu + w * (new_cov @ gbar + zbar)
    return new_mu, new_cov


def _score_match(zbar, gbar, dz, dg, diagonal):
    """BaM's ``lambda -> inf`` limit for ``B > 1``: dividing ``Sigma' U Sigma' + Sigma' = V`` by
    ``lambda`` leaves ``Sigma' Gamma Sigma' = C``, whose PD root is
    ``Sigma' = L Q diag(w)^-1/2 Q^T L^T`` (``C = L L^T``, ``L^T Gamma L = Q diag(w) Q^T``), and
    ``mu' = zbar + Sigma' gbar`` (computed from the QR of the draws and the SVD of the scores,
    below).  ``C`` must be full rank: ``B >= D + 1`` draws (diagonal: 2).
    On a Gaussian target ``g = -P (z - m)``, so ``Gamma = P C P`` and ``Sigma' = P^-1``,
    ``mu' = m`` exactly, from any start.  Raises ``RuntimeError`` when ``C`` or ``Gamma`` is
    not positive definite."""
    B = dz.shape[0]
    if diagonal:
        c, gamma = dz.pow(2).mean(0), dg.pow(2).mean(0)
        if not bool((c > 0).all() and (gamma > 0).all()):
            raise RuntimeError("score match: a coordinate without spread in the batch")
        new_cov = (c / gamma).sqrt()
        return zbar + new_cov * gbar, new_cov
    if B <= dz.shape[1]:
        raise RuntimeError(f"score match needs B >= D + 1 draws, got B = {B}")
    # without forming C or Gamma (B = D + 1 draws make C ill-conditioned; squaring it loses
    # all digits): dz / sqrt(B) = Q R, so C = R^T R (L = R^T), and L^T Gamma L = M^T M with
    # M = dg R^T / sqrt(B) = U diag(s) V^T, so Sigma' = R^T V diag(1 / s) V^T R
    _, R = torch.linalg.qr(dz / math.sqrt(B))
    M = dg @ R.T / math.sqrt(B)
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)
    if not float(s.min()) > 0:
        raise RuntimeError("score match: the scores' covariance is not positive definite")
    RV = R.T @ Vh.T
    new_cov = (RV / s) @ RV.T
    new_cov = 0.5 * (new_cov + new_cov.T)
    return zbar + new_cov @ gbar, new_cov


def mean_and_se(per_draw: torch.Tensor) -> tuple[float, float]:
    """The mean of per-draw values and its standard error (nan where there are too few draws)."""
    n = per_draw.numel()
    mean = float(per_draw.mean()) if n else float("nan")
    return mean, float(per_draw.std() / math.sqrt(n)) if n > 1 else float("nan")


def fisher_per_draw(state: BaMState, eps, scores) -> torch.Tensor:
    """``|u_b + L^T g_b|^2`` for draws ``z_b = mu + L u_b``: the covariance-weighted Fisher
    divergence ``E_q |grad log q - grad log p|^2_Sigma`` one draw at a time (AdvancedVI's
    estimate).  Exactly 0 for every draw when ``q`` is a Gaussian target itself."""
    scale = scale_of(state)
    proj = scores * scale if state.diagonal else scores @ scale
    return (eps + proj).pow(2).sum(-1)


def _kl(mu1, cov1, mu0, cov0, diagonal):
    """KL(N(mu1, cov1) || N(mu0, cov0))."""
    d = mu1 - mu0
    if diagonal:
        ratio = cov1 / cov0
        return float(0.5 * (ratio - 1 - ratio.log() + d.pow(2) / cov0).sum())
    L0 = torch.linalg.cholesky(cov0)
    L1 = torch.linalg.cholesky(cov1)
    M = torch.linalg.solve_triangular(L0, L1, upper=False)
    a = torch.linalg.solve_triangular(L0, d[:, None], upper=False)[:, 0]
    logdet = 2 * (L0.diagonal().log().sum() - L1.diagonal().log().sum())
    return float(0.5 * (M.pow(2).sum() - len(d) + a.pow(2).sum() + logdet))


def _entropy(state: BaMState) -> float:
    D = len(state.mu)
    logdet = state.cov.log().sum() if state.diagonal else torch.logdet(state.cov)
    return float(0.5 * D * (1 + math.log(2 * math.pi)) + 0.5 * logdet)


def step(state: BaMState, z, eps, log_p, scores, lr: float | None = None):
    """``(state', info)``: one BaM iteration given the batch ``z = mu + L eps`` drawn from
    ``state``, its log densities ``log_p`` (B,) and scores (B, D).  Draws with a non-finite
    value or score are dropped; ``state'`` is ``None`` when fewer than 2 remain or the update is
    not finite."""
    t = state.iteration + 1
    finite = torch.isfinite(log_p) & torch.isfinite(scores).all(-1)
    n = int(finite.sum())
    B, D = z.shape
    if lr is None:
        lr = default_lr(B, D, t)
    elbo = float(log_p[finite].mean()) + _entropy(state) if n else float("nan")
    fisher, fisher_se = mean_and_se(fisher_per_draw(state, eps[finite], scores[finite]))
    if n < 2 and not (B == 1 and n == 1):
        return None, BaMInfo(elbo, fisher, fisher_se, float("nan"), n, lr)
    try:
        mu, cov = match(state.mu, state.cov, z[finite], scores[finite], lr, state.diagonal)
        ok = bool(torch.isfinite(mu).all() and torch.isfinite(cov).all())
        kl = _kl(mu, cov, state.mu, state.cov, state.diagonal) if ok else float("nan")
    except RuntimeError:  # a Cholesky of a non-PD matrix
        ok, kl = False, float("nan")
    if not ok or not math.isfinite(kl):
        return None, BaMInfo(elbo, fisher, fisher_se, float("nan"), n, lr)
    return BaMState(mu, cov, t, state.diagonal), BaMInfo(elbo, fisher, fisher_se, kl, n, lr)
