"""Benchmark problems: each builds a model, a guide, its arguments and a hand-written torch step.

(a) Bayesian logistic regression, N=1000, D=10, AutoNormal.
(b) A hierarchical (random intercept) model with 100 groups, AutoNormal.
(c) A VAE minibatch step, digits-sized (64 pixels, 64 images per batch), encoder guide.
(d) LinearRegression D=50 (N=500), AutoMultivariateNormal.

The hand-written steps compute the same Monte Carlo ELBO gradient with plain torch (sample,
log p, log q, backward, one torch Adam over all parameters): the physical floor for the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch import nn


@dataclass
class Problem:
    name: str
    model: object
    make_guide: object
    args: tuple
    make_raw_step: object
    notes: str = ""
    kwargs: dict = field(default_factory=dict)
    #: ``(num_particles, lr) -> step`` of the same problem in NumPyro (benchmarks.numpyro_models)
    make_numpyro_step: object = None


def logistic_regression(num_data=1000, dim=10, seed=0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(num_data, dim, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(dim, generator=gen)), generator=gen)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1) + b), obs=y)

    def make_raw_step(lr=0.01):
        loc = torch.zeros(dim + 1, requires_grad=True)
        log_scale = torch.full((dim + 1,), math.log(0.1), requires_grad=True)
        optim = torch.optim.Adam([loc, log_scale], lr=lr)

        def step(X, y):
            optim.zero_grad()
            eps = torch.randn(dim + 1)
            z = loc + log_scale.exp() * eps
            logits = X @ z[:dim] + z[dim]
            log_p = -F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            log_p = log_p - 0.5 * (z**2).sum()
            log_q = -0.5 * (eps**2).sum() - log_scale.sum()
            loss = log_q - log_p
            loss.backward()
            optim.step()
            return loss.item()

        return step

    def make_numpyro_step(num_particles, lr=0.01):
        from benchmarks import numpyro_models

        return numpyro_models.logistic(X, y, num_particles, lr)

    return Problem(
        "(a) logistic regression N=1000 D=10", model, AutoNormal, (X, y), make_raw_step,
        make_numpyro_step=make_numpyro_step,
    )


def hierarchical(num_groups=100, per_group=10, seed=0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    group = torch.arange(num_groups).repeat_interleave(per_group)
    y = torch.randn(num_groups, generator=gen)[group] + 0.5 * torch.randn(
        len(group), generator=gen
    )

    def model(group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("groups", num_groups):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(theta[..., group], 0.5), obs=y)

    def make_raw_step(lr=0.01):
        size = num_groups + 2
        loc = torch.zeros(size, requires_grad=True)
        log_scale = torch.full((size,), math.log(0.1), requires_grad=True)
        optim = torch.optim.Adam([loc, log_scale], lr=lr)

        def step(group, y):
            optim.zero_grad()
            eps = torch.randn(size)
            u = loc + log_scale.exp() * eps
            mu, log_tau, theta = u[0], u[1], u[2:]
            tau = log_tau.exp()
            log_p = (
                dist.Normal(0.0, 5.0).log_prob(mu)
                + dist.HalfNormal(2.0).log_prob(tau)
                + log_tau
                + dist.Normal(mu, tau).log_prob(theta).sum()
                + dist.Normal(theta[group], 0.5).log_prob(y).sum()
            )
            log_q = -0.5 * (eps**2).sum() - log_scale.sum()
            loss = log_q - log_p
            loss.backward()
            optim.step()
            return loss.item()

        return step

    def make_numpyro_step(num_particles, lr=0.01):
        from benchmarks import numpyro_models

        return numpyro_models.hierarchical(group, y, num_groups, num_particles, lr)

    return Problem(
        "(b) hierarchical, 100 groups", model, AutoNormal, (group, y), make_raw_step,
        make_numpyro_step=make_numpyro_step,
    )


class Encoder(nn.Module):
    def __init__(self, pixels=64, hidden=128, latent=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus())
        self.loc = nn.Linear(hidden, latent)
        self.scale = nn.Linear(hidden, latent)

    def forward(self, x):
        h = self.net(x)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    def __init__(self, pixels=64, hidden=128, latent=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.Softplus(), nn.Linear(hidden, pixels))

    def forward(self, z):
        return self.net(z)


def vae(batch=64, pixels=64, latent=8, seed=0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch, pixels), 0.3), generator=gen)
    encoder, decoder = Encoder(pixels, latent=latent), Decoder(pixels, latent=latent)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([latent]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    class Guide(nn.Module):
        """The encoder guide owns its network, so STL/DReG can hold its weights constant."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            pyro.module("encoder", self.encoder)
            loc, scale = self.encoder(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def make_guide(model):
        return Guide()

    def make_raw_step(lr=1e-3):
        enc, dec = Encoder(pixels, latent=latent), Decoder(pixels, latent=latent)
        optim = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)

        def step(x):
            optim.zero_grad()
            loc, scale = enc(x)
            eps = torch.randn_like(loc)
            z = loc + scale * eps
            log_px = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="sum")
            log_pz = -0.5 * (z**2).sum()
            log_q = -0.5 * (eps**2).sum() - scale.log().sum()
            loss = log_q - log_px - log_pz
            loss.backward()
            optim.step()
            return loss.item()

        return step

    return Problem("(c) VAE minibatch (64x64)", model, make_guide, (x,), make_raw_step)


def linear_regression(num_data=500, dim=50, seed=0) -> Problem:
    from pyro_elbo.conjugate import LinearRegression

    oracle = LinearRegression.simulate(num_data, dim, seed=seed, dtype=torch.float32)

    def model():
        return oracle.model()

    def make_raw_step(lr=0.01):
        X, y = oracle.X, oracle.y
        loc = torch.zeros(dim, requires_grad=True)
        raw_tril = torch.zeros(dim, dim, requires_grad=True)
        log_diag = torch.full((dim,), math.log(0.1), requires_grad=True)
        optim = torch.optim.Adam([loc, raw_tril, log_diag], lr=lr)

        def step():
            optim.zero_grad()
            tril = raw_tril.tril(-1) + torch.diag(log_diag.exp())
            eps = torch.randn(dim)
            w = loc + tril @ eps
            log_p = -0.5 * (w**2).sum() - 0.5 * ((y - X @ w) ** 2).sum()
            log_q = -0.5 * (eps**2).sum() - log_diag.sum()
            loss = log_q - log_p
            loss.backward()
            optim.step()
            return loss.item()

        return step

    def make_numpyro_step(num_particles, lr=0.01):
        from benchmarks import numpyro_models

        return numpyro_models.linear_regression(
            oracle.X, oracle.y, float(oracle.prior_scale.reshape(-1)[0]),
            float(oracle.noise_scale), num_particles, lr,
        )

    return Problem(
        "(d) LinearRegression D=50", model, AutoMultivariateNormal, (), make_raw_step,
        make_numpyro_step=make_numpyro_step,
    )


PROBLEMS = {
    "logistic": logistic_regression,
    "hierarchical": hierarchical,
    "vae": vae,
    "linreg": linear_regression,
}
