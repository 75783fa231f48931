"""The stress suite's cases: each a model, its data (generated here, fixed seeds) and, for the
exact ones, the oracle or the exact moments; :data:`CASES` maps a name to its builder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform

from pyro_elbo.conjugate import LinearRegression


@dataclass
class Case:
    name: str
    model: object
    args: tuple
    notes: str
    oracle: object = None  # a conjugate oracle (exact cases)
    reference_model: object = None  # NUTS runs on this one (default: model)
    derive: object = None  # reference draws -> draws of the model's latents
    reference: dict = field(default_factory=dict)  # site -> {"mean": [...], "sd": [...]}
    reference_info: dict = field(default_factory=dict)
    nuts: tuple = None  # (warm-up, draws) when not NUTS_WARMUP, NUTS_SAMPLES


def raw_design(means, sds, *, num_data=1000, intercept=True, prior_scale=10.0,
               intercept_scale=1000.0, noise_scale=1.0, seed=0, dtype=torch.float64):
    """A :class:`LinearRegression` oracle on an uncentered design: column k is
    ``means[k] + sds[k] * N(0, 1)`` (plus a column of ones when ``intercept``); weights drawn
    as ``N(0, 1) / sd`` so every column matters about equally; the intercept gets the wide prior
    ``intercept_scale``."""
    gen = torch.Generator().manual_seed(seed)
    cols = [m + s * torch.randn(num_data, generator=gen, dtype=dtype) for m, s in zip(means, sds)]
    scales = list(sds)
    prior = [prior_scale] * len(cols)
    if intercept:
        cols = [torch.ones(num_data, dtype=dtype)] + cols
        scales = [1.0] + scales
        prior = [intercept_scale] + prior
    X = torch.stack(cols, -1)
    w = torch.randn(X.shape[1], generator=gen, dtype=dtype) / torch.tensor(scales, dtype=dtype)
    y = X @ w + noise_scale * torch.randn(num_data, generator=gen, dtype=dtype)
    return LinearRegression(X, y, torch.tensor(prior, dtype=dtype), noise_scale)


def linreg_intercept() -> Case:
    oracle = raw_design((300.0, 4000.0, 1000.0, 200.0), (1.0, 1000.0, 1000.0, 100.0))
    return Case(
        "linreg_intercept", oracle.model, (), "intercept + 4 raw columns, D=5", oracle=oracle
    )


def linreg_raw() -> Case:
    oracle = raw_design((100.0, 4000.0, 1500.0), (1.0, 10.0, 1000.0), intercept=False)
    return Case("linreg_raw", oracle.model, (), "3 raw columns, no intercept, D=3", oracle=oracle)


# eight-schools-like data: our own numbers (drawn once from the model with mu=4, tau=5)
SCHOOLS_SIGMA = [11.0, 9.0, 14.0, 8.0, 10.0, 12.0, 13.0, 9.0]


def _schools_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(SCHOOLS_SIGMA)
    theta = 4.0 + 5.0 * torch.randn(8, generator=gen)
    y = theta + sigma * torch.randn(8, generator=gen)
    return y, sigma


def schools_noncentered_model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def schools_centered_model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_noncentered() -> Case:
    return Case(
        "schools_noncentered", schools_noncentered_model, _schools_data(),
        "J=8, mu ~ N(0,10), tau ~ HalfCauchy(5), non-centered",
    )


def schools_centered() -> Case:
    def derive(draws):
        theta = draws["mu"][:, None] + draws["tau"][:, None] * draws["eta"]
        return {"mu": draws["mu"], "tau": draws["tau"], "theta": theta}

    return Case(
        "schools_centered", schools_centered_model, _schools_data(),
        "same data, centered; reference: non-centered NUTS, theta = mu + tau eta",
        reference_model=schools_noncentered_model, derive=derive,
    )


def logistic_model(X, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 20.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([X.shape[-1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        # a global latent under a particle plate has shape (K, 1): (K, 1) + (K, N)
        logits = alpha + (X * beta).sum(-1)
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def logistic() -> Case:
    gen = torch.Generator().manual_seed(1)
    n = 1000
    x1 = 100.0 + 15.0 * torch.randn(n, generator=gen)  # IQ-like
    x2 = 4000.0 + 200.0 * torch.randn(n, generator=gen)  # grams
    x3 = torch.bernoulli(torch.full((n,), 0.4), generator=gen)
    X = torch.stack([x1, x2, x3], -1)
    logits = -8.0 + 0.04 * x1 + 0.001 * x2 + 0.5 * x3  # mean logit about 0
    y = torch.bernoulli(torch.sigmoid(logits), generator=gen)
    return Case("logistic", logistic_model, (X, y), "N=1000, predictors 100 +- 15, 4000 +- 200, 0/1")


def poisson_model(X, log_exposure, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([X.shape[-1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        log_rate = alpha + (X * beta).sum(-1) + log_exposure
        pyro.sample("obs", dist.Poisson(log_rate.exp()), obs=y)


def poisson() -> Case:
    gen = torch.Generator().manual_seed(2)
    n = 500
    x1 = 20.0 + 5.0 * torch.randn(n, generator=gen)  # temperature
    x2 = 1500.0 + 100.0 * torch.randn(n, generator=gen)  # elevation
    exposure = 1.0 + 9.0 * torch.rand(n, generator=gen)
    X = torch.stack([x1, x2], -1)
    rate = exposure * torch.exp(-1.0 + 0.05 * x1 - 5e-4 * x2)
    y = torch.poisson(rate, generator=gen)
    return Case(
        "poisson", poisson_model, (X, exposure.log(), y),
        "N=500, predictors 20 +- 5, 1500 +- 100, exposure offset",
    )


def ar2_model(y):
    c = pyro.sample("c", dist.Normal(0.0, 50.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    with pyro.plate("time", y.shape[0] - 2):
        mean = c + phi[..., 0] * y[1:-1] + phi[..., 1] * y[:-2]
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y[2:])


def ar2() -> Case:
    gen = torch.Generator().manual_seed(3)
    T, c, phi1, phi2, sigma = 300, 20.0, 0.6, 0.2, 2.0
    y = torch.empty(T + 100)
    y[0] = y[1] = 100.0
    noise = torch.randn(T + 100, generator=gen)
    for t in range(2, T + 100):
        y[t] = c + phi1 * y[t - 1] + phi2 * y[t - 2] + sigma * noise[t]
    return Case("ar2", ar2_model, (y[100:],), "T=300, mean 100, phi=(0.6, 0.2)")


def mixture_model(y):
    w = pyro.sample("w", dist.Beta(2.0, 2.0))
    base = dist.Normal(torch.tensor([0.0, 1.0]), torch.tensor([10.0, 1.5])).to_event(1)
    locs = pyro.sample("locs", dist.TransformedDistribution(base, OrderedTransform()))
    scales = pyro.sample("scales", dist.HalfNormal(5.0).expand([2]).to_event(1))
    probs = torch.stack([w, 1 - w], -1)
    with pyro.plate("data", y.shape[0]):
        mix = dist.MixtureSameFamily(dist.Categorical(probs=probs), dist.Normal(locs, scales))
        pyro.sample("obs", mix, obs=y)


def mixture() -> Case:
    gen = torch.Generator().manual_seed(4)
    n = 400
    z = torch.rand(n, generator=gen) < 0.35
    y = torch.where(z, -1.0 + 0.8 * torch.randn(n, generator=gen),
                    2.5 + 1.2 * torch.randn(n, generator=gen))
    return Case("mixture", mixture_model, (y,), "N=400, 0.35 N(-1, 0.8) + 0.65 N(2.5, 1.2)")


# ------------------------------------------------------- posteriors that are not Gaussian

FUNNEL_DIM = 10


def funnel_model():
    """Neal's funnel (Neal 2003) in 10 dimensions: v ~ N(0, 3), x_i | v ~ N(0, exp(v / 2))."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2)[..., None]
    pyro.sample("x", dist.Normal(0.0, scale).expand(v.shape + (FUNNEL_DIM - 1,)).to_event(1))


