"""A fast subset of the stress suite (benchmarks/stress/) with exact answers.

The badly scaled LinearRegression oracle of the suite: an intercept and raw columns with means
200 to 4000 and sds 1 to 1000, N = 1000; posterior correlation 0.9999 and sds 3e5 apart.
Pyro's defaults end far from the posterior; the pipeline ``fit`` runs by default (recommended
guide, Laplace init, whitened Adam, STL) reaches KL(q || p) < 0.01 with no tuning.
"""

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal
from torch.distributions import kl_divergence

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.fit import fit
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.init.conditioning import WhitenedAdam
from pyro_elbo.init.defaults import recommended_guide, recommended_objective
from pyro_elbo.init.laplace import laplace_init


def raw_design(means, sds, num_data=1000, seed=0):
    """The suite's design (benchmarks.stress.raw_design with an intercept)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    cols = [m + s * torch.randn(num_data, generator=gen, dtype=dtype) for m, s in zip(means, sds)]
    X = torch.stack([torch.ones(num_data, dtype=dtype)] + cols, -1)
    w = torch.randn(X.shape[1], generator=gen, dtype=dtype) / torch.tensor(
        [1.0, *sds], dtype=dtype
    )
    y = X @ w + torch.randn(num_data, generator=gen, dtype=dtype)
    prior = torch.tensor([1000.0] + [10.0] * len(sds), dtype=dtype)
    return LinearRegression(X, y, prior, 1.0)


@pytest.fixture(scope="module")
def oracle():
    return raw_design((300.0, 4000.0, 1000.0, 200.0), (1.0, 1000.0, 1000.0, 100.0))


def test_oracle_is_badly_scaled(oracle):
    post = oracle.posterior()
    sd = post.stddev
    corr = post.covariance_matrix / sd[:, None] / sd[None, :]
    assert (corr - torch.eye(5, dtype=sd.dtype)).abs().max() > 0.999
    assert sd.max() / sd.min() > 1e5


def test_pyro_defaults_fail(oracle):
    """AutoMultivariateNormal(init_scale=0.1), Adam(lr=0.01), 5000 steps of Trace_ELBO's
    estimator (jit-compiled here for speed: the same single-particle reparameterized
    gradients).  The benchmark has the uncompiled run: KL in the millions."""
    guide = AutoMultivariateNormal(oracle.model, init_scale=0.1)
    svi = pyro.infer.SVI(
        oracle.model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.JitTrace_ELBO()
    )
    with pyro.validation_enabled(False):
        for _ in range(5000):
            svi.step()
    kl = float(kl_divergence(posterior_of(guide), oracle.posterior()))
    assert kl > 1


def test_fit_default_pipeline_reaches_exact_posterior(oracle):
    """``fit`` with no guide, objective or optimizer: the recommended guide, the Laplace stage,
    WhitenedAdam and the STL ELBO, stopped by the convergence rule."""
    result = fit(oracle.model, None, seed=0, progress=False, method="svi")
    assert isinstance(result.guide, AutoMultivariateNormal)
    assert result.init.ran and result.init.result.converged
    assert isinstance(result.optim, WhitenedAdam)
    assert result.loss.estimator == "stl"
    assert result.converged
    kl = float(kl_divergence(posterior_of(result.guide), oracle.posterior()))
    assert kl < 0.01


def test_pipeline_by_hand_matches(oracle):
    """The same stages called one by one, as ``benchmarks/stress/settings.py`` does."""
    guide = recommended_guide(oracle.model)
    assert isinstance(guide, AutoMultivariateNormal)
    laplace = laplace_init(oracle.model, guide)
    assert laplace.converged
    svi = pyro.infer.SVI(
        oracle.model, guide, WhitenedAdam(guide), recommended_objective(guide)
    )
    with pyro.validation_enabled(False):
        for _ in range(200):
            svi.step()
    kl = float(kl_divergence(posterior_of(guide), oracle.posterior()))
    assert kl < 0.01


# ------------------------------------------------------------------------- the default rule


def vector_model(dim, subsample_size=None):
    def model():
        w = pyro.sample("w", pyro.distributions.Normal(torch.zeros(dim), 1.0).to_event(1))
        with pyro.plate("data", 10, subsample_size=subsample_size):
            pyro.sample("obs", pyro.distributions.Normal(w.sum(-1, keepdim=True), 1.0),
                        obs=torch.zeros(10))

    return model


def test_recommended_guide_rule():
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

    from pyro_elbo.init.defaults import FULL_RANK_MAX_DIM, LOW_RANK_MAX_DIM

    assert isinstance(recommended_guide(vector_model(FULL_RANK_MAX_DIM)), AutoMultivariateNormal)
    low = recommended_guide(vector_model(FULL_RANK_MAX_DIM + 1))
    assert isinstance(low, AutoLowRankMultivariateNormal)
    assert isinstance(recommended_guide(vector_model(LOW_RANK_MAX_DIM + 1)), AutoNormal)

    def local_model():
        with pyro.plate("data", 100, subsample_size=10):
            z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
            pyro.sample("obs", pyro.distributions.Normal(z, 1.0), obs=torch.zeros(10))

    assert isinstance(recommended_guide(local_model), AutoNormal)

    def discrete_model():
        pyro.sample("k", pyro.distributions.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match="discrete latent sites \\['k'\\]"):
        recommended_guide(discrete_model)


def test_recommended_objective_is_stl_when_reparameterized():
    from pyro.distributions.testing.fakes import NonreparameterizedNormal

    from pyro_elbo.objectives.elbo import ELBO

    model = vector_model(2)
    objective = recommended_objective(AutoMultivariateNormal(model))
    assert isinstance(objective, ELBO) and objective.estimator == "stl"

    def guide():
        pyro.sample("w", NonreparameterizedNormal(torch.zeros(2), 1.0).to_event(1))

    assert recommended_objective(guide).estimator == "reparam"
