r"""Well-conditioned stochastic optimization: Adam in the whitened coordinates of the guide's
starting Gaussian.

Adam's step is about ``lr`` in every coordinate, whatever that coordinate's scale.  A guide
location whose posterior sd is 1e-4 then jitters by 100 sds at lr 0.01, one whose sd is 10 needs
thousands of steps to move, and the off-diagonal entries of a Cholesky factor for correlations
of 0.9999 span orders of magnitude.  The fix is to run Adam where every direction has the same
scale (the whitened parameterization; Agrawal, Sheldon & Domke 2020, sec. 3, "Advances in
black-box VI: normalizing flows, importance weighting, and optimization", use a per-parameter
scale for the same reason).

Take the guide's Gaussian when the optimizer is built (after :func:`~pyro_elbo.init.laplace_init`
this is the Laplace approximation ``N(m0, L0 L0^T)``) as the reference, and optimize

* **full rank** (``AutoMultivariateNormal``, q = N(loc, L L^T))::

      loc = m0 + L0 mu,    L = L0 R,    R = tril(R_off, -1) + diag(exp(rho))

  over ``(mu, rho, R_off)``, starting at ``(0, 0, 0)``; then ``scale = diag L`` and
  ``scale_tril = L / diag L`` as Pyro stores them.  In these coordinates the target is
  ``N(0, I)`` when the Laplace approximation is exact, so one unit is one posterior sd along
  every direction, correlated or not;
* **mean field** (``AutoNormal``, ``AutoDiagonalNormal``)::

      loc_i = m0_i + s0_i mu_i,    scale_i = s0_i exp(rho_i)

  (per-element step sizes proportional to the reference sds: parameters whose sds differ by
  1000x converge in the same number of steps);
* **low rank** (``AutoLowRankMultivariateNormal``, ``cov = diag(s) (F F^T + I) diag(s)``):
  ``loc`` as in full rank (with ``L0 = chol`` of the starting covariance), ``s = s0 exp(rho)``,
  ``F`` as is (it is already in units of ``s``), the last two at a tenth of the step (they are
  not whitened: see ``LowRankBlock.lr_scales``).

The gradient reaches ``(mu, rho, R_off)`` by the chain rule through these maps (one
vector-Jacobian product per step), Adam steps there, and the guide's own parameters are written
back, so the user's guide is the one that is fitted and ``posterior_of``, ``SVI`` and the STL
estimator see nothing unusual.  Every other parameter (model parameters, guides of other types)
gets plain Adam with ``other_lr``.

Optional extras, chosen by measurement (``python -m benchmarks.stress --experiments conditioning``):

* ``schedule``: a learning-rate multiplier per step (e.g. :func:`cosine_decay`);
* ``average_from``: Polyak-Ruppert iterate averaging of the whitened coordinates from that step
  on (Polyak & Juditsky 1992); :meth:`WhitenedAdam.finalize` writes the average into the guide.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.optim import PyroOptim

from pyro_elbo.init.whitening import MeanFieldBlock, whitened_blocks

__all__ = ["WhitenedAdam", "cosine_decay", "whitened_optim"]


def cosine_decay(num_steps: int, final: float = 0.1):
    """Learning-rate multiplier ``final + (1 - final) (1 + cos(pi t / T)) / 2``."""

    def schedule(step: int) -> float:
        t = min(step, num_steps) / max(num_steps, 1)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))

    return schedule


# ------------------------------------------------------------------------------ the optimizer


class WhitenedAdam(PyroOptim):
    """A :class:`pyro.optim.PyroOptim` (so it drops into ``SVI``) that runs Adam on the guide's
    parameters in the whitened coordinates of the guide's Gaussian at construction time (see
    the module docstring), and plain Adam (``other_lr``) on every other parameter.

    :param guide: a set-up ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``,
        ``AutoDiagonalNormal`` or ``AutoNormal`` (after ``laplace_init``); any other guide is
        optimized by plain Adam.
    :param float lr: Adam's step in whitened units (posterior sds).
    :param betas: Adam's betas.
    :param schedule: optional ``step -> multiplier`` of ``lr``.
    :param average_from: optional step from which the whitened coordinates are averaged;
        :meth:`finalize` writes the average into the guide.
    :param float other_lr: Adam's lr for parameters outside the whitened blocks.
    :param float eps: Adam's eps, in whitened units (see the module docstring).
    :param bool diagonal: for a full-rank guide, rescale each coordinate by its sd only (no
        rotation): the "per-parameter step sizes" alternative, kept for the measurements.
    """

    def __init__(
        self,
        guide,
        lr: float = 0.05,
        *,
        betas=(0.9, 0.999),
        schedule=None,
        average_from: int | None = None,
        other_lr: float = 0.01,
        diagonal: bool = False,
        eps: float = 0.1,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        super().__init__(torch.optim.Adam, {"lr": other_lr, "betas": betas})
        self.blocks = whitened_blocks(guide, diagonal)
        self._names = {n for b in self.blocks for n in b.names()}
        self._psi = [p for b in self.blocks for p in b.psi]
        groups = [
            {"params": [leaf], "scale": scale}
            for b in self.blocks
            for leaf, scale in zip(b.psi, getattr(b, "lr_scales", [1.0] * len(b.psi)))
        ]
        self._adam = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps) if groups else None
        self.lr, self.schedule, self.average_from = lr, schedule, average_from
        self.num_steps = 0
        self._written: dict = {}
        self._sum = None
        self._count = 0

    @property
    def whitened(self) -> bool:
        """Whether the guide's parameters are optimized in whitened coordinates."""
        return bool(self.blocks)

    def __call__(self, params, *args, **kwargs) -> None:
        store = pyro.get_param_store()
        mine, others = {}, []
        for p in params:
            name = store._param_to_name.get(p)
            (mine.__setitem__(name, p) if name in self._names else others.append(p))
        if mine:
            self._step(mine)
        if others:
            super().__call__(others, *args, **kwargs)

    def _step(self, tensors):
        blocks = [b for b in self.blocks if all(n in tensors for n in b.names())]
        outputs, grads = [], []
        for block in blocks:
            values = {n: tensors[n].detach() for n in block.names()}
            if any(
                n not in self._written or not torch.equal(values[n], self._written[n])
                for n in block.names()
            ):  # changed outside this optimizer: start from where the guide is now
                with torch.no_grad():
                    for leaf, value in zip(block.psi, block.reverse(values)):
                        leaf.copy_(value)
            out = block.forward(block.psi)
            for n in block.names():
                if tensors[n].grad is not None:
                    outputs.append(out[n])
                    grads.append(tensors[n].grad)
        for leaf in self._psi:
            leaf.grad = None
        if outputs:
            torch.autograd.backward(outputs, grads)
        multiplier = self.schedule(self.num_steps) if self.schedule is not None else 1.0
        for group in self._adam.param_groups:
            group["lr"] = self.lr * multiplier * group["scale"]
        self._adam.step()
        self.num_steps += 1
        if self.average_from is not None and self.num_steps > self.average_from:
            snapshot = [leaf.detach().clone() for leaf in self._psi]
            if self._sum is None:
                self._sum = snapshot
            else:
                for s, v in zip(self._sum, snapshot):
                    s.add_(v)
            self._count += 1
        self._write(blocks, tensors)

    def _write(self, blocks, tensors):
        with torch.no_grad():
            for block in blocks:
                for n, value in block.forward(block.psi).items():
                    tensors[n].copy_(value)
                    self._written[n] = tensors[n].detach().clone()

    def finalize(self) -> bool:
        """Write the averaged whitened coordinates into the guide (when averaging ran);
        returns whether it did."""
        if not self._count:
            return False
        with torch.no_grad():
            for leaf, total in zip(self._psi, self._sum):
                leaf.copy_(total / self._count)
        store = pyro.get_param_store()
        tensors = {n: store._params[n] for n in self._names if n in store._params}
        self._write([b for b in self.blocks if all(n in tensors for n in b.names())], tensors)
        return True

    def get_state(self):
        state = super().get_state()
        state["__whitened__"] = {
            "psi": [leaf.detach().clone() for leaf in self._psi],
            "adam": self._adam.state_dict() if self._adam is not None else None,
            "num_steps": self.num_steps,
            "sum": self._sum,
            "count": self._count,
            "written": dict(self._written),
        }
        return state

    def set_state(self, state_dict):
        state_dict = dict(state_dict)
        mine = state_dict.pop("__whitened__", None)
        super().set_state(state_dict)
        if mine is not None:
            with torch.no_grad():
                for leaf, value in zip(self._psi, mine["psi"]):
                    leaf.copy_(value)
            if self._adam is not None and mine["adam"] is not None:
                self._adam.load_state_dict(mine["adam"])
            self.num_steps, self._sum, self._count = mine["num_steps"], mine["sum"], mine["count"]
            # the guide's parameters are restored before the optimizer (fit, SVI users): when
            # they are what this optimizer wrote (or the image of the restored coordinates),
            # keep those (a resume is then bit for bit); otherwise the next step resyncs
            store = pyro.get_param_store()
            self._written = {
                n: v for n, v in mine.get("written", {}).items()
                if n in store._params and torch.equal(store._params[n].detach(), v)
            }
            for block in self.blocks:
                with torch.no_grad():
                    values = block.forward(block.psi)
                for n, value in values.items():
                    if n in store._params and torch.equal(store._params[n].detach(), value):
                        self._written[n] = value.detach().clone()


