"""Reconstructions and samples of a trained VAE, as a PNG (:func:`plot`)."""

from __future__ import annotations

import math

import torch

from pyro_elbo.examples.vae.model import VAE


def plot(vae: VAE, x: torch.Tensor, folder: str, *, filename: str = "vae_digits.png",
         num: int = 10, seed: int = 0, title: str | None = None) -> str:
    """Save a figure: ``num`` test images, their reconstructions, and ``num`` prior samples.

    Returns the path of the PNG written in ``folder`` (created if needed).
    """
    import os

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    num = min(num, x.shape[0])
    side = int(round(math.sqrt(x.shape[1])))
    rows = {
        "test image": x[:num],
        "reconstruction": vae.reconstruct(x[:num]),
        "prior sample": vae.sample(num, torch.Generator().manual_seed(seed)),
    }
    fig, axes = plt.subplots(3, num, figsize=(num * 0.9, 3 * 1.0))
    for r, (label, images) in enumerate(rows.items()):
        for c in range(num):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(side, side).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = os.path.join(folder, filename)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
