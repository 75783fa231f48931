"""The importance-sampled test log-likelihood of a trained VAE
(:func:`evaluate_log_likelihood`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch

from pyro_elbo.engine.particles import run_particles
from pyro_elbo.engine.weights import importance_weights
from pyro_elbo.examples.vae.model import VAE


@dataclass
class LogLikelihood:
    """Importance-sampled test log-likelihood (nats per image)."""

    per_image: torch.Tensor  # (N,) estimates of log p(x_i)
    per_image_mc_se: torch.Tensor  # (N,) delta-method Monte Carlo SEs
    num_samples: int

    @property
    def mean(self) -> float:
        return float(self.per_image.mean())

    @property
    def se(self) -> float:
        """SE of the test-set mean over images (the test set as a sample of digits)."""
        return float(self.per_image.std() / math.sqrt(self.per_image.shape[0]))

    @property
    def mc_se(self) -> float:
        """Monte Carlo SE of the test-set mean for this fixed test set."""
        return float(self.per_image_mc_se.pow(2).sum().sqrt() / self.per_image.shape[0])

    def difference(self, other: LogLikelihood) -> tuple[float, float]:
        """``(mean(self - other), paired SE)`` over the same test images."""
        d = self.per_image - other.per_image
        return float(d.mean()), float(d.std() / math.sqrt(d.shape[0]))

    def __repr__(self):
        return (
            f"LogLikelihood({self.mean:.3f} ± {self.se:.3f} (images) ± {self.mc_se:.4f} (MC), "
            f"S={self.num_samples})"
        )


@torch.no_grad()
def evaluate_log_likelihood(
    vae: VAE, x: torch.Tensor, num_samples: int = 5000, chunk: int = 250, seed: int = 0
) -> LogLikelihood:
    """``log p(x_i)`` per image by importance sampling from the encoder, S = ``num_samples``.

    The log weights come from the particle engine in chunks of ``chunk`` particles (per image,
    from :func:`~pyro_elbo.engine.weights.importance_weights`) and are combined by one
    log-mean-exp per image.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    log_w = []
    try:
        # a param store scope of its own: evaluating never clashes with the caller's params
        with pyro.get_param_store().scope():
            for begin in range(0, num_samples, chunk):
                k = min(chunk, num_samples - begin)
                particles = run_particles(
                    vae.model, vae.guide, (x,), {}, num_particles=k, plate_nesting=1
                )
                log_w.append(importance_weights(particles, "evaluate_log_likelihood").log_w)
    finally:
        torch.set_rng_state(state)
    log_w = torch.cat(log_w, 0)  # (S, N)
    estimate = torch.logsumexp(log_w, 0) - math.log(num_samples)
    ratio = torch.exp(log_w - estimate)  # w / mean(w), mean 1 per image
    mc_se = ratio.std(0) / math.sqrt(num_samples)
    return LogLikelihood(estimate, mc_se, num_samples)
