r"""Pathfinder: Gaussian approximations along L-BFGS paths, the best by ELBO, several paths
combined by PSIS resampling.

Zhang, Carpenter, Gelman & Vehtari, "Pathfinder: parallel quasi-Newton variational inference",
JMLR 23(306), 2022 (arXiv 2108.03782), Algorithms 1-5.

**One path** (Algorithm 1), on ``log p(u)`` over the unconstrained space:

1. L-BFGS on ``U = -log p`` from ``u_0`` (two-loop recursion; a line search that is exact on
   quadratics, :func:`_line_search`, so that on a Gaussian target the BFGS matrix of ``D <= J``
   pairs is the exact inverse Hessian), keeping every iterate ``x_l`` and its gradient ``g_l = grad log p(x_l)``, until L-BFGS's own
   tolerances (Stan's defaults): relative decrease of ``U`` below ``tol_rel_obj = 1e4 eps``,
   ``|grad|_inf < 1e-8``, a step ``|x_l - x_{l-1}|_inf < 1e-8``, or ``max_iterations``.
2. For every ``l >= 1``, the inverse Hessian from the last ``J`` (``history_size``) pairs
   ``s_k = x_k - x_{k-1}``, ``z_k = g_{k-1} - g_k`` passing the curvature test
   ``s^T z > eps ||z||^2`` (Algorithm 3): the diagonal ``alpha`` by the Gilbert-Lemarechal update
   (Algorithm 3, line 7)::

       1 / alpha_l = (z^T diag(alpha) z) / (s^T z alpha) + z^2 / (s^T z)
                     - (z^T diag(alpha) z) s^2 / ((s^T z)(s^T diag(alpha)^-1 s) alpha^2)

   and the compact BFGS form (Byrd, Nocedal & Schnabel 1994; the paper's eq. II.1)::

       H = diag(alpha) + beta gamma beta^T,   beta = [diag(alpha) Z, S],
       gamma = [[0, -R^-1], [-R^-T, R^-T (E + Z^T diag(alpha) Z) R^-1]],

   ``R = triu(S^T Z)``, ``E = diag(S^T Z)``: exactly ``J`` dense BFGS updates of ``diag(alpha)``.
3. ``q_l = N(x_l + H g_l, H)``; draws by the paper's Algorithm 4 (a thin QR of
   ``diag(alpha)^-1/2 beta``, O(D J) per draw); its ELBO estimated with ``num_elbo_draws``
   draws (the same standard normals for every ``l``); the path returns the ``q_l`` with the
   highest ELBO, or the latest one within 2 Monte Carlo SEs of it (:func:`choose`).

**Several paths** (Algorithm 5): ``num_paths`` paths from ``u_0 + Uniform(-2, 2)`` starts
(Stan's init radius), ``M`` draws from each path's chosen ``q``, importance weights
``log p(phi) - log q_i(phi)``, Pareto-smoothed (ArviZ's ``psislw``, through
:func:`pyro_elbo.diagnostics.psis.psislw`), and ``num_draws`` draws resampled with replacement.
A PSIS k-hat above 0.7 warns: no Gaussian on any path is a good proposal (a funnel, a banana);
the draws are still returned (resampling still corrects part of the error) but are biased.

Counting: L-BFGS's evaluations are gradient evaluations (``num_evaluations``); the ELBO and
importance draws are log-density evaluations only (``num_density_evaluations``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "PathApproximation",
    "PathResult",
    "approximation",
    "inverse_hessian_factors",
    "lbfgs_path",
    "recover_alpha",
    "sample",
    "single_path",
]

_EPS = torch.finfo(torch.float64).eps


class PathApproximation(NamedTuple):
    """``q_l``: ``position`` x_l, ``grad`` = grad log p(x_l), the inverse-Hessian factors
    ``alpha`` (D,), ``beta`` (D, 2m), ``gamma`` (2m, 2m), and ``mu = x_l + H grad``."""

    position: torch.Tensor
    grad: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    mu: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The dense ``H = diag(alpha) + beta gamma beta^T``."""
        H = torch.diag_embed(self.alpha) + self.beta @ self.gamma @ self.beta.T
        return 0.5 * (H + H.T)


