"""Exactness checks of the conjugate oracles in :mod:`pyro_elbo.conjugate`.

Evidences are checked against numerical quadrature or independent closed forms, posteriors
against Bayes' rule on the oracle's own Pyro model and against importance sampling from the
prior.  Everything runs in float64 with fixed seeds.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import integrate, stats

from pyro_elbo.conjugate import (
    BetaBernoulli,
    ConjugateOracle,
    DirichletCategorical,
    GammaPoisson,
    LinearRegression,
    NormalGamma,
    NormalGammaPosterior,
    NormalNormal,
)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# small float64 oracles (N = 12)


def make_normal_normal():
    data = 0.8 + 0.7 * torch.randn(12, generator=_gen(0), dtype=F64)
    return NormalNormal(data, prior_loc=0.3, prior_scale=1.5, obs_scale=0.7)


def make_normal_normal_vec():
    data = torch.tensor([0.3, 0.8, -0.7], dtype=F64) + torch.randn(
        12, 3, generator=_gen(1), dtype=F64
    )
    return NormalNormal(
        data,
        prior_loc=torch.tensor([0.0, 0.5, -1.0], dtype=F64),
        prior_scale=torch.tensor([1.0, 2.0, 0.5], dtype=F64),
        obs_scale=0.8,
    )


def make_linear_regression():
    X = torch.randn(12, 3, generator=_gen(2), dtype=F64)
    w = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    y = X @ w + 0.6 * torch.randn(12, generator=_gen(3), dtype=F64)
    return LinearRegression(X, y, prior_scale=1.3, noise_scale=0.6)


def make_beta_bernoulli():
    data = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=F64)
    return BetaBernoulli(data, concentration1=2.0, concentration0=3.0)


def make_gamma_poisson():
    data = torch.tensor([3, 1, 4, 1, 5, 0, 2, 6, 5, 3, 5, 2], dtype=F64)
    return GammaPoisson(data, concentration=2.0, rate=0.5)


def make_dirichlet_categorical():
    data = torch.tensor([0, 2, 1, 1, 0, 2, 2, 2, 1, 0, 2, 2])
    return DirichletCategorical(data, concentration=torch.tensor([1.0, 2.0, 0.5], dtype=F64))


def make_normal_gamma():
    data = 1.2 + 0.8 * torch.randn(12, generator=_gen(4), dtype=F64)
    return NormalGamma(data, loc=0.5, kappa=2.0, concentration=3.0, rate=2.0)


ORACLES = {
    "normal_normal": make_normal_normal,
    "normal_normal_vec": make_normal_normal_vec,
    "linear_regression": make_linear_regression,
    "beta_bernoulli": make_beta_bernoulli,
    "gamma_poisson": make_gamma_poisson,
    "dirichlet_categorical": make_dirichlet_categorical,
    "normal_gamma": make_normal_gamma,
}
oracle_names = pytest.mark.parametrize("name", list(ORACLES))


# ----------------------------------------------------------------------------------------------
# helpers


def _observed(oracle):
    return oracle.y if isinstance(oracle, LinearRegression) else oracle.data


def _log_joint(oracle, values, **model_kwargs):
    """log p(x, z) from the oracle's own model with z conditioned (non-vectorized)."""
    conditioned = poutine.condition(oracle.model, data=values)
    return poutine.trace(conditioned).get_trace(**model_kwargs).log_prob_sum()


def _posterior_log_prob(oracle, values):
    posterior = oracle.posterior()
    if oracle.latent is None:
        return posterior.log_prob(values)
    return posterior.log_prob(values[oracle.latent])


def _posterior_moments(oracle):
    """{site: (mean, variance)} of the exact posterior marginals, flattened."""
    posterior = oracle.posterior()
    if oracle.latent is None:
        return {
            n: (posterior.mean[n].reshape(-1), posterior.variance[n].reshape(-1))
            for n in oracle.latents
        }
    return {oracle.latent: (posterior.mean.reshape(-1), posterior.variance.reshape(-1))}


def _posterior_sample(oracle):
    sample = oracle.posterior().sample()
    return sample if oracle.latent is None else {oracle.latent: sample}


def _prior_sample(oracle):
    trace = poutine.trace(oracle.model).get_trace()
    return {n: trace.nodes[n]["value"] for n in oracle.latents}


