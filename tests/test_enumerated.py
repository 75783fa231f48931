"""A model fitted with Pyro's TraceEnum_ELBO (the assignment of a 1-D two-component Gaussian
mixture summed out) through to_inference_data, diagnose/evidence_bounds and loo, against the
exact answers: log p(x), E[mu | x], P(z_i = k | x) and the leave-one-out predictive densities by
2-D quadrature over the two component means, the assignments by enumeration."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.ops.indexing import Vindex

import pyro_elbo

X = torch.tensor([-2.1, -1.7, -2.5, 1.9, 2.2, 1.5, 2.8, -0.2], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.6], dtype=torch.float64)
PRIOR_LOC = torch.tensor([-2.0, 2.0], dtype=torch.float64)


@config_enumerate
def gmm(x):
    locs = pyro.sample("locs", dist.Normal(PRIOR_LOC, 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(WEIGHTS))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z], 1.0), obs=x)


def _log_lik_terms(locs, x):
    """log p(z_i = k, x_i | locs), shape (..., N, 2)."""
    return WEIGHTS.log() + dist.Normal(locs.unsqueeze(-2), 1.0).log_prob(x.unsqueeze(-1))


def _log_joint(locs, x):
    """log p(x, locs) with z summed out, for locs of shape (..., 2)."""
    prior = dist.Normal(PRIOR_LOC, 1.0).log_prob(locs).sum(-1)
    return prior + torch.logsumexp(_log_lik_terms(locs, x), -1).sum(-1)


def exact(x, step=0.04, half_width=6.0):
    """log p(x), E[locs | x] and P(z_i = k | x) by the trapezoid rule on a 2-D grid."""
    grid = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    locs = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    log_joint = _log_joint(locs, x)
    log_evidence = float(torch.logsumexp(log_joint, 0)) + 2 * math.log(step)
    post = torch.softmax(log_joint, 0)
    mean = (post.unsqueeze(-1) * locs).sum(0)
    assign = (post[:, None, None] * torch.softmax(_log_lik_terms(locs, x), -1)).sum(0)
    return log_evidence, mean, assign


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(pyro.poutine.block(gmm, hide=["z"]))
    result = pyro_elbo.fit(gmm, guide, X, loss=TraceEnum_ELBO(max_plate_nesting=1),
                           num_steps=300, progress=False, seed=0)
    return guide, result


def test_to_inference_data_draws_the_assignments_from_their_conditional(fitted):
    guide, _ = fitted
    pyro.set_rng_seed(1)
    S = 4000
    idata = pyro_elbo.to_inference_data(gmm, guide, X, num_samples=S)
    post = idata.posterior
    locs = torch.as_tensor(post["locs"].values.reshape(S, 2))
    z = post["z"].values.reshape(S, len(X))
    assert set(np.unique(z)) <= {0, 1}
    # lp is log p(x, locs) with z summed out, draw by draw; the pointwise log-likelihood is
    # log sum_k w_k N(x_i | locs_k, 1)
    lp = idata.sample_stats["lp"].values.reshape(S)
    np.testing.assert_allclose(lp, _log_joint(locs, X).numpy(), rtol=0, atol=1e-9)
    log_lik = idata.log_likelihood["x"].values.reshape(S, len(X))
    expected = torch.logsumexp(_log_lik_terms(locs, X), -1).numpy()
    np.testing.assert_allclose(log_lik, expected, rtol=0, atol=1e-9)
    # z_s ~ p(z | x, locs_s): its frequencies match the conditional probabilities of the same
    # draws, within 5 binomial SE
    p1 = torch.softmax(_log_lik_terms(locs, X), -1)[..., 1].mean(0).numpy()
    freq = z.mean(0)
    se = np.sqrt(p1 * (1 - p1) / S) + 1e-12
    assert np.all(np.abs(freq - p1) < 5 * se + 1e-9), (freq, p1)
    # the posterior predictive is drawn given (locs_s, z_s)
    pp = idata.posterior_predictive["x"].values.reshape(S, len(X))
    resid = pp - np.take_along_axis(locs.numpy(), z, axis=1)
    assert abs(resid.mean()) < 5 / math.sqrt(resid.size) and abs(resid.std() - 1) < 0.02


def test_resampled_draws_match_the_exact_posterior(fitted):
    guide, _ = fitted
    pyro.set_rng_seed(2)
    S = 4000
    idata = pyro_elbo.to_inference_data(gmm, guide, X, num_samples=S, resample="psis")
    assert idata.posterior.attrs["resampled"] == "psis"
    _, mean, assign = exact(X)
    locs = idata.posterior["locs"].values.reshape(S, 2)
    sd = locs.std(0)
    ess = idata.posterior.attrs["psis_ess"]
    assert np.all(np.abs(locs.mean(0) - mean.numpy()) < 5 * sd / math.sqrt(ess)), (locs.mean(0),
                                                                                    mean)
    z = idata.posterior["z"].values.reshape(S, len(X))
    p1 = assign[:, 1].numpy()
    se = np.sqrt(p1 * (1 - p1) / ess) + 1e-3
    assert np.all(np.abs(z.mean(0) - p1) < 5 * se), (z.mean(0), p1)


def test_diagnose_and_evidence_bounds_sum_the_assignments_out(fitted):
    guide, _ = fitted
    log_evidence, _, _ = exact(X)
    pyro.set_rng_seed(3)
    diagnosis = pyro_elbo.diagnose(gmm, guide, X, num_samples=5000)
    assert diagnosis.verdict == "good", diagnosis
    assert abs(diagnosis.log_evidence - log_evidence) < 4 * diagnosis.log_evidence_se + 1e-3
    assert diagnosis.elbo < log_evidence
    bounds = pyro_elbo.evidence_bounds(gmm, guide, X, num_samples=5000)
    assert bounds.contains(log_evidence, num_se=4.0), (bounds, log_evidence)


def test_loo_matches_exact_leave_one_out(fitted):
    guide, _ = fitted
    pyro.set_rng_seed(4)
    idata = pyro_elbo.to_inference_data(gmm, guide, X, num_samples=4000)
    result = pyro_elbo.loo(idata)
    log_evidence, _, _ = exact(X)
    keep = torch.ones(len(X), dtype=torch.bool)
    exact_i = []
    for i in range(len(X)):
        mask = keep.clone()
        mask[i] = False
        exact_i.append(log_evidence - exact(X[mask])[0])  # log p(x_i | x_-i)
    loo_i = np.asarray(result.loo_i).reshape(-1)
    assert np.all(np.asarray(result.pareto_k) < 0.7)
    np.testing.assert_allclose(loo_i, exact_i, rtol=0, atol=0.02)
    assert abs(result.elpd_loo - sum(exact_i)) < 0.05
