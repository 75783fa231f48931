r"""Finding the mode of the potential ``U`` (:mod:`pyro_elbo.init.potential`): L-BFGS with a
strong-Wolfe line search (Nocedal & Wright 2006, Alg. 7.5 and 3.5), one iteration per step so
that every iterate is kept, with a damped Newton step on the exact Hessian every few iterations
(L-BFGS alone crawls at condition numbers of 1e12), and a Newton polish at the end.  The Hessian
is ``torch.autograd.functional.hessian`` (vectorized when the model's ops allow it), counted in
gradient evaluations (:mod:`pyro_elbo.init.counting`).
"""

from __future__ import annotations

import math

import torch

from pyro_elbo.init.counting import add_gradients, paused
from pyro_elbo.init.potential import LaplaceUnavailable

__all__ = ["DECREMENT_TOL", "hessian", "lbfgs_path", "newton_polish"]

#: the mode counts as found when the Newton decrement g^T H^-1 g is below this
DECREMENT_TOL = 1e-8


def lbfgs_path(potential, u0, max_iterations, tolerance, newton_every=10):
    """Run L-BFGS one iteration per ``step`` call (the history persists in the optimizer's
    state) so that every iterate is kept for the path pick.  Every ``newton_every`` iterations
    (0: never) a damped Newton step with the exact Hessian is tried: L-BFGS alone crawls when
    the condition number is 1e12 or more, Newton does not care.  Stops when ``U`` has changed
    by less than ``tolerance * max(1, |U|)`` in three successive iterations, or when the
    Newton decrement is below the convergence threshold; returns the iterates (the start
    included)."""
    u = u0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=1,
        max_eval=25,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    # where the model cannot be evaluated (overflow, a validation error) the line search sees
    # a huge finite value with zero slope, so it backs off; an infinity or a NaN would poison
    # its cubic interpolation
    wall = torch.finfo(u.dtype).max ** 0.25

    def closure():
        opt.zero_grad()
        try:
            value = potential(u)
        except (ValueError, RuntimeError):
            value = None
        if value is None or not torch.isfinite(value):
            u.grad = torch.zeros_like(u)
            return torch.tensor(wall, dtype=u.dtype)
        value.backward()
        if not torch.isfinite(u.grad).all():
            u.grad.zero_()
            return torch.tensor(wall, dtype=u.dtype)
        return value

    path = [u.detach().clone()]
    previous = float(closure().detach())
    if previous >= wall:
        raise LaplaceUnavailable("laplace_init: the log joint is not finite at the start point")
    still = 0
    for _ in range(max_iterations):
        opt.step(closure)
        current = u.detach().clone()
        try:
            with torch.no_grad():
                value = float(potential(current))
        except (ValueError, RuntimeError):
            break
        if not math.isfinite(value) or not torch.isfinite(current).all():
            break
        path.append(current)
        still = still + 1 if abs(previous - value) <= tolerance * max(1.0, abs(value)) else 0
        if still >= 3:
            break
        previous = value
        if newton_every and len(path) % newton_every == 0:
            jump, decrement = _damped_newton(potential, current, value)
            if jump is not None:
                with torch.no_grad():
                    u.copy_(jump[0])
                opt.state.clear()  # the curvature pairs straddle the jump: start afresh
                path.append(jump[0])
                previous = jump[1]
            if decrement is not None and decrement <= DECREMENT_TOL:
                break
    return path


def _damped_newton(potential, u, value):
    """``((u', U(u')), decrement)`` for the first of ``u - t H^-1 g``, t = 1, 1/2, ..., 1/8,
    that lowers ``U``; ``(None, decrement)`` when none does or H is not positive definite."""
    try:
        hess = hessian(potential, u)
        chol = torch.linalg.cholesky(hess)
    except (LaplaceUnavailable, RuntimeError):
        return None, None
    g = _grad(potential, u)
    delta = torch.cholesky_solve(g[:, None], chol)[:, 0]
    decrement = float(g @ delta)
    for t in (1.0, 0.5, 0.25, 0.125):
        candidate = u - t * delta
        try:
            with torch.no_grad():
                new = float(potential(candidate))
        except (ValueError, RuntimeError):
            continue
        if math.isfinite(new) and new < value:
            return (candidate, new), decrement
    return None, decrement


def newton_polish(potential, u, hess, steps=3):
    """Up to ``steps`` Newton steps ``u <- u - H^-1 grad U(u)``, each kept only if it lowers
    ``U``; returns ``(u, hess, newton decrement^2 at u)``.  The decrement ``g^T H^-1 g`` is
    affine invariant: it equals ``2 (U(u) - U(u*))`` on a quadratic, whatever the scaling."""
    decrement = float("inf")
    for _ in range(steps + 1):
        g = _grad(potential, u)
        try:
            chol = torch.linalg.cholesky(hess)
        except RuntimeError:
            return u, hess, float("nan")
        delta = torch.cholesky_solve(g[:, None], chol)[:, 0]
        decrement = float(g @ delta)
        if decrement <= 1e-20 or _ == steps:
            break
        candidate = u - delta
        with torch.no_grad():
            if not float(potential(candidate)) <= float(potential(u)):
                break
        u = candidate
        hess = hessian(potential, u)
    return u, hess, decrement


def _grad(potential, u):
    u = u.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(potential(u), u)
    return g.detach()


def hessian(potential, u):
    """``hess U(u)``, symmetrized; :class:`LaplaceUnavailable` when it is not finite."""
    add_gradients(potential, u.numel())  # D Hessian-vector products
    with paused(potential):
        try:  # one batched double-backward (vmap) when the model's ops allow it
            hess = torch.autograd.functional.hessian(potential, u.detach(), vectorize=True)
        except Exception:  # a D-pass loop otherwise
            hess = torch.autograd.functional.hessian(potential, u.detach())
    hess = 0.5 * (hess + hess.T)
    if not torch.isfinite(hess).all():
        raise LaplaceUnavailable("laplace_init: the Hessian of the log joint is not finite")
    return hess.detach()
