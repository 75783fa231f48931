r"""The whitened coordinates of :class:`~pyro_elbo.init.conditioning.WhitenedAdam`: per guide
family, a block of leaf tensors ``psi`` and the map ``forward(psi) -> {param: unconstrained
value}`` with its inverse ``reverse`` (the maps are in :mod:`pyro_elbo.init.conditioning`'s
docstring: full rank ``loc = m0 + L0 mu``, ``L = L0 R``; mean field ``loc = m0 + s0 mu``,
``scale = s0 exp(rho)``; low rank ``s = s0 exp(rho)``, ``F`` as is), and the handles that read
and write one guide parameter through the param store.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch.distributions import transform_to

__all__ = [
    "FullRankBlock",
    "LowRankBlock",
    "MeanFieldBlock",
    "ParamHandle",
    "WhitenedBlock",
    "whitened_blocks",
]


# ------------------------------------------------------------------------ parameter handles


class ParamHandle:
    """One PyroParam or nn.Parameter of the guide: its param-store name and constraint."""

    def __init__(self, module, name):
        *parents, leaf = name.split(".")
        for part in parents:
            module = getattr(module, part)
        self.module, self.leaf = module, leaf
        self.fullname = module._pyro_get_fullname(leaf)
        pyro_params = module.__dict__.get("_pyro_params", {})
        constraint = pyro_params[leaf][0] if leaf in pyro_params else None
        self.transform = transform_to(constraint) if constraint is not None else None

    def constrained(self, unconstrained):
        return unconstrained if self.transform is None else self.transform(unconstrained)

    def unconstrained(self, constrained):
        return constrained if self.transform is None else self.transform.inv(constrained)

    def current(self):
        """The current unconstrained tensor (through the param store when registered)."""
        store = pyro.get_param_store()
        if self.fullname in store._params:
            return store._params[self.fullname]
        name = self.leaf + ("_unconstrained" if self.transform is not None else "")
        return getattr(self.module, name)


# --------------------------------------------------------------------------------- the blocks


class WhitenedBlock:
    """A group of guide parameters reparameterized jointly: ``psi`` (leaf tensors) and the map
    ``forward(psi) -> {fullname: unconstrained value}`` with its inverse ``reverse``."""

    handles: list

    def names(self):
        return [h.fullname for h in self.handles]


class FullRankBlock(WhitenedBlock):
    def __init__(self, guide, diagonal=False):
        self.handles = [ParamHandle(guide, n) for n in ("loc", "scale", "scale_tril")]
        loc, scale, tril = (h.constrained(h.current()).detach() for h in self.handles)
        self.m0 = loc.clone()
        L = scale[:, None] * tril
        # diagonal=True: only per-coordinate scales (the marginal sds), no rotation
        self.L0 = torch.diag_embed(L.pow(2).sum(-1).sqrt()) if diagonal else L.clone()
        dim = loc.numel()
        self.psi = [
            torch.zeros(dim, dtype=loc.dtype, device=loc.device, requires_grad=True),  # mu
            torch.zeros(dim, dtype=loc.dtype, device=loc.device, requires_grad=True),  # rho
            torch.zeros(dim, dim, dtype=loc.dtype, device=loc.device, requires_grad=True),
        ]
        if diagonal:
            with torch.no_grad():
                R = torch.linalg.solve_triangular(self.L0, L, upper=False)
                self.psi[1].copy_(R.diagonal().log())
                self.psi[2].copy_(R.tril(-1))

    def forward(self, psi):
        mu, rho, off = psi
        loc = self.m0 + self.L0 @ mu
        R = off.tril(-1) + torch.diag_embed(rho.exp())
        L = self.L0 @ R
        scale = L.diagonal()
        tril = L / scale[:, None]
        h_loc, h_scale, h_tril = self.handles
        return {
            h_loc.fullname: loc,
            h_scale.fullname: h_scale.unconstrained(scale),
            h_tril.fullname: h_tril.unconstrained(tril),
        }

    def reverse(self, values):
        h_loc, h_scale, h_tril = self.handles
        loc = values[h_loc.fullname]
        scale = h_scale.constrained(values[h_scale.fullname])
        tril = h_tril.constrained(values[h_tril.fullname])
        L = scale[:, None] * tril
        mu = torch.linalg.solve_triangular(self.L0, (loc - self.m0)[:, None], upper=False)[:, 0]
        R = torch.linalg.solve_triangular(self.L0, L, upper=False)
        return [mu, R.diagonal().log(), R.tril(-1)]


class MeanFieldBlock(WhitenedBlock):
    """``AutoDiagonalNormal`` (one loc/scale pair) or one site of ``AutoNormal``."""

    def __init__(self, loc_handle, scale_handle):
        self.handles = [loc_handle, scale_handle]
        loc = loc_handle.constrained(loc_handle.current()).detach()
        scale = scale_handle.constrained(scale_handle.current()).detach()
        self.m0, self.s0 = loc.clone(), scale.clone()
        self.psi = [
            torch.zeros_like(loc, requires_grad=True),
            torch.zeros_like(loc, requires_grad=True),
        ]

    def forward(self, psi):
        mu, rho = psi
        h_loc, h_scale = self.handles
        return {
            h_loc.fullname: self.m0 + self.s0 * mu,
            h_scale.fullname: h_scale.unconstrained(self.s0 * rho.exp()),
        }

    def reverse(self, values):
        h_loc, h_scale = self.handles
        mu = (values[h_loc.fullname] - self.m0) / self.s0
        rho = (h_scale.constrained(values[h_scale.fullname]) / self.s0).log()
        return [mu, rho]


class LowRankBlock(WhitenedBlock):
    #: step-size multipliers for (mu, rho, F): s and F are not whitened, and full steps on them
    #: add noise (measured on the D=50 regression of ``benchmarks.stress``: KL 53.4 at the
    #: Laplace fit, 78.6 after 300 steps at (1, 1, 1), 56.3 at (1, 0.1, 0.1))
    lr_scales = (1.0, 0.1, 0.1)

    def __init__(self, guide):
        self.handles = [ParamHandle(guide, n) for n in ("loc", "scale", "cov_factor")]
        loc, scale, factor = (h.constrained(h.current()).detach() for h in self.handles)
        eye = torch.eye(loc.numel(), dtype=loc.dtype, device=loc.device)
        cov = scale[:, None] * (factor @ factor.T + eye)
        cov = cov * scale[None, :]
        self.m0, self.s0 = loc.clone(), scale.clone()
        self.L0 = torch.linalg.cholesky(cov)
        self.psi = [
            torch.zeros_like(loc, requires_grad=True),
            torch.zeros_like(loc, requires_grad=True),
            factor.clone().requires_grad_(True),
        ]

    def forward(self, psi):
        mu, rho, factor = psi
        h_loc, h_scale, h_factor = self.handles
        return {
            h_loc.fullname: self.m0 + self.L0 @ mu,
            h_scale.fullname: h_scale.unconstrained(self.s0 * rho.exp()),
            h_factor.fullname: factor,
        }

    def reverse(self, values):
        h_loc, h_scale, h_factor = self.handles
        loc = values[h_loc.fullname]
        mu = torch.linalg.solve_triangular(self.L0, (loc - self.m0)[:, None], upper=False)[:, 0]
        rho = (h_scale.constrained(values[h_scale.fullname]) / self.s0).log()
        return [mu, rho, values[h_factor.fullname]]


def whitened_blocks(guide, diagonal=False):
    """The whitened blocks of ``guide``'s parameters (none for a guide of another family)."""
    if guide.prototype_trace is None:
        raise ValueError(
            f"WhitenedAdam needs the guide's parameters: run the guide once (or laplace_init) "
            f"before building the optimizer for this {type(guide).__name__}"
        )
    with guide._pyro_context:
        if isinstance(guide, AutoMultivariateNormal):
            return [FullRankBlock(guide, diagonal)]
        if isinstance(guide, AutoLowRankMultivariateNormal):
            return [LowRankBlock(guide)]
        if isinstance(guide, AutoDiagonalNormal):
            return [MeanFieldBlock(ParamHandle(guide, "loc"), ParamHandle(guide, "scale"))]
        if isinstance(guide, AutoNormal):
            return [
                MeanFieldBlock(ParamHandle(guide.locs, name), ParamHandle(guide.scales, name))
                for name, _ in guide.prototype_trace.iter_stochastic_nodes()
            ]
    return []