def _log_quad(log_f, lo, hi, points):
    """log of the integral of exp(log_f) over [lo, hi], shifted by the peak for stability."""
    c = max(log_f(x) for x in np.linspace(lo, hi, 2001)[1:-1])
    value, _ = integrate.quad(
        lambda x: math.exp(log_f(x) - c), lo, hi, points=points, epsabs=0, epsrel=1e-12, limit=500
    )
    return c + math.log(value)


# ----------------------------------------------------------------------------------------------
# evidence: quadrature and independent closed forms


def test_normal_normal_evidence_by_quadrature():
    oracle = make_normal_normal()
    x = oracle.data.numpy()
    m0, s0, s = 0.3, 1.5, 0.7

    def log_joint(z):
        return stats.norm.logpdf(z, m0, s0) + stats.norm.logpdf(x, z, s).sum()

    post = oracle.posterior()
    mean, sd = post.mean.item(), post.stddev.item()
    expected = _log_quad(log_joint, mean - 20 * sd, mean + 20 * sd, points=[mean])
    assert oracle.log_evidence().item() == pytest.approx(expected, abs=1e-8)


def test_beta_bernoulli_evidence_by_quadrature():
    oracle = make_beta_bernoulli()
    x = oracle.data.numpy()
    heads, n = x.sum(), len(x)

    def log_joint(p):
        return stats.beta.logpdf(p, 2.0, 3.0) + heads * math.log(p) + (n - heads) * math.log1p(-p)

    mode = (2.0 + heads - 1) / (2.0 + 3.0 + n - 2)
    expected = _log_quad(log_joint, 0.0, 1.0, points=[mode])
    assert oracle.log_evidence().item() == pytest.approx(expected, abs=1e-8)


def test_gamma_poisson_evidence_by_quadrature():
    oracle = make_gamma_poisson()
    x = oracle.data.numpy()

    def log_joint(r):
        return stats.gamma.logpdf(r, 2.0, scale=1 / 0.5) + stats.poisson.logpmf(x, r).sum()

    post = oracle.posterior()
    mean, sd = post.mean.item(), post.stddev.item()
    expected = _log_quad(log_joint, max(1e-12, mean - 20 * sd), mean + 20 * sd, points=[mean])
    assert oracle.log_evidence().item() == pytest.approx(expected, abs=1e-8)


def test_normal_gamma_evidence_by_2d_quadrature():
    oracle = make_normal_gamma()
    x = oracle.data.numpy()
    m0, kappa, a, b = 0.5, 2.0, 3.0, 2.0
    n, xbar = len(x), x.mean()
    ss = ((x - xbar) ** 2).sum()

    def log_joint(loc, tau):  # log Gamma(tau | a, b) + log N(loc | m0, 1/(kappa tau)) + lik
        return (
            a * math.log(b)
            - math.lgamma(a)
            + (a - 1) * math.log(tau)
            - b * tau
            + 0.5 * math.log(kappa * tau / (2 * math.pi))
            - 0.5 * kappa * tau * (loc - m0) ** 2
            + 0.5 * n * math.log(tau / (2 * math.pi))
            - 0.5 * tau * (ss + n * (xbar - loc) ** 2)
        )

    post = oracle.posterior()
    tau_mean, tau_sd = post.mean["precision"].item(), post.variance["precision"].sqrt().item()
    loc_n, kappa_n = post.loc.item(), post.kappa.item()
    c = log_joint(loc_n, tau_mean)
    value, _ = integrate.dblquad(
        lambda loc, tau: math.exp(log_joint(loc, tau) - c),
        1e-10,
        tau_mean + 25 * tau_sd,
        lambda tau: loc_n - 25 / math.sqrt(kappa_n * tau),
        lambda tau: loc_n + 25 / math.sqrt(kappa_n * tau),
        epsabs=0,
        epsrel=1e-10,
    )
    expected = c + math.log(value)
    assert oracle.log_evidence().item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("vector_prior", [False, True])
def test_linear_regression_evidence_is_gaussian_marginal_of_y(vector_prior):
    X = torch.randn(15, 4, generator=_gen(5), dtype=F64)
    y = torch.randn(15, generator=_gen(6), dtype=F64)
    prior_scale = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64) if vector_prior else 1.7
    oracle = LinearRegression(X, y, prior_scale=prior_scale, noise_scale=0.4)
    s0 = torch.as_tensor(prior_scale, dtype=F64).expand(4)
    cov = 0.4**2 * torch.eye(15, dtype=F64) + X @ torch.diag(s0**2) @ X.T
    expected = torch.distributions.MultivariateNormal(torch.zeros(15, dtype=F64), cov).log_prob(y)
    torch.testing.assert_close(oracle.log_evidence(), expected, rtol=0, atol=1e-10)
    assert isinstance(oracle.posterior(), torch.distributions.MultivariateNormal)