class PathResult(NamedTuple):
    """One path: its ``best`` approximation, ``best_iteration``, the ``elbos`` of every
    iteration (``elbos[l - 1]`` for ``q_l``), the L-BFGS ``positions``, ``num_iterations`` and
    the stopping ``reason``; ``converged`` when an L-BFGS tolerance (not the cap) stopped it."""

    best: PathApproximation
    best_iteration: int
    elbos: list
    positions: torch.Tensor
    num_iterations: int
    reason: str
    converged: bool


# ------------------------------------------------------------------------------- L-BFGS path


def _two_loop(grad, pairs):
    """``-H grad`` for the L-BFGS matrix of ``pairs`` with ``H0 = (s^T y / y^T y) I``."""
    q = grad.clone()
    coefs = []
    for s, y in reversed(pairs):
        rho = 1.0 / float(s @ y)
        a = rho * float(s @ q)
        q -= a * y
        coefs.append((rho, a))
    if pairs:
        s, y = pairs[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y), (rho, a) in zip(pairs, reversed(coefs)):
        b = rho * float(y @ q)
        q += (a - b) * s
    return -q


def _line_search(evaluate, x, value, grad, d, t, c1=1e-4, max_evaluations=25):
    """``(t, value, grad)`` at ``x + t d``: backtracking to the Armijo condition, then one
    secant step ``t g0d / (g0d - gd)`` on the directional derivative (the exact minimizer
    along ``d`` of a quadratic) whenever ``|gd| > 1e-3 |g0d|``, kept if it is no worse.  Exact
    line searches make the steps conjugate on a quadratic, so the BFGS matrix of ``D`` pairs
    is then its exact inverse Hessian.  ``None`` when no point satisfies Armijo."""
    g0d = float(grad @ d)
    for _ in range(max_evaluations):
        new_value, new_grad = evaluate(x + t * d)
        if not math.isfinite(new_value):
            t *= 0.1
            continue
        if new_value > value + c1 * t * g0d:  # quadratic interpolation, safeguarded
            denom = 2 * (new_value - value - g0d * t)
            t_new = -g0d * t * t / denom if denom > 0 else 0.5 * t
            t = min(max(t_new, 0.1 * t), 0.5 * t)
            continue
        gd = float(new_grad @ d)
        if gd > g0d and abs(gd) > 1e-3 * abs(g0d):
            t_sec = t * g0d / (g0d - gd)
            if 0.0 < t_sec and abs(t_sec - t) > 1e-10 * t:
                sec_value, sec_grad = evaluate(x + t_sec * d)
                if math.isfinite(sec_value) and sec_value <= new_value:
                    return t_sec, sec_value, sec_grad
        return t, new_value, new_grad
    return None