#: ``fit``'s whitened step at D <= ``REFERENCE_DIM`` latent dimensions, and its Adam eps
DEFAULT_LR, DEFAULT_EPS, REFERENCE_DIM = 0.05, 1.0, 20


def default_lr(dim: int) -> float:
    """``0.05 * min(1, sqrt(20 / D))``: the whitened step ``fit`` takes for D latent dimensions.

    Near the optimum the STL gradient's noise is proportional to the distance from it, with a
    size that grows like sqrt(D / K) in the D^2 Cholesky coordinates, so a step that is stable
    at D = 5 multiplies the error at D = 50: measured from a start 1 sd off along every
    whitened direction and 1.5x too wide (LinearRegression, K = 4), ``lr = 0.05, eps = 0.1``
    reaches KL 2e-14 at D = 5 but diverges at D = 50 (KL 11 after 400 steps), 100 (1e6) and 200
    (4e4); this rule with ``eps = 1`` reaches 4e-16 (D = 5), 1e-12 (D = 20), 5e-8 (D = 50),
    2e-4 (D = 100, 400 steps) and 1e-3 (D = 200, 800 steps).  Mean-field blocks take
    ``default_lr(1)``: their D coordinates do not couple the noise."""
    return DEFAULT_LR * min(1.0, math.sqrt(REFERENCE_DIM / max(int(dim), 1)))


def whitened_optim(guide, lr: float | None = None, **kwargs) -> WhitenedAdam:
    """The optimizer ``fit`` uses after the Laplace stage: ``WhitenedAdam`` with
    ``lr = default_lr(D)`` for the guide's D latent dimensions and ``eps = 1`` (the step near
    the optimum, where Adam acts like SGD with step ``lr / eps``), unless given."""
    if lr is None:
        # the D^2 (full rank) or D x r (low rank) coordinates carry the noise; mean-field
        # blocks (D coordinates, each with its own noise) were stable at 0.05 up to D = 200
        dims = [b.psi[0].numel() for b in whitened_blocks(guide) if not isinstance(b, MeanFieldBlock)]
        lr = default_lr(max(dims, default=1))
    kwargs.setdefault("eps", DEFAULT_EPS)
    return WhitenedAdam(guide, lr, **kwargs)