NORMAL_IQR = 2 * 0.6744897501960817  # the IQR of N(0, 1)


def _normal_mixture_iqr(loc, scale):
    """The IQR of ``E_u[N(loc(u), scale(u))]``, u ~ N(0, 1), by 200-node Gauss-Hermite
    quadrature over u and bisection on the CDF (exact to about 1e-9)."""
    import numpy as np
    from scipy.special import ndtr

    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    weights = weights / weights.sum()

    def quantile(q):
        lo, hi = -1e6, 1e6
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            cdf = float(weights @ ndtr((mid - loc(nodes)) / scale(nodes)))
            lo, hi = (mid, hi) if cdf < q else (lo, mid)
        return 0.5 * (lo + hi)

    return quantile(0.75) - quantile(0.25)


def funnel() -> Case:
    # exact marginals: v ~ N(0, 3); x_i has mean 0 and variance E[exp(v)] = exp(9 / 2); its IQR
    # by quadrature over v (x_i | v ~ N(0, exp(v / 2)))
    import numpy as np

    sd_x = math.exp(9 / 4)
    iqr_x = _normal_mixture_iqr(lambda u: 0 * u, lambda u: np.exp(3 * u / 2))
    reference = {"v": {"mean": [0.0], "sd": [3.0], "iqr": [3.0 * NORMAL_IQR]},
                 "x": {"mean": [0.0] * (FUNNEL_DIM - 1), "sd": [sd_x] * (FUNNEL_DIM - 1),
                       "iqr": [iqr_x] * (FUNNEL_DIM - 1)}}
    return Case("funnel", funnel_model, (), "Neal's funnel, D=10 (exact marginals)",
                reference=reference, reference_info={"method": "exact marginals"})