def lbfgs_path(target, u0, *, max_iterations=1000, history_size=6, tol_rel_obj=1e4 * _EPS,
               tol_grad=1e-8, tol_param=1e-8, on_iteration=None):
    """``(positions (L+1, D), grads (L+1, D) of log p, reason, converged)`` of L-BFGS on
    ``U = -log p`` from ``u0`` (two-loop recursion with ``history_size`` pairs; the line search
    of :func:`_line_search`).  Every evaluation is one gradient evaluation of ``target``.
    NaN guard: a point whose gradient is not finite counts as ``U = inf`` (the line search
    backs off from it); a non-finite ``log p`` or gradient at the start raises ``ValueError``.
    ``on_iteration()`` is called after every accepted step (the progress bar)."""

    def evaluate(x):
        log_p, score = target.log_density_and_grad(x)
        if not bool(torch.isfinite(score).all()):
            return math.inf, -score
        return -log_p, -score

    x = u0.detach().clone()
    value, grad = evaluate(x)
    if not math.isfinite(value):
        raise ValueError("pathfinder: the log joint or its gradient is not finite at the start "
                         "point")
    positions, grads = [x], [-grad]
    pairs = []
    reason, converged = f"max_iterations={max_iterations} reached", False
    if float(grad.abs().max()) < tol_grad:
        return torch.stack(positions), torch.stack(grads), f"|grad|_inf below {tol_grad:g} at " \
            "the start", True
    for iteration in range(max_iterations):
        d = _two_loop(grad, pairs)
        if not float(d @ grad) < 0:  # not a descent direction: restart from steepest descent
            pairs, d = [], -grad
        t = 1.0 if pairs or iteration else min(1.0, 1.0 / float(grad.abs().sum()))
        found = _line_search(evaluate, x, value, grad, d, t)
        if found is None:
            reason, converged = "the line search found no decrease", False
            break
        t, new_value, new_grad = found
        new_x = x + t * d
        s, y = new_x - x, new_grad - grad
        if float(s @ y) > 1e-10 * float(y @ y):
            pairs = (pairs + [(s, y)])[-history_size:]
        positions.append(new_x)
        grads.append(-new_grad)
        decrease = abs(value - new_value)
        x, value, grad = new_x, new_value, new_grad
        if on_iteration is not None:
            on_iteration()
        if decrease <= tol_rel_obj * max(abs(value), 1.0):
            reason, converged = f"relative decrease of -log p below {tol_rel_obj:.3g}", True
            break
        if float(grad.abs().max()) < tol_grad:
            reason, converged = f"|grad|_inf below {tol_grad:g}", True
            break
        if float(s.abs().max()) < tol_param:
            reason, converged = f"step below {tol_param:g}", True
            break
    return torch.stack(positions), torch.stack(grads), reason, converged


# ------------------------------------------------------------------------ inverse Hessian


def recover_alpha(alpha, s, z):
    """The Gilbert-Lemarechal diagonal update of the module docstring (one accepted pair)."""
    a = (z * alpha * z).sum()
    b = (z * s).sum()
    c = (s / alpha * s).sum()
    inv = a / (b * alpha) + z.pow(2) / b - a * s.pow(2) / (b * c * alpha.pow(2))
    return inv.reciprocal()


def inverse_hessian_factors(S, Z, alpha):
    """``(beta, gamma)`` of ``H = diag(alpha) + beta gamma beta^T`` for pairs ``S, Z`` (m, D),
    oldest first (module docstring, step 2)."""
    m = S.shape[0]
    if m == 0:
        empty = alpha.new_zeros(len(alpha), 0)
        return empty, alpha.new_zeros(0, 0)
    StZ = S @ Z.T  # (m, m): entry (i, j) = s_i^T z_j
    R = torch.triu(StZ)
    E = torch.diag_embed(StZ.diagonal())
    eye = torch.eye(m, dtype=S.dtype)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    alphaZ = Z * alpha  # rows diag(alpha) z_i
    beta = torch.cat([alphaZ.T, S.T], dim=1)  # (D, 2m)
    lower_right = R_inv.T @ (E + alphaZ @ Z.T) @ R_inv
    gamma = torch.cat(
        [torch.cat([torch.zeros(m, m, dtype=S.dtype), -R_inv], 1),
         torch.cat([-R_inv.T, lower_right], 1)], 0,
    )
    return beta, gamma


def approximations(positions, grads, history_size=6, epsilon=1e-12):
    """The ``q_l`` of every iteration ``l = 1..L`` (Algorithm 3 over the path)."""
    D = positions.shape[1]
    alpha = torch.ones(D, dtype=positions.dtype)
    pairs = []
    out = []
    for it in range(1, len(positions)):
        s = positions[it] - positions[it - 1]
        z = grads[it - 1] - grads[it]  # = grad U(x_l) - grad U(x_{l-1})
        if float(s @ z) > epsilon * float(z @ z):
            new_alpha = recover_alpha(alpha, s, z)
            if bool(torch.isfinite(new_alpha).all() and (new_alpha > 0).all()):
                alpha = new_alpha
            pairs = (pairs + [(s, z)])[-history_size:]
        if pairs:
            S = torch.stack([p[0] for p in pairs])
            Z = torch.stack([p[1] for p in pairs])
        else:
            S = Z = positions.new_zeros(0, D)
        beta, gamma = inverse_hessian_factors(S, Z, alpha)
        out.append(approximation(positions[it], grads[it], alpha, beta, gamma))
    return out