def test_normal_normal_vector_evidence_is_product_of_scalar_evidences():
    oracle = make_normal_normal_vec()
    scalars = [
        NormalNormal(oracle.data[:, d], oracle.prior_loc[d], oracle.prior_scale[d], 0.8)
        for d in range(3)
    ]
    expected = sum(s.log_evidence() for s in scalars)
    torch.testing.assert_close(oracle.log_evidence(), expected, rtol=0, atol=1e-12)
    post = oracle.posterior()
    assert post.event_shape == (3,)
    torch.testing.assert_close(post.mean, torch.stack([s.posterior().mean for s in scalars]))
    torch.testing.assert_close(
        post.variance, torch.stack([s.posterior().variance for s in scalars])
    )


def test_dirichlet_categorical_evidence_by_polya_urn():
    oracle = make_dirichlet_categorical()
    alpha = [1.0, 2.0, 0.5]
    counts = [0, 0, 0]
    expected = 0.0
    for i, k in enumerate(oracle.data.tolist()):  # p(x_i | x_<i) = (alpha_k + n_k) / (A + i)
        expected += math.log((alpha[k] + counts[k]) / (sum(alpha) + i))
        counts[k] += 1
    assert oracle.log_evidence().item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# posterior: Bayes' rule and importance sampling


@oracle_names
def test_posterior_is_bayes_rule(name):
    """log p(z) + log p(x | z) - log p(x) == log p(z | x) for z from the posterior and prior."""
    oracle = ORACLES[name]()
    values = []
    for seed in range(4):
        torch.manual_seed(seed)
        values += [_posterior_sample(oracle), _prior_sample(oracle)]
    log_evidence = oracle.log_evidence()
    for z in values:
        lhs = _log_joint(oracle, z) - log_evidence
        rhs = _posterior_log_prob(oracle, z)
        assert rhs.shape == ()
        assert lhs.item() == pytest.approx(rhs.item(), abs=1e-8)


@oracle_names
def test_posterior_moments_match_importance_sampling(name):
    """Self-normalized importance sampling from the prior, through the model's own trace."""
    oracle = ORACLES[name]()
    num_samples = 300_000
    pyro.set_rng_seed(123)

    def vectorized():
        with pyro.plate("particles", num_samples, dim=-2):
            oracle.model()

    trace = poutine.trace(vectorized).get_trace()
    trace.compute_log_prob()
    log_lik = trace.nodes["obs"]["log_prob"].sum(-1)
    weights = torch.softmax(log_lik, 0)
    assert 1 / weights.pow(2).sum() > 1000  # effective sample size
    for site, (mean, var) in _posterior_moments(oracle).items():
        z = trace.nodes[site]["value"].reshape(num_samples, -1)
        w = weights.unsqueeze(-1)
        mean_hat = (w * z).sum(0)
        mean_se = (w.pow(2) * (z - mean_hat).pow(2)).sum(0).sqrt()
        assert ((mean_hat - mean).abs() < 4 * mean_se).all(), (site, mean_hat, mean, mean_se)
        g = (z - mean).pow(2)
        var_hat = (w * g).sum(0)
        var_se = (w.pow(2) * (g - var_hat).pow(2)).sum(0).sqrt()
        assert ((var_hat - var).abs() < 4 * var_se).all(), (site, var_hat, var, var_se)


