"""``FitResult.plot()``: the loss trace on a readable axis.

The losses are drawn relative to the final value (the mean loss over the averaged iterates, or
over the last tenth of the run), so a run that starts at the optimum (after the Laplace stage)
shows its fluctuations on a plain axis instead of float noise around a large offset.  A running
mean, the averaged window, skipped steps and the Laplace stage before step 1 are marked.
"""

from __future__ import annotations

import numpy as np

__all__ = ["final_loss", "plot_fit"]


def final_loss(result) -> float:
    """The reference the plot subtracts: the mean finite loss over the averaged iterates
    (``diagnostics["stationary_from"]`` on) or, without averaging, over the last tenth."""
    losses = np.asarray(result.losses, dtype=np.float64)
    start = result.diagnostics.get("stationary_from")
    if start is None or not 0 <= start < len(losses):
        start = len(losses) - max(1, len(losses) // 10)
    tail = losses[start:]
    tail = tail[np.isfinite(tail)]
    if tail.size == 0:
        finite = losses[np.isfinite(losses)]
        return float(finite[-1]) if finite.size else 0.0
    return float(tail.mean())


def plot_fit(result, ax=None):
    """Draw ``result``'s losses minus :func:`final_loss`; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(7.0, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    reference = final_loss(result)
    losses = np.asarray(result.losses, dtype=np.float64) - reference
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.45, color="C0", label="loss")
    finite = np.isfinite(losses)
    width = max(10, len(losses) // 50)
    if finite.sum() >= 2 * width:
        kernel = np.ones(width)
        valid = np.convolve(finite.astype(float), kernel, mode="valid")
        sums = np.convolve(np.where(finite, losses, 0.0), kernel, mode="valid")
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(steps[width - 1 :], sums / valid, color="C0", lw=1.5,
                    label=f"mean of {width} steps")
    start = result.diagnostics.get("stationary_from")
    if start is not None:
        ax.axvspan(start, len(losses), color="C2", alpha=0.15, label="averaged iterates")
    if result.skipped_steps:
        low = float(np.nanmin(losses[finite])) if finite.any() else 0.0
        ax.plot(list(result.skipped_steps), [low] * len(result.skipped_steps), "x", color="C3",
                label="skipped (non-finite)")
    stage = result.init
    if stage is not None and getattr(stage, "ran", False):
        ax.axvline(1, color="C1", ls="--", lw=1.0,
                   label=f"start: Laplace stage ({stage.seconds:.2g} s)")
    if finite.sum() >= 10:
        tail = losses[finite][finite.sum() // 10 :]
        low, high = float(np.min(losses[finite])), float(np.quantile(tail, 0.995))
        pad = 0.05 * (high - low) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss − final ({reference:.6g})")
    ax.set_title(
        ("converged" if result.converged else "not converged")
        + f" after {result.num_steps} steps",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8)
    return fig