def approximation(position, grad, alpha, beta, gamma) -> PathApproximation:
    """``q = N(x + H g, H)`` from the factors."""
    H_grad = alpha * grad + beta @ (gamma @ (beta.T @ grad))
    return PathApproximation(position, grad, alpha, beta, gamma, position + H_grad)


def sample(approx: PathApproximation, num: int, generator=None, u=None):
    """``(draws (num, D), log q (num,))`` by Algorithm 4 of the paper (thin QR), from the
    standard normal draws ``u`` (num, D) when given; raises ``RuntimeError`` when H is not
    positive definite."""
    alpha, beta, gamma = approx.alpha, approx.beta, approx.gamma
    D = len(alpha)
    if u is None:
        u = torch.randn(num, D, generator=generator, dtype=alpha.dtype)
    sqrt_alpha = alpha.sqrt()
    logdet = alpha.log().sum()
    if beta.shape[1]:
        Q, R = torch.linalg.qr(beta / sqrt_alpha[:, None])  # reduced: Q (D, k), R (k, 2m)
        inner = torch.eye(R.shape[0], dtype=alpha.dtype) + R @ gamma @ R.T
        L = torch.linalg.cholesky(0.5 * (inner + inner.T))
        logdet = logdet + 2 * L.diagonal().log().sum()
        Qtu = u @ Q  # (num, k)
        shaped = (Qtu @ (L - torch.eye(len(L), dtype=alpha.dtype)).T) @ Q.T + u
    else:
        shaped = u
    draws = approx.mu + shaped * sqrt_alpha
    log_q = -0.5 * (logdet + u.pow(2).sum(-1) + D * math.log(2 * math.pi))
    return draws, log_q


def log_weights(target, approx, u):
    """``log p - log q`` at the draws of ``approx`` made from the standard normals ``u``
    (all ``-inf`` when H is not positive definite)."""
    try:
        draws, log_q = sample(approx, len(u), u=u)
    except RuntimeError:
        return torch.full((len(u),), float("-inf"), dtype=u.dtype)
    out = target.log_density(draws) - log_q
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("-inf")))


def choose(weights: torch.Tensor) -> int:
    """The index of the chosen approximation from per-draw ``log p - log q`` (L, K), the same
    standard normal draws for every row: the highest ELBO estimate (the paper's rule), except
    that the *latest* iteration whose paired difference to it is within 2 Monte Carlo standard
    errors wins (the exact Gaussian of a quadratic has zero-variance weights, and noise would
    otherwise pick an earlier, slightly wrong one as often as not)."""
    elbos = weights.mean(-1)
    best = int(torch.argmax(torch.nan_to_num(elbos, nan=float("-inf"))))
    if not math.isfinite(float(elbos[best])):
        return best
    K = weights.shape[1]
    for index in range(len(weights) - 1, best, -1):
        if not math.isfinite(float(elbos[index])):
            continue
        diff = weights[best] - weights[index]
        se = float(diff.std()) / math.sqrt(K) if K > 1 else 0.0
        if float(diff.mean()) <= 2 * se:
            return index
    return best


def single_path(target, u0, *, generator=None, max_iterations=1000, history_size=6,
                num_elbo_draws=5, lbfgs_history=None, on_iteration=None) -> PathResult:
    """One Pathfinder path from ``u0`` (module docstring)."""
    positions, grads, reason, converged = lbfgs_path(
        target, u0, max_iterations=max_iterations,
        history_size=lbfgs_history or history_size, on_iteration=on_iteration,
    )
    approxes = approximations(positions, grads, history_size)
    if not approxes:
        raise ValueError(
            f"pathfinder: L-BFGS took no step from its start ({reason}); no approximation"
        )
    u = torch.randn(num_elbo_draws, positions.shape[1], generator=generator,
                    dtype=positions.dtype)
    weights = torch.stack([log_weights(target, a, u) for a in approxes])
    best = choose(weights)
    elbos = weights.mean(-1).tolist()
    return PathResult(approxes[best], best + 1, elbos, positions, len(positions) - 1, reason,
                      converged)