def test_normal_gamma_posterior_object():
    oracle = make_normal_gamma()
    assert oracle.latent is None
    assert oracle.latents == ("precision", "loc")
    post = oracle.posterior()
    assert isinstance(post, NormalGammaPosterior)

    torch.manual_seed(0)
    samples = post.sample((5,))
    assert set(samples) == {"precision", "loc"}
    assert samples["precision"].shape == (5,) and samples["loc"].shape == (5,)
    assert post.log_prob(samples).shape == (5,)

    loc_n, kappa_n, a_n, b_n = post.loc, post.kappa, post.concentration, post.rate
    assert isinstance(post.marginal("precision"), torch.distributions.Gamma)
    t = post.marginal("loc")
    assert isinstance(t, torch.distributions.StudentT)
    torch.testing.assert_close(t.df, 2 * a_n)
    torch.testing.assert_close(t.scale, (b_n / (a_n * kappa_n)).sqrt())
    torch.testing.assert_close(post.mean["loc"], loc_n)
    torch.testing.assert_close(post.mean["precision"], a_n / b_n)
    torch.testing.assert_close(post.variance["loc"], b_n / ((a_n - 1) * kappa_n))
    torch.testing.assert_close(post.variance["precision"], a_n / b_n**2)

    # the Student-t is the precision-marginal of the joint: integrate the joint over precision
    for loc in [loc_n.item() - 0.7, loc_n.item(), loc_n.item() + 0.3]:
        value, _ = integrate.quad(
            lambda tau, loc=loc: math.exp(post.log_prob({"precision": tau, "loc": loc}).item()),
            0,
            np.inf,
            epsabs=0,
            epsrel=1e-11,
            limit=200,
        )
        assert t.log_prob(torch.tensor(loc, dtype=F64)).item() == pytest.approx(
            math.log(value), abs=1e-8
        )
    with pytest.raises(ValueError, match="name"):
        post.marginal("obs")


# ----------------------------------------------------------------------------------------------
# model structure: vectorization, subsampling, dtype


@oracle_names
def test_model_vectorizes_under_particle_plate(name):
    oracle = ORACLES[name]()
    num_particles = 7

    def vectorized():
        with pyro.plate("particles", num_particles, dim=-2):
            oracle.model()

    trace = poutine.trace(vectorized).get_trace()
    trace.compute_log_prob()
    single = poutine.trace(oracle.model).get_trace()
    per_particle = torch.zeros(num_particles, dtype=F64)
    for site in (*oracle.latents, oracle.observed):
        if site in oracle.latents:
            event_shape = single.nodes[site]["value"].shape
            assert trace.nodes[site]["value"].shape == (num_particles, 1, *event_shape)
        log_prob = trace.nodes[site]["log_prob"]
        assert log_prob.dim() == 2 and log_prob.shape[0] == num_particles
        per_particle = per_particle + log_prob.sum(-1)
    assert trace.nodes[oracle.observed]["log_prob"].shape == (num_particles, oracle.num_data)

    for k in range(num_particles):
        values = {n: trace.nodes[n]["value"][k, 0] for n in oracle.latents}
        expected = _log_joint(oracle, values)
        assert per_particle[k].item() == pytest.approx(expected.item(), abs=1e-10)


@oracle_names
def test_subsampling_scales_the_likelihood(name):
    oracle = ORACLES[name]()
    trace = poutine.trace(oracle.model).get_trace(subsample_size=10)
    idx = trace.nodes["data"]["value"]
    assert idx.shape == (10,)
    obs = trace.nodes[oracle.observed]
    assert obs["scale"] == pytest.approx(oracle.num_data / 10)
    torch.testing.assert_close(obs["value"], _observed(oracle).index_select(0, idx))
    for site in oracle.latents:
        assert trace.nodes[site]["scale"] == 1.0
    full = poutine.trace(oracle.model).get_trace()
    assert full.nodes[oracle.observed]["scale"] == 1.0


@oracle_names
def test_float64_everywhere(name):
    oracle = ORACLES[name]()
    assert oracle.dtype == F64
    assert oracle.log_evidence().dtype == F64 and oracle.log_evidence().shape == ()
    trace = poutine.trace(oracle.model).get_trace()
    for site in oracle.latents:
        assert trace.nodes[site]["value"].dtype == F64
    for mean, var in _posterior_moments(oracle).values():
        assert mean.dtype == F64 and var.dtype == F64


def test_dtype_follows_data():
    data32 = torch.randn(5, generator=_gen(7))
    oracle = NormalNormal(data32, prior_loc=torch.tensor(0.0, dtype=F64))
    assert oracle.dtype == torch.float32 and oracle.prior_loc.dtype == torch.float32
    assert oracle.posterior().mean.dtype == torch.float32
    oracle = GammaPoisson(torch.tensor([1, 2, 3]), rate=torch.tensor(2.0, dtype=F64))
    assert oracle.data.dtype == F64  # integer data take the hyperparameters' dtype


