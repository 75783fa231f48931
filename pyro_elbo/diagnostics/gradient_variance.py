"""``gradient_variance``: mean, variance and signal-to-noise ratio of a gradient estimator.

Each of ``num_draws`` draws is one single-step gradient estimate, exactly what ``pyro.infer.SVI``
would hand to its optimizer: ``objective.loss_and_grads(model, guide, *args, **kwargs)``, read off
the ``.grad`` of every parameter it touched (the **unconstrained** tensors, which the optimizer
steps).  Gradients are zeroed between draws and no optimizer is stepped, so the parameter values are
left untouched; any ``.grad`` the parameters held before the call is restored afterwards.

Per parameter and element::

    mean = (1/S) sum_s g_s,    var = 1/(S-1) sum_s (g_s - mean)^2,    snr = |mean| / sqrt(var)

(the SNR of Rainforth et al. 2018, "Tighter variational bounds are not necessarily better"; it is
``inf`` where the variance is exactly zero and the mean is not).  ``total_variance`` is the sum of
``var`` over every element of every parameter (the trace of the covariance).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import pyro.poutine as poutine
import torch

__all__ = ["GradientVariance", "gradient_variance"]


@dataclass
class GradientVariance:
    """Per-parameter gradient statistics (dicts keyed by parameter name, tensors shaped like the
    unconstrained parameter)."""

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    snr: dict[str, torch.Tensor]
    num_draws: int

    @property
    def total_variance(self) -> float:
        """Sum of the per-element variances over all parameters."""
        return float(sum(v.sum() for v in self.var.values())) if self.var else 0.0

    def __repr__(self) -> str:
        names = ", ".join(self.mean)
        return (
            f"GradientVariance(num_draws={self.num_draws}, total_variance="
            f"{self.total_variance:.4g}, params=[{names}])"
        )


def _param_leaves(trace) -> dict[str, torch.Tensor]:
    leaves = {}
    for name, site in trace.nodes.items():
        if site["type"] != "param":
            continue
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        leaf = unconstrained() if unconstrained is not None else value
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            leaves[name] = leaf
    return leaves


def gradient_variance(objective, model, guide, *args, num_draws: int = 100, **kwargs):
    """Draw ``num_draws`` single-step gradient estimates of ``objective`` and summarize them.

    :param objective: anything with ``loss_and_grads(model, guide, *args, **kwargs)`` (every
        pyro_elbo objective and every ``pyro.infer.ELBO``).
    :param model, guide: the Pyro model and guide.
    :param int num_draws: number of independent gradient draws (>= 2).
    :returns: a :class:`GradientVariance` with ``.mean``, ``.var``, ``.snr`` (dicts keyed by
        parameter name) and ``.total_variance``.
    """
    if not hasattr(objective, "loss_and_grads"):
        raise TypeError(
            f"objective must have a loss_and_grads(model, guide, ...) method (a pyro_elbo "
            f"objective or a pyro.infer.ELBO), got {type(objective).__name__}"
        )
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")

    saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def clear(leaves):
        for leaf in leaves.values():
            if id(leaf) not in saved:
                saved[id(leaf)] = (leaf, leaf.grad)
            leaf.grad = None

    # Find the parameters first (creating them if needed) so their .grad can be set aside.
    with poutine.trace(param_only=True) as param_capture, torch.no_grad():
        objective.loss(model, guide, *args, **kwargs)
    clear(_param_leaves(param_capture.trace))

    draws: dict[str, list[torch.Tensor]] = {}
    try:
        for draw in range(int(num_draws)):
            with poutine.trace(param_only=True) as param_capture:
                objective.loss_and_grads(model, guide, *args, **kwargs)
            leaves = _param_leaves(param_capture.trace)
            for name, leaf in leaves.items():
                if id(leaf) not in saved:  # a parameter created (or first seen) just now
                    saved[id(leaf)] = (leaf, None)
                grad = leaf.grad
                grad = torch.zeros_like(leaf) if grad is None else grad.detach().clone()
                if name not in draws:
                    # a parameter first used at this draw had zero gradient in the earlier ones
                    draws[name] = [torch.zeros_like(grad)] * draw
                draws[name].append(grad)
            for name in draws:
                if name not in leaves:
                    draws[name].append(torch.zeros_like(draws[name][0]))
            clear(leaves)
    finally:
        for leaf, grad in saved.values():
            leaf.grad = grad

    mean, var, snr = {}, {}, {}
    for name, values in draws.items():
        stacked = torch.stack(values)
        mean[name] = stacked.mean(0)
        var[name] = stacked.var(0, unbiased=True)
        snr[name] = mean[name].abs() / var[name].sqrt()
    return GradientVariance(mean=mean, var=var, snr=snr, num_draws=int(num_draws))
