"""diagnose / evidence_bounds: PSIS k-hat and the evidence sandwich on conjugate oracles, where
the posterior and log p(x) are exact."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo.conjugate import LinearRegression, NormalNormal
from pyro_elbo.diagnostics.trust import (
    diagnose,
    evidence_bounds,
    khat_threshold,
    psis_khat,
    verdict,
)
from pyro_elbo.engine.validation import ModelGuideMismatchError

S = 10_000


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def regression():
    return LinearRegression.simulate(40, 3, seed=3, dtype=torch.float64)


def posterior_guide(oracle, mean_shift=0.0, scale=1.0):
    """A guide sampling the exact posterior, with its mean shifted by ``mean_shift`` posterior
    sds and its sd multiplied by ``scale`` (1, 0: exact)."""
    posterior = oracle.posterior()
    if isinstance(posterior, dist.MultivariateNormal):
        tril = posterior.scale_tril
        q = dist.MultivariateNormal(
            posterior.loc + mean_shift * tril.diagonal(), scale_tril=scale * tril
        )
    else:
        base = posterior.base_dist if isinstance(posterior, dist.Independent) else posterior
        q = dist.Normal(base.loc + mean_shift * base.scale, scale * base.scale)
        q = q.to_event(1) if isinstance(posterior, dist.Independent) else q

    def guide():
        pyro.sample(oracle.latent, q)

    return guide


@pytest.mark.parametrize(
    "oracle",
    [regression(), NormalNormal.simulate(20, 3, seed=2, dtype=torch.float64)],
    ids=["LinearRegression-D3", "NormalNormal-D3"],
)
def test_exact_posterior_guide(oracle):
    result = diagnose(oracle.model, posterior_guide(oracle), num_samples=S)
    exact = float(oracle.log_evidence())
    assert result.khat < 0.5 and result.verdict == "good"
    assert result.num_samples == S
    # every weight is p(x): all estimates equal log p(x)
    for value in (result.log_evidence, result.elbo, result.cubo):
        assert value == pytest.approx(exact, abs=1e-8)
    assert result.ess == pytest.approx(S, rel=1e-6)
    bounds = evidence_bounds(oracle.model, posterior_guide(oracle), num_samples=S)
    assert bounds.lower == pytest.approx(exact, abs=1e-8)
    assert bounds.upper == pytest.approx(exact, abs=1e-8)


def test_good_guide_khat_is_small_and_is_estimate_is_exact_within_3_se():
    oracle = regression()
    result = diagnose(
        oracle.model, posterior_guide(oracle, mean_shift=0.3, scale=1.2), num_samples=S
    )
    exact = float(oracle.log_evidence())
    assert result.khat < 0.5 and result.verdict == "good"
    assert abs(result.log_evidence - exact) < 3 * result.log_evidence_se
    assert result.elbo < exact < result.cubo
    assert 0 < result.ess < S


def test_narrow_guide_khat_is_large():
    """Exact mean, 0.3 x the exact sd on a 3-D posterior: heavy-tailed weights."""
    oracle = regression()
    result = diagnose(oracle.model, posterior_guide(oracle, scale=0.3), num_samples=S)
    assert result.khat > 0.7 and result.verdict == "bad"
    assert result.log_evidence < float(oracle.log_evidence())  # IS biased low: q misses mass
    assert result.ess < S / 10
    report = repr(result)
    assert "bad" in report and f"{result.khat:.2f} > 0.7" in report
    assert "too narrow" in report and "full-rank" in report


@pytest.mark.parametrize(
    ("mean_shift", "scale"), [(0.3, 1.2), (0.0, 1.5), (0.5, 1.0)], ids=["wide", "wider", "shifted"]
)
def test_evidence_bounds_contain_exact_log_evidence(mean_shift, scale):
    oracle = regression()
    guide = posterior_guide(oracle, mean_shift=mean_shift, scale=scale)
    bounds = evidence_bounds(oracle.model, guide, num_samples=S)
    exact = float(oracle.log_evidence())
    # the IW estimate is below log p(x) in expectation, by ~SE^2/2: allow its noise
    assert bounds.contains(exact, num_se=3)
    assert bounds.lower - 3 * bounds.lower_se <= exact <= bounds.upper
    assert bounds.lower_se > 0 and bounds.upper_se > 0 and bounds.width > 0
    assert bounds.num_samples == S


@pytest.mark.parametrize("k", [0.3, 0.8])
def test_khat_recovers_a_known_pareto_tail(k):
    """w = u^(-k), u ~ U(0, 1), has a Pareto tail of shape k: checks the sign convention."""
    u = np.random.default_rng(0).uniform(size=S)
    assert psis_khat(-k * np.log(u)) == pytest.approx(k, abs=0.1)


def test_verdict_thresholds():
    assert khat_threshold(10_000) == pytest.approx(0.7)
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(100) == pytest.approx(0.5)
    assert [verdict(k, 10_000) for k in (-math.inf, 0.3, 0.6, 0.7, 0.9)] == [
        "good",
        "good",
        "ok",
        "bad",
        "bad",
    ]
    assert verdict(0.6, 1000) == "ok" and verdict(0.68, 1000) == "bad"
    assert verdict(0.55, 100) == "bad"  # above 1 - 1/log10(100) = 0.5
    assert verdict(float("nan"), 10_000) == "bad"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("num_samples", [0, -1, 1.5, 50])
def test_diagnose_bad_num_samples(num_samples):
    oracle = regression()
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(oracle.model, posterior_guide(oracle), num_samples=num_samples)


@pytest.mark.parametrize("num_samples", [0, 1])
def test_evidence_bounds_bad_num_samples(num_samples):
    oracle = regression()
    with pytest.raises(ValueError, match="num_samples"):
        evidence_bounds(oracle.model, posterior_guide(oracle), num_samples=num_samples)


def test_guide_that_does_not_match_the_model():
    oracle = regression()

    def guide():
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match="'w'"):
        diagnose(oracle.model, guide, num_samples=1000)
    with pytest.raises(ModelGuideMismatchError, match="'w'"):
        evidence_bounds(oracle.model, guide, num_samples=1000)
