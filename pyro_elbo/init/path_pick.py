r"""The Pathfinder-style pick when L-BFGS finds no mode (a funnel: the centered hierarchical
model's joint density grows without bound as the group scale goes to 0).  As Pathfinder does
(Zhang, Carpenter, Gelman & Vehtari 2022), along the L-BFGS path the Laplace Gaussian
``N(u_t, H_t^-1)`` is taken at several iterates, its ELBO estimated with a few seeded draws::

    ELBO(q_t) = E_q[-U(u)] + H[q_t]

and the best one kept.
"""

from __future__ import annotations

import math

import torch

from pyro_elbo.init.hessian import positive_definite
from pyro_elbo.init.mode import hessian
from pyro_elbo.init.potential import LaplaceUnavailable

__all__ = ["best_on_path"]


def best_on_path(potential, path, last_hess, last_precision, candidates, draws, seed):
    """``(step, hess, precision, fallback, elbo)`` of the path point whose Laplace Gaussian has
    the highest ELBO estimate, among ``candidates`` points spread over the path (the last one
    always included); ``None`` when no estimate is finite."""
    n = len(path)
    # geometric spacing: a path that runs off (a funnel) is best early, and most of the
    # iterates sit late
    ratio = (n - 1) ** (1 / max(candidates - 1, 1))
    steps = sorted({0, n - 1} | {min(n - 1, round(ratio**i)) for i in range(candidates)})
    gen = torch.Generator().manual_seed(seed)
    dim = path[0].numel()
    eps = torch.randn(draws, dim, generator=gen, dtype=path[0].dtype)
    best = None
    for step in steps:
        if step == n - 1:
            hess, precision = last_hess, last_precision
            fallback = None if precision is hess else "repaired"
        else:
            try:
                hess = hessian(potential, path[step])
            except LaplaceUnavailable:
                continue
            precision, fallback = positive_definite(hess)
        elbo = _elbo(potential, path[step], precision, eps)
        if math.isfinite(elbo) and (best is None or elbo > best[4]):
            best = (step, hess, precision, fallback, elbo)
    if best is not None and best[3] == "repaired":
        best = (best[0], best[1], best[2], positive_definite(best[1])[1], best[4])
    return best


def _elbo(potential, loc, precision, eps):
    """``E_q[-U(u)] + H[q]`` for ``q = N(loc, precision^-1)``, with the given standard draws."""
    try:
        chol_prec = torch.linalg.cholesky(precision)
    except RuntimeError:
        return float("-inf")
    # u = loc + L^-T eps has covariance (L L^T)^-1
    z = torch.linalg.solve_triangular(chol_prec.T, eps.T, upper=True).T + loc
    dim = loc.numel()
    entropy = 0.5 * dim * (1 + math.log(2 * math.pi)) - float(chol_prec.diagonal().log().sum())
    try:
        with torch.no_grad():
            values = torch.stack([potential(zi) for zi in z])
    except (ValueError, RuntimeError):
        return float("-inf")
    if not torch.isfinite(values).all():
        return float("-inf")
    return -float(values.mean()) + entropy
