"""The VAE: decoder ``p(x | z)`` and amortized Gaussian encoder, and the closed-form KL."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_elbo.guides.amortized import AmortizedNormal


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag scale^2) || N(0, I))`` summed over the last dim (MATH.md (2)):
    ``1/2 sum_d (mu_d^2 + sigma_d^2 - 2 log sigma_d - 1)``."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)


def _mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Bernoulli decoder and Gaussian encoder, each an MLP with two tanh hidden layers.

    ``model(x, num_data=None)``: ``x`` is a (mini)batch of binary images; ``num_data`` the size of
    the whole training set (the plate scales the minibatch by ``num_data / len(x)``).
    ``guide``: an :class:`~pyro_elbo.guides.AmortizedNormal` over site ``"z"``.
    """

    def __init__(self, data_dim: int = 64, latent_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.decoder = _mlp([latent_dim, hidden, hidden, data_dim])
        encoder = _mlp([data_dim, hidden, hidden, 2 * latent_dim])
        self.guide = AmortizedNormal(
            encoder, site="z", plate="data", data=0, size="num_data", name="vae_encoder"
        )

    @property
    def encoder(self) -> nn.Module:
        return self.guide.encoder

    def model(self, x, num_data=None):
        pyro.module("vae_decoder", self.decoder)
        num_data = x.shape[0] if num_data is None else num_data
        prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @torch.no_grad()
    def reconstruct(self, x):
        """Pixel probabilities decoded from the encoder's mean."""
        loc, _ = self.guide.encode(x)
        return torch.sigmoid(self.decoder(loc))

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None):
        """Pixel probabilities of ``num`` images decoded from prior draws."""
        z = torch.randn(num, self.latent_dim, generator=generator)
        return torch.sigmoid(self.decoder(z))