def test_repr_and_latent():
    assert repr(make_normal_normal()) == "NormalNormal(N=12)"
    assert repr(make_normal_normal_vec()) == "NormalNormal(N=12, D=3)"
    assert repr(make_linear_regression()) == "LinearRegression(N=12, D=3)"
    assert repr(make_dirichlet_categorical()) == "DirichletCategorical(N=12, K=3)"
    assert repr(make_normal_gamma()) == "NormalGamma(N=12)"
    for make in ORACLES.values():
        oracle = make()
        assert isinstance(oracle, ConjugateOracle)
        assert oracle.true_params is None
        if not isinstance(oracle, NormalGamma):
            assert oracle.latents == (oracle.latent,)


# ----------------------------------------------------------------------------------------------
# simulate


SIMULATE = {
    "normal_normal": (lambda n, seed: NormalNormal.simulate(n, seed=seed, dtype=F64), ()),
    "normal_normal_vec": (
        lambda n, seed: NormalNormal.simulate(n, 3, seed=seed, dtype=F64, prior_scale=2.0),
        (3,),
    ),
    "linear_regression": (
        lambda n, seed: LinearRegression.simulate(n, 3, seed=seed, dtype=F64, noise_scale=0.5),
        None,
    ),
    "beta_bernoulli": (
        lambda n, seed: BetaBernoulli.simulate(
            n, seed=seed, dtype=F64, concentration1=2.0, concentration0=2.0
        ),
        (),
    ),
    "gamma_poisson": (
        lambda n, seed: GammaPoisson.simulate(n, seed=seed, dtype=F64, concentration=3.0),
        (),
    ),
    "dirichlet_categorical": (
        lambda n, seed: DirichletCategorical.simulate(n, 4, seed=seed, dtype=F64),
        (),
    ),
    "normal_gamma": (
        lambda n, seed: NormalGamma.simulate(n, seed=seed, dtype=F64, concentration=3.0),
        (),
    ),
}
simulate_names = pytest.mark.parametrize("name", list(SIMULATE))


@simulate_names
def test_simulate_shapes_and_seed(name):
    simulate, data_event_shape = SIMULATE[name]
    a, b, c = simulate(50, 0), simulate(50, 0), simulate(50, 1)
    assert a.num_data == 50
    if data_event_shape is None:  # linear regression
        assert a.X.shape == (50, 3) and a.y.shape == (50,)
    else:
        assert a.data.shape == (50, *data_event_shape)
    if isinstance(a, DirichletCategorical):
        assert a.data.dtype == torch.long and a.data.min() >= 0 and a.data.max() < 4
    torch.testing.assert_close(_observed(a), _observed(b))
    assert not torch.equal(_observed(a), _observed(c))
    assert set(a.true_params) == set(a.latents)
    single = poutine.trace(a.model).get_trace()
    for site in a.latents:
        torch.testing.assert_close(a.true_params[site], b.true_params[site])
        assert a.true_params[site].shape == single.nodes[site]["value"].shape
        assert a.true_params[site].dtype == F64


@simulate_names
def test_simulate_large_n_posterior_concentrates_on_truth(name):
    oracle = SIMULATE[name][0](20_000, 3)
    for site, (mean, var) in _posterior_moments(oracle).items():
        truth = oracle.true_params[site].reshape(-1)
        assert ((mean - truth).abs() < 5 * var.sqrt()).all(), (site, mean, truth, var.sqrt())
        assert (var.sqrt() < 0.1).all()