BANANA_SCALE, BANANA_BEND = 2.0, 0.5


def banana_model():
    """A banana (twisted Gaussian, Haario et al. 1999): x1 ~ N(0, s), x2 | x1 ~ N(b (x1^2 - s^2),
    1); exact moments E x2 = 0, Var x2 = 1 + 2 b^2 s^4."""
    x1 = pyro.sample("x1", dist.Normal(0.0, BANANA_SCALE))
    pyro.sample("x2", dist.Normal(BANANA_BEND * (x1**2 - BANANA_SCALE**2), 1.0))


def banana() -> Case:
    sd2 = math.sqrt(1 + 2 * BANANA_BEND**2 * BANANA_SCALE**4)
    iqr2 = _normal_mixture_iqr(lambda u: BANANA_BEND * BANANA_SCALE**2 * (u**2 - 1),
                               lambda u: 1.0 + 0 * u)
    reference = {"x1": {"mean": [0.0], "sd": [BANANA_SCALE], "iqr": [BANANA_SCALE * NORMAL_IQR]},
                 "x2": {"mean": [0.0], "sd": [sd2], "iqr": [iqr2]}}
    return Case("banana", banana_model, (), f"x1 ~ N(0, {BANANA_SCALE}), x2 | x1 ~ "
                f"N({BANANA_BEND} (x1^2 - {BANANA_SCALE ** 2:g}), 1) (exact moments)",
                reference=reference, reference_info={"method": "exact moments"})


def gp_poisson_model(x, y):
    """Latent-GP Poisson regression: f = L(lengthscale, amplitude) z (non-centered),
    y_i ~ Poisson(exp(alpha + f_i)), squared-exponential kernel."""
    lengthscale = pyro.sample("lengthscale", dist.LogNormal(0.0, 0.5))
    amplitude = pyro.sample("amplitude", dist.HalfNormal(1.0))
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand(alpha.shape + x.shape).to_event(1))
    d2 = (x[:, None] - x[None, :]) ** 2
    cov = amplitude[..., None, None] ** 2 * torch.exp(-0.5 * d2 / lengthscale[..., None, None] ** 2)
    cov = cov + 1e-4 * torch.eye(x.shape[0])
    f = (torch.linalg.cholesky(cov) @ z.unsqueeze(-1)).squeeze(-1)
    pyro.sample("obs", dist.Poisson(torch.exp(alpha[..., None] + f)).to_event(1), obs=y)


def gp_poisson() -> Case:
    gen = torch.Generator().manual_seed(5)
    x = torch.linspace(0.0, 10.0, 30)
    rate = torch.exp(0.5 + torch.sin(x))
    y = torch.poisson(rate, generator=gen)
    return Case("gp_poisson", gp_poisson_model, (x, y),
                "N=30, latent GP (SE kernel, lengthscale and amplitude latent), D=33",
                nuts=(500, 1000))


HIER_GROUPS, HIER_PER_GROUP = 50, 20


def hier_logistic_model(group, x, y):
    """Hierarchical logistic regression, 50 groups (centered): a_j ~ N(mu, sigma),
    y ~ Bernoulli(logit a_group + b x)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", HIER_GROUPS):
        a = pyro.sample("a", dist.Normal(mu, sigma))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=a[..., group] + b * x), obs=y)


def hier_logistic() -> Case:
    gen = torch.Generator().manual_seed(6)
    group = torch.arange(HIER_GROUPS).repeat_interleave(HIER_PER_GROUP)
    x = torch.randn(len(group), generator=gen)
    a = -0.5 + 0.7 * torch.randn(HIER_GROUPS, generator=gen)
    y = torch.bernoulli(torch.sigmoid(a[group] + 1.2 * x), generator=gen)
    return Case("hier_logistic", hier_logistic_model, (group, x, y),
                f"{HIER_GROUPS} groups x {HIER_PER_GROUP}, centered group intercepts, D=53",
                nuts=(500, 1000))


CASES = {
    "linreg_intercept": linreg_intercept,
    "linreg_raw": linreg_raw,
    "schools_centered": schools_centered,
    "schools_noncentered": schools_noncentered,
    "logistic": logistic,
    "poisson": poisson,
    "ar2": ar2,
    "mixture": mixture,
    "funnel": funnel,
    "banana": banana,
    "gp_poisson": gp_poisson,
    "hier_logistic": hier_logistic,
}
