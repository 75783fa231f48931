r"""Writing the Laplace Gaussian ``N(u*, H^-1)`` into an autoguide: the Gaussian its family can
hold that is closest to it.

* ``AutoMultivariateNormal``: ``loc = u*``, ``L = chol(H^-1)``, written as Pyro stores it
  (``scale = diag L``, ``scale_tril = L / diag L`` row-wise, ``loc`` a plain ``nn.Parameter``);
* ``AutoNormal``, ``AutoDiagonalNormal``: ``loc = u*`` and, by default
  (``diagonal="conditional"``), ``scale_i = 1 / sqrt(H_ii)``: the mean-field q minimizing
  KL(q || N(u*, H^-1)) has exactly these precisions (Bishop 2006, sec. 10.1.2).
  ``diagonal="marginal"`` gives ``sqrt((H^-1)_ii)`` instead;
* ``AutoLowRankMultivariateNormal``: Pyro's ``cov = diag(s) (F F^T + I) diag(s)`` chosen to
  minimize KL(q || N(u*, H^-1)) (:func:`low_rank_factors`);
* ``AutoDelta``, ``AutoLaplaceApproximation``: the mode;
* any other guide is left untouched.
"""

from __future__ import annotations

import math

import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

__all__ = [
    "SUPPORTED_GUIDES",
    "low_rank_factors",
    "set_guide",
    "set_parameter",
    "set_pyro_param",
]

#: the autoguides :func:`set_guide` knows how to set from the Laplace approximation
SUPPORTED_GUIDES = (
    AutoNormal,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
    AutoLaplaceApproximation,
    AutoDelta,
)


