r"""Curvature at the mode: repairing a Hessian that is not positive definite, and the Cholesky
factor of its inverse.

**Non-positive-definite H** (a saddle, a flat direction, a mode on a boundary): with
``H = V diag(lam) V^T``, every eigenvalue ``lam_i <= eps * max|lam|`` is replaced by
``max(|lam_i|, floor)`` (``floor = 1``: unit variance in the unconstrained space, the width of a
standard prior).  Directions with real curvature keep it.
"""

from __future__ import annotations

import torch

__all__ = ["EIG_FLOOR", "covariance_cholesky", "positive_definite"]

#: the curvature a non-positive direction gets: unit variance in the unconstrained space
EIG_FLOOR = 1.0


def covariance_cholesky(precision: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of ``precision^-1`` without forming the inverse: with ``J``
    the order reversal and ``J P J = M M^T``, ``chol(P^-1) = J M^-T J`` (lower triangular,
    positive diagonal).  Forming ``P^-1`` and factoring it again fails at condition numbers
    near 1e13 in float64."""
    flip = precision.flip(0, 1)
    m = torch.linalg.cholesky(flip)
    eye = torch.eye(len(flip), dtype=flip.dtype, device=flip.device)
    m_inv_t = torch.linalg.solve_triangular(m, eye, upper=False).T
    return m_inv_t.flip(0, 1)


def positive_definite(hess: torch.Tensor, rtol: float | None = None, floor: float = EIG_FLOOR):
    """``(precision, fallback)``: ``hess`` itself when its Cholesky exists and every eigenvalue
    exceeds ``rtol`` times the largest (default: the dtype's eps, about the eigensolver's
    rounding error relative to the largest eigenvalue), else the eigenvalue repair of the module docstring
    (``lam_i <= rtol * max|lam|`` becomes ``max(|lam_i|, floor)``) and a line saying what
    changed."""
    if rtol is None:
        rtol = torch.finfo(hess.dtype).eps
    lam, vecs = torch.linalg.eigh(hess)
    top = float(lam.abs().max())
    bad = lam <= rtol * top
    if not bool(bad.any()):
        try:
            torch.linalg.cholesky(hess)
            return hess, None
        except RuntimeError:  # pragma: no cover - eigh and cholesky disagree at the edge
            pass
    fixed = torch.where(bad, lam.abs().clamp(min=floor), lam)
    precision = (vecs * fixed) @ vecs.T
    precision = 0.5 * (precision + precision.T)
    jitter = rtol * float(fixed.max())
    while True:  # rebuilding from eigenpairs can lose definiteness at the last digits
        try:
            torch.linalg.cholesky(precision)
            break
        except RuntimeError:
            precision = precision + jitter * torch.eye(len(lam), dtype=lam.dtype)
            jitter *= 10
    negatives = int((lam < 0).sum())
    note = (
        f"Hessian not positive definite ({negatives} negative, "
        f"{int(bad.sum()) - negatives} near-zero of {lam.numel()} eigenvalues, smallest "
        f"{float(lam.min()):.3g}, largest {float(lam.max()):.3g}); those eigenvalues were "
        f"replaced by max(|lambda|, {floor:g})"
    )
    return precision, note
