r"""Batch-and-Match for a low-rank-plus-diagonal Gaussian in ``O(D (r + B)^2)`` per iteration,
without any ``D x D`` matrix.

``q = N(mu, Sigma)`` with ``Sigma = diag(psi) + Lambda Lambda^T`` (``Lambda``: D x r), the family
of ``AutoLowRankMultivariateNormal``.  One iteration (Cai et al., ICML 2024, Algorithm 1, with the
low-rank "patch" of Modi, Cai & Saul, "Batch, match, and patch: low-rank approximations for
score-based variational inference", AISTATS 2025):

1. **match**, exactly, in factored form: with ``B`` draws and ``w = lambda / (1 + lambda)``, BaM's
   ``U`` and ``V`` (:mod:`pyro_elbo.vi.bam`) are

       U = Q Q^T,               Q = [sqrt(lambda / B) (g_b - gbar)_b, sqrt(w) gbar]      (D x (B+1))
       V = diag(psi) + R R^T,   R = [Lambda, sqrt(lambda / B) (z_b - zbar)_b, sqrt(w) (mu - zbar)]

   and the root of ``Sigma' U Sigma' + Sigma' = V`` is, for any ``U = Q Q^T``,

       Sigma' = V - A K A^T,    A = V Q,   K = (I/2 + (Q^T V Q + I/4)^(1/2))^-2

   (with ``S = (M + I/4)^(1/2)``, ``M = Q^T V Q``: ``Sigma' Q = A (S + I/2)^-1``, so
   ``Sigma' U Sigma' = A K A^T``).  ``A`` costs ``O(D (r + B) B)``, ``M`` and ``K`` ``O(D B^2)``;
   ``Sigma' = diag(psi) + F diag(G) F^T`` with ``F = [R, A E]``, ``K = E diag(k) E^T``,
   ``G = [1..., -k]``; the mean ``mu' = mu / (1 + lambda) + w (Sigma' gbar + zbar)`` needs only
   products with ``F``.
2. **patch**: the rank-``r``-plus-diagonal Gaussian closest to ``N(0, Sigma')`` in
   ``KL(N(0, Sigma') || q)``, i.e. the maximum-likelihood factor analysis of the covariance
   ``Sigma'`` (:func:`patch`: EM, warm-started at the current state, every sweep ``O(D m r)``
   with ``m = 2 + r + 2 B`` columns in ``F``).  When ``Sigma'`` is itself rank-``r``-plus-
   diagonal the fit is exact; at BaM's fixed point on a Gaussian target in the family the
   target is returned.

The score-match limit (``lambda = inf``) needs ``B > D`` draws, so this variant keeps the
schedule ``lambda_t = B D / t`` throughout.  :func:`step` has :func:`pyro_elbo.vi.bam.step`'s
contract (non-finite draws dropped; ``None`` when fewer than 2 remain or the update is not
finite) and the same :class:`~pyro_elbo.vi.bam.BaMInfo`; ``fisher_per_draw`` and ``kl`` use
Woodbury's identity and the matrix determinant lemma.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pyro_elbo.vi.bam import BaMInfo, default_lr, mean_and_se

__all__ = ["LowRankState", "fisher_per_draw", "init", "kl", "match", "patch", "sample", "step"]


class LowRankState(NamedTuple):
    """``N(mu, diag(psi) + factor factor^T)``; ``factor`` is D x r."""

    mu: torch.Tensor
    psi: torch.Tensor
    factor: torch.Tensor
    iteration: int


def init(mu, cov, rank: int) -> LowRankState:
    """The state closest (:func:`patch`) to ``N(mu, cov)`` for a dense ``cov`` (a start of
    ``D <= 200`` dimensions), or ``cov = (psi, factor)`` as it is."""
    if isinstance(cov, tuple):
        psi, factor = cov
        return LowRankState(mu.detach().clone(), psi.detach().clone(),
                            factor.detach().clone(), 0)
    D = len(mu)
    psi, factor = patch(torch.zeros(D, dtype=cov.dtype), torch.linalg.cholesky(cov),
                        torch.ones(D, dtype=cov.dtype), rank)
    return LowRankState(mu.detach().clone(), psi, factor, 0)


def sample(state: LowRankState, num: int, generator=None):
    """``(z, eps)``: ``z = mu + psi^1/2 eps_1 + factor eps_2``, ``eps = [eps_1, eps_2]``."""
    D, r = state.factor.shape
    eps = torch.randn(num, D + r, generator=generator, dtype=state.mu.dtype)
    z = state.mu + eps[:, :D] * state.psi.sqrt() + eps[:, D:] @ state.factor.T
    return z, eps


def _solve(psi, factor, x):
    """``Sigma^-1 x`` (rows of ``x``) by Woodbury."""
    r = factor.shape[1]
    Pf = factor / psi[:, None]
    core = torch.eye(r, dtype=psi.dtype) + factor.T @ Pf
    return x / psi - (torch.linalg.solve(core, (x @ Pf).T)).T @ Pf.T


def _logdet(psi, factor):
    r = factor.shape[1]
    core = torch.eye(r, dtype=psi.dtype) + factor.T @ (factor / psi[:, None])
    return psi.log().sum() + torch.logdet(core)


def fisher_per_draw(state: LowRankState, z, scores) -> torch.Tensor:
    """``(grad log q - g)^T Sigma (grad log q - g)`` per draw, ``grad log q = -Sigma^-1 (z - mu)``:
    ``= e^T Sigma^-1 e + 2 e^T g + g^T Sigma g`` with ``e = z - mu``."""
    e = z - state.mu
    quad = (e * _solve(state.psi, state.factor, e)).sum(-1)
    g_sigma_g = (scores.pow(2) * state.psi).sum(-1) + (scores @ state.factor).pow(2).sum(-1)
    return quad + 2 * (e * scores).sum(-1) + g_sigma_g


def kl(new: LowRankState, old: LowRankState) -> float:
    """``KL(q_new || q_old)`` in ``O(D r^2)``."""
    D, r = old.factor.shape
    d = new.mu - old.mu
    # tr(Sigma_old^-1 Sigma_new) = tr(Sigma_old^-1 diag(psi_new)) + tr(F_new^T Sigma_old^-1 F_new)
    Pf = old.factor / old.psi[:, None]
    core = torch.eye(r, dtype=d.dtype) + old.factor.T @ Pf
    core_inv = torch.linalg.inv(core)
    inv_diag = 1 / old.psi - ((Pf @ core_inv) * Pf).sum(-1)
    trace = (inv_diag * new.psi).sum() + (new.factor * _solve(old.psi, old.factor,
                                                                new.factor.T).T).sum()
    quad = (d * _solve(old.psi, old.factor, d[None])[0]).sum()
    logdet = _logdet(old.psi, old.factor) - _logdet(new.psi, new.factor)
    return float(0.5 * (trace - D + quad + logdet))


def match(mu, psi, factor, z, g, lr: float):
    """BaM's exact update in factored form (module docstring, step 1):
    ``(mu', psi, F, G)`` with ``Sigma' = diag(psi) + F diag(G) F^T``."""
    B = z.shape[0]
    zbar, gbar = z.mean(0), g.mean(0)
    w, keep = lr / (1 + lr), 1 / (1 + lr)
    a = math.sqrt(lr / B)
    Q = torch.cat([a * (g - gbar).T, math.sqrt(w) * gbar[:, None]], 1)
    R = torch.cat([factor, a * (z - zbar).T, math.sqrt(w) * (mu - zbar)[:, None]], 1)
    A = psi[:, None] * Q + R @ (R.T @ Q)
    M = Q.T @ A
    s, E = torch.linalg.eigh(0.5 * (M + M.T))
    k = (0.5 + (s.clamp(min=0) + 0.25).sqrt()).pow(-2)
    F = torch.cat([R, A @ E], 1)
    G = torch.cat([torch.ones(R.shape[1], dtype=z.dtype), -k])
    sigma_gbar = psi * gbar + F @ (G * (F.T @ gbar))
    return keep * mu + w * (sigma_gbar + zbar), psi, F, G


def patch(psi, F, G, rank: int, start=None, sweeps: int = 200, tol: float = 1e-10):
    """``(psi', Lambda')``: the factor-analysis fit of rank ``rank`` to
    ``S = diag(psi) + F diag(G) F^T`` (module docstring, step 2), by EM (Rubin & Thayer 1982)
    from ``start = (psi_0, Lambda_0)`` (BaM passes its current state), else from the top
    ``rank`` Ritz pairs of ``S`` whitened by ``diag(S) / 2`` in the span of ``F``.  Each sweep,
    with ``beta^T = Sigma^-1 Lambda`` (Woodbury)::

        Lambda' = S beta^T (I - beta Lambda + beta S beta^T)^-1
        psi'    = diag(S) - rowsum(Lambda' * S beta^T)

    is ``O(D m r)``; it stops when ``psi`` and ``Lambda Lambda^T``'s diagonal change by less
    than ``tol`` relative to ``diag(S)``."""
    diag_S = psi + (F.pow(2) * G).sum(-1)
    floor = 1e-10 * diag_S

    def times_S(X):  # S X for X (D, k)
        return psi[:, None] * X + F @ (G[:, None] * (F.T @ X))

    if start is None:
        c = 0.5 * diag_S
        Qh, _ = torch.linalg.qr(F / c.sqrt()[:, None])
        core = Qh.T @ (times_S(Qh / c.sqrt()[:, None]) / c.sqrt()[:, None])
        e, V = torch.linalg.eigh(0.5 * (core + core.T))
        W = Qh @ V[:, -rank:]
        factor = c.sqrt()[:, None] * W * (e[-rank:] - 1).clamp(min=1e-6).sqrt()
        current = (diag_S - factor.pow(2).sum(-1)).clamp(min=floor)
    else:
        current, factor = start[0].clamp(min=floor), start[1]
    eye = torch.eye(rank, dtype=F.dtype)
    for _ in range(sweeps):
        Pf = factor / current[:, None]
        beta_t = Pf @ torch.linalg.inv(eye + factor.T @ Pf)  # Sigma^-1 Lambda, (D, r)
        S_beta = times_S(beta_t)
        inner = eye - beta_t.T @ factor + beta_t.T @ S_beta
        new_factor = torch.linalg.solve(inner, S_beta.T).T
        new = (diag_S - (new_factor * S_beta).sum(-1)).clamp(min=floor)
        change = float(((new - current).abs() / diag_S).max()) + float(
            ((new_factor.pow(2).sum(-1) - factor.pow(2).sum(-1)).abs() / diag_S).max())
        current, factor = new, new_factor
        if change < tol:
            break
    return current, factor


def step(state: LowRankState, z, eps, log_p, scores, lr: float | None = None):
    """``(state', info)``: one low-rank BaM iteration (match, then patch)."""
    t = state.iteration + 1
    finite = torch.isfinite(log_p) & torch.isfinite(scores).all(-1)
    n = int(finite.sum())
    B, D = z.shape
    rank = state.factor.shape[1]
    if lr is None or math.isinf(lr):
        lr = default_lr(B, D, t)
    entropy = 0.5 * D * (1 + math.log(2 * math.pi)) + 0.5 * float(_logdet(state.psi,
                                                                         state.factor))
    elbo = float(log_p[finite].mean()) + entropy if n else float("nan")
    fisher, fisher_se = mean_and_se(fisher_per_draw(state, z[finite], scores[finite]))
    if n < 2:
        return None, BaMInfo(elbo, fisher, fisher_se, float("nan"), n, lr)
    try:
        mu, psi, F, G = match(state.mu, state.psi, state.factor, z[finite], scores[finite], lr)
        warm = (state.psi, state.factor) if bool(state.factor.abs().max() > 0) else None
        psi, factor = patch(psi, F, G, rank, start=warm)
        new = LowRankState(mu, psi, factor, t)
        ok = bool(torch.isfinite(mu).all() and torch.isfinite(psi).all()
                  and torch.isfinite(factor).all())
        step_kl = kl(new, state) if ok else float("nan")
    except RuntimeError:
        ok, step_kl = False, float("nan")
    if not ok or not math.isfinite(step_kl):
        return None, BaMInfo(elbo, fisher, fisher_se, float("nan"), n, lr)
    return new, BaMInfo(elbo, fisher, fisher_se, step_kl, n, lr)


def from_factors(mu, alpha, beta, gamma, rank: int) -> LowRankState:
    """The state closest (:func:`patch`) to Pathfinder's ``N(mu, diag(alpha) + beta gamma
    beta^T)`` (:class:`~pyro_elbo.vi.path.PathApproximation`), in ``O(D J r)``."""
    if beta.shape[1] == 0:
        D = len(mu)
        return LowRankState(mu.clone(), alpha.clone(), mu.new_zeros(D, rank), 0)
    g, E = torch.linalg.eigh(0.5 * (gamma + gamma.T))
    psi, factor = patch(alpha, beta @ E, g, rank)
    return LowRankState(mu.detach().clone(), psi, factor, 0)


def write(guide, state: LowRankState) -> str:
    """Write ``state`` into an ``AutoLowRankMultivariateNormal`` (Pyro's
    ``cov = diag(s) (C C^T + I) diag(s)``: ``s = psi^1/2``, ``C = Lambda / s``) in ``O(D r)``."""
    from pyro_elbo.init.laplace import _set_parameter, _set_pyro_param

    scale = state.psi.sqrt()
    factor = state.factor / scale[:, None]
    columns = guide.cov_factor.shape[1]
    if factor.shape[1] < columns:  # the guide's rank exceeds the state's: zero columns
        factor = torch.cat([factor, factor.new_zeros(len(scale), columns - factor.shape[1])], 1)
    _set_parameter(guide.loc, state.mu)
    _set_pyro_param(guide, "scale", scale)
    _set_parameter(guide.cov_factor, factor[:, :columns])
    return f"AutoLowRankMultivariateNormal: rank-{columns} BaM state written"