def test_simulate_given_truth_and_rng_state():
    assert NormalNormal.simulate(5, true_loc=0.5, dtype=F64).true_params["loc"].item() == 0.5
    w = torch.tensor([1.0, 2.0], dtype=F64)
    torch.testing.assert_close(
        LinearRegression.simulate(5, 2, true_weights=w, dtype=F64).true_params["weights"], w
    )
    assert BetaBernoulli.simulate(5, true_probs=0.25, dtype=F64).true_params["probs"].item() == 0.25
    assert GammaPoisson.simulate(5, true_rate=4.0, dtype=F64).true_params["rate"].item() == 4.0
    p = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    torch.testing.assert_close(
        DirichletCategorical.simulate(5, true_probs=p, dtype=F64).true_params["probs"], p
    )
    ng = NormalGamma.simulate(5, true_precision=4.0, dtype=F64)
    assert ng.true_params["precision"].item() == 4.0
    # simulate leaves the global RNG alone
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    NormalGamma.simulate(20, seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# input validation


def _d(*values):
    return torch.tensor(values, dtype=F64)


BAD_INPUTS = [
    ("data", lambda: NormalNormal(torch.zeros(3, 2, 2))),
    ("data", lambda: NormalNormal(torch.zeros(0))),
    ("data", lambda: NormalNormal(_d(1.0, float("nan")))),
    ("data", lambda: NormalNormal(_d(1.0, float("inf")))),
    ("prior_loc", lambda: NormalNormal(_d(1.0, 2.0), prior_loc=torch.zeros(2))),
    ("prior_scale", lambda: NormalNormal(torch.zeros(4, 3), prior_scale=torch.ones(2))),
    ("prior_scale", lambda: NormalNormal(_d(1.0), prior_scale=-1.0)),
    ("obs_scale", lambda: NormalNormal(_d(1.0), obs_scale=0.0)),
    ("y", lambda: LinearRegression(torch.zeros(5, 2), torch.zeros(4))),
    ("X", lambda: LinearRegression(torch.zeros(5), torch.zeros(5))),
    ("y", lambda: LinearRegression(torch.zeros(5, 2), torch.zeros(5, 1))),
    ("X", lambda: LinearRegression(torch.full((5, 2), float("nan")), torch.zeros(5))),
    ("noise_scale", lambda: LinearRegression(torch.zeros(5, 2), torch.zeros(5), noise_scale=0.0)),
    ("prior_scale", lambda: LinearRegression(torch.zeros(5, 2), torch.zeros(5), prior_scale=-2.0)),
    ("data", lambda: BetaBernoulli(_d(0, 1, 2))),
    ("data", lambda: BetaBernoulli(_d(0, 0.5))),
    ("data", lambda: BetaBernoulli(torch.zeros(2, 2))),
    ("concentration1", lambda: BetaBernoulli(_d(0, 1), concentration1=0.0)),
    ("concentration0", lambda: BetaBernoulli(_d(0, 1), concentration0=-1.0)),
    ("concentration1", lambda: BetaBernoulli(_d(0, 1), concentration1=torch.ones(2))),
    ("data", lambda: GammaPoisson(_d(1, -1))),
    ("data", lambda: GammaPoisson(_d(1, 1.5))),
    ("data", lambda: GammaPoisson(_d(1, float("nan")))),
    ("rate", lambda: GammaPoisson(_d(1, 2), rate=0.0)),
    ("concentration", lambda: GammaPoisson(_d(1, 2), concentration=float("inf"))),
    ("data", lambda: DirichletCategorical(torch.tensor([0, 3]), torch.ones(3))),
    ("data", lambda: DirichletCategorical(torch.tensor([0, -1]), torch.ones(3))),
    ("data", lambda: DirichletCategorical(_d(0, 1.5), torch.ones(3))),
    ("concentration", lambda: DirichletCategorical(torch.tensor([0, 1]), _d(1, 0, 1))),
    ("concentration", lambda: DirichletCategorical(torch.tensor([0, 1]), torch.ones(3, 1))),
    ("data", lambda: NormalGamma(torch.zeros(3, 2))),
    ("loc", lambda: NormalGamma(_d(1, 2), loc=float("nan"))),
    ("kappa", lambda: NormalGamma(_d(1, 2), kappa=0.0)),
    ("concentration", lambda: NormalGamma(_d(1, 2), concentration=-1.0)),
    ("rate", lambda: NormalGamma(_d(1, 2), rate=0.0)),
    ("num_data", lambda: NormalNormal.simulate(0)),
    ("true_probs", lambda: BetaBernoulli.simulate(5, true_probs=1.5)),
    ("true_probs", lambda: DirichletCategorical.simulate(5, true_probs=_d(0.5, 0.6, 0.1))),
    ("true_rate", lambda: GammaPoisson.simulate(5, true_rate=-1.0)),
    ("true_loc", lambda: NormalNormal.simulate(5, 2, true_loc=torch.zeros(3))),
    ("prior_scale", lambda: NormalNormal.simulate(5, prior_scale=0.0)),
]


@pytest.mark.parametrize(
    "argument, build", BAD_INPUTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_raises_value_error_naming_the_argument(argument, build):
    with pytest.raises(ValueError, match=rf"\b{re.escape(argument)}\b"):
        build()


def test_to_moves_every_tensor_and_keeps_answers():
    oracle = NormalNormal.simulate(10, 2, seed=0, dtype=torch.float64)
    moved = NormalNormal.simulate(10, 2, seed=0, dtype=torch.float64).to("cpu")
    assert torch.equal(moved.log_evidence(), oracle.log_evidence())
    assert all(
        v.device.type == "cpu" for v in vars(moved).values() if isinstance(v, torch.Tensor)
    )