def low_rank_factors(covariance: torch.Tensor, rank: int, iterations: int = 200):
    """``(scale, cov_factor)`` with ``Sigma_q = diag(s) (F F^T + I) diag(s)`` (Pyro's
    ``AutoLowRankMultivariateNormal`` parameterization) minimizing ``KL(q || N(0, covariance))``:
    the direction the ELBO minimizes, so the guide starts at its own optimum for the Laplace
    Gaussian.  Worked in correlation units (the KL is invariant to a common diagonal rescaling):
    ``C = D^-1 Sigma D^-1``, ``P = C^-1``, and with ``S = diag(s')``::

        2 KL = tr(S P S) + tr(F^T S P S F) - 2 sum log s' - log|I + F^T F| + log|P| - dim

    minimized by L-BFGS over ``(log s', F)``, started from maximum-likelihood factor analysis
    of ``C`` (Joreskog 1967), which is exact when ``Sigma`` has that structure.  Then
    ``s = sd * s'``."""
    sd = covariance.diagonal().sqrt()
    corr = covariance / sd[:, None] / sd[None, :]
    dim = corr.shape[0]
    rank = min(rank, dim)
    precision = torch.linalg.inv(corr)
    precision = 0.5 * (precision + precision.T)
    # factor-analysis start: C ~ Lambda Lambda^T + Psi
    floor = 1e-6
    psi = precision.diagonal().reciprocal().clamp(floor, 1.0)
    for _ in range(iterations):
        root = psi.rsqrt()
        lam, vecs = torch.linalg.eigh(root[:, None] * corr * root[None, :])
        lam, vecs = lam[-rank:], vecs[:, -rank:]
        loadings = psi.sqrt()[:, None] * vecs * (lam - 1).clamp(min=0).sqrt()
        new_psi = (1 - loadings.pow(2).sum(-1)).clamp(floor, 1.0)
        done = float((new_psi - psi).abs().max()) < 1e-12
        psi = new_psi
        if done:
            break
    log_s = (0.5 * psi.log()).contiguous().requires_grad_(True)
    factor = (loadings * psi.rsqrt()[:, None]).contiguous().requires_grad_(True)
    eye = torch.eye(rank, dtype=corr.dtype)

    def two_kl():
        s = log_s.exp()
        sps = s[:, None] * precision * s[None, :]
        return (
            sps.trace()
            + (factor * (sps @ factor)).sum()
            - 2 * log_s.sum()
            - torch.logdet(eye + factor.T @ factor)
        )

    opt = torch.optim.LBFGS(
        [log_s, factor], max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-14,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = two_kl()
        value.backward()
        return value

    opt.step(closure)
    return (sd * log_s.detach().exp()), factor.detach()


def set_pyro_param(module, name, value):
    """Set PyroParam ``name`` (dotted) of ``module`` to the constrained ``value``, through the
    param store when the module is registered there."""
    *parents, leaf = name.split(".")
    for part in parents:
        module = getattr(module, part)
    current = getattr(module, leaf)  # inside the Pyro context this syncs with the param store
    setattr(module, leaf, value.detach().to(dtype=current.dtype, device=current.device))


def set_parameter(param, value):
    """Set the plain ``nn.Parameter`` ``param`` to ``value`` (its dtype and device kept)."""
    with torch.no_grad():
        param.data = value.detach().to(dtype=param.dtype, device=param.device).clone()


def set_guide(guide, result, *, diagonal: str = "conditional",
              locations_only: bool = False):
    """Write ``result`` into ``guide``; ``(initialized, message)``.  ``locations_only``: set the
    mode and leave the scales (no curvature)."""
    if guide is None:
        return False, "no guide given: the mode and Hessian are in the result"
    if not isinstance(guide, SUPPORTED_GUIDES):
        return False, (
            f"{type(guide).__name__} is not one of the autoguides laplace_init knows "
            "(AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal, AutoLaplaceApproximation, AutoDelta): the guide was "
            "left as it is; the mode and Hessian are in the result"
        )
    names = [n for n, _ in guide.prototype_trace.iter_stochastic_nodes()]
    cut = sum(math.prod(dict(result.sites)[n]) for n in names)
    loc = result.loc[:cut]
    if locations_only:
        with guide._pyro_context:
            if isinstance(guide, AutoNormal):
                for name in names:
                    shape = dict(result.sites)[name]
                    set_pyro_param(guide.locs, name, loc[result.slices[name]].reshape(shape))
            elif isinstance(guide, AutoDelta):
                for name in names:
                    set_pyro_param(guide, name, result.mode[name])
            else:
                set_parameter(guide.loc, loc)
        return True, f"{type(guide).__name__}: loc = mode, scales unchanged"
    cov = result.covariance[:cut, :cut]
    # the mean-field precision is the guide block's own conditional precision only when the
    # guide covers every site; for a subset it is the marginal block's
    prec = result.precision if cut == result.loc.numel() else torch.linalg.inv(cov)
    if diagonal == "conditional":
        diag_sd = prec.diagonal()[:cut].rsqrt()
    else:
        diag_sd = cov.diagonal().sqrt()
    with guide._pyro_context:
        if isinstance(guide, AutoNormal):
            for name in names:
                shape = dict(result.sites)[name]
                block = result.slices[name]
                set_pyro_param(guide.locs, name, loc[block].reshape(shape))
                set_pyro_param(guide.scales, name, diag_sd[block].reshape(shape))
            what = f"loc = mode, scale = {diagonal} sd"
        elif isinstance(guide, AutoDelta):
            for name in names:
                set_pyro_param(guide, name, result.mode[name])
            what = "value = mode"
        else:
            set_parameter(guide.loc, loc)
            if isinstance(guide, AutoMultivariateNormal):
                # the leading block of chol(Sigma) is chol of Sigma's leading block
                tril = result.scale_tril[:cut, :cut]
                scale = tril.diagonal()
                set_pyro_param(guide, "scale", scale)
                set_pyro_param(guide, "scale_tril", tril / scale[:, None])
                what = "loc = mode, scale_tril = chol(H^-1)"
            elif isinstance(guide, AutoDiagonalNormal):
                set_pyro_param(guide, "scale", diag_sd)
                what = f"loc = mode, scale = {diagonal} sd"
            elif isinstance(guide, AutoLowRankMultivariateNormal):
                scale, factor = low_rank_factors(cov, guide.rank)
                if factor.shape[1] < guide.cov_factor.shape[1]:  # rank > dim: zero columns
                    pad = guide.cov_factor.shape[1] - factor.shape[1]
                    factor = torch.cat([factor, factor.new_zeros(factor.shape[0], pad)], -1)
                set_pyro_param(guide, "scale", scale)
                set_parameter(guide.cov_factor, factor)
                what = f"loc = mode, rank-{guide.rank} KL-optimal fit to H^-1"
            else:  # AutoLaplaceApproximation: loc only
                what = "loc = mode"
    return True, f"{type(guide).__name__}: {what}"
