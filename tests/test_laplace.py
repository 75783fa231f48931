"""Laplace initialization (pyro_elbo.init.laplace) against exact Gaussian posteriors.

For a Gaussian posterior of the unconstrained latents the Laplace approximation is exact, so the
mode, the Hessian and a full-rank guide set from them must match the closed form to rounding.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.init.conditioning import WhitenedAdam
from pyro_elbo.init.laplace import (
    LaplaceUnavailable,
    laplace_init,
    low_rank_factors,
    positive_definite,
)
from pyro_elbo.objectives.elbo import ELBO


def raw_design(dtype=torch.float64, num_data=1000, seed=0):
    """Uncentered, badly scaled design: intercept + columns (mean, sd) = (100, 1), (4000, 1000);
    posterior correlation 0.9992, sd ratio 1e5."""
    gen = torch.Generator().manual_seed(seed)
    x1 = 100.0 + torch.randn(num_data, generator=gen, dtype=torch.float64)
    x2 = 4000.0 + 1000.0 * torch.randn(num_data, generator=gen, dtype=torch.float64)
    X = torch.stack([torch.ones(num_data, dtype=torch.float64), x1, x2], -1)
    y = X @ torch.tensor([1.0, 2.0, -1e-3], dtype=torch.float64)
    y = y + torch.randn(num_data, generator=gen, dtype=torch.float64)
    prior = torch.tensor([1000.0, 10.0, 10.0], dtype=torch.float64)
    return LinearRegression(X.to(dtype), y.to(dtype), prior.to(dtype), 1.0)


def as_mvn(q):
    if isinstance(q, MultivariateNormal):
        return q
    cov = getattr(q, "covariance_matrix", None)
    cov = torch.diag_embed(q.variance) if cov is None else cov
    return MultivariateNormal(q.mean, covariance_matrix=cov)


@pytest.fixture(scope="module")
def oracle():
    return raw_design()


def test_design_is_badly_scaled(oracle):
    post = oracle.posterior()
    sd = post.stddev
    corr = post.covariance_matrix / sd[:, None] / sd[None, :]
    assert corr[0, 1].abs() > 0.999
    assert sd.max() / sd.min() > 1e4


def test_mode_and_hessian_are_exact(oracle):
    post = oracle.posterior()
    result = laplace_init(oracle.model, None)
    assert result.converged and result.positive_definite and result.fallback is None
    assert not result.guide_initialized and "no guide" in result.message
    # the mode, in posterior sds (the coordinates differ by 1e5 in scale)
    assert ((result.loc - post.mean) / post.stddev).abs().max() < 1e-6
    assert torch.equal(result.mode["weights"], result.loc)  # real support: identity transform
    # the Hessian of -log p(x, w) is the posterior precision Lambda
    rel = (result.hessian - post.precision_matrix).norm() / post.precision_matrix.norm()
    assert rel < 1e-8
    assert torch.allclose(result.marginal_sd, post.stddev, rtol=1e-6)
    # at the mode: log p(x, w*) = log p(x) + log p(w* | x)
    expected = float(oracle.log_evidence() + post.log_prob(post.mean))
    assert result.log_joint == pytest.approx(expected, abs=1e-6)


def test_full_rank_guide_exact_without_svi(oracle):
    guide = AutoMultivariateNormal(oracle.model)
    result = laplace_init(oracle.model, guide)
    assert result.guide_initialized and "AutoMultivariateNormal" in result.message
    q = posterior_of(guide)
    assert float(kl_divergence(q, oracle.posterior())) < 1e-6
    # loc is the plain nn.Parameter, scale and scale_tril Pyro's PyroParams (L = scale * tril)
    assert torch.equal(guide.loc.detach(), result.loc)
    with guide._pyro_context:
        assert torch.allclose(guide.scale_tril.diagonal(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_mean_field_gets_mode_and_conditional_sds(oracle, guide_cls):
    post = oracle.posterior()
    guide = guide_cls(oracle.model)
    laplace_init(oracle.model, guide)
    q = posterior_of(guide)
    assert ((q.mean - post.mean) / post.stddev).abs().max() < 1e-6
    # the mean-field optimum of KL(q || N(m, Lambda^-1)): sd_i = 1 / sqrt(Lambda_ii)
    conditional = post.precision_matrix.diagonal().rsqrt()
    assert torch.allclose(q.stddev, conditional, rtol=1e-6)
    # that mean field's KL is the closed form 1/2 (sum_i log Lambda_ii - log |Lambda|)
    kl = float(kl_divergence(as_mvn(q), post))
    prec = post.precision_matrix
    closed = 0.5 * float(prec.diagonal().log().sum() - torch.linalg.slogdet(prec)[1])
    assert kl == pytest.approx(closed, rel=1e-6)


def test_marginal_option_gives_marginal_sds(oracle):
    guide = AutoNormal(oracle.model)
    laplace_init(oracle.model, guide, diagonal="marginal")
    assert torch.allclose(posterior_of(guide).stddev, oracle.posterior().stddev, rtol=1e-6)


def test_low_rank_guide_is_initialized(oracle):
    post = oracle.posterior()
    guide = AutoLowRankMultivariateNormal(oracle.model, rank=1)
    laplace_init(oracle.model, guide)
    q = as_mvn(posterior_of(guide))
    assert ((q.mean - post.mean) / post.stddev).abs().max() < 1e-6
    mean_field = AutoNormal(oracle.model)
    laplace_init(oracle.model, mean_field)
    # one factor holds the intercept / x1 correlation of 0.9992 that mean field cannot
    assert float(kl_divergence(q, post)) < 0.5 * float(
        kl_divergence(as_mvn(posterior_of(mean_field)), post)
    )


def test_low_rank_factors_recover_factor_structure():
    gen = torch.Generator().manual_seed(1)
    dim = 6
    loadings = torch.randn(dim, 2, generator=gen, dtype=torch.float64)
    psi = 0.1 + torch.rand(dim, generator=gen, dtype=torch.float64)
    sd = torch.logspace(-3, 2, dim, dtype=torch.float64)
    cov = sd[:, None] * (loadings @ loadings.T + torch.diag(psi)) * sd[None, :]
    scale, factor = low_rank_factors(cov, rank=2)
    rebuilt = scale[:, None] * (factor @ factor.T + torch.eye(dim, dtype=torch.float64))
    rebuilt = rebuilt * scale[None, :]
    # exact: KL(q || p) = 0 at this structure (checked in correlation units)
    unit = torch.diag(cov.diagonal().rsqrt())
    assert torch.allclose(unit @ rebuilt @ unit, unit @ cov @ unit, atol=1e-6)


# ------------------------------------------------------------------------- several sites


def two_site_model(y):
    # a ~ N(0, 1) (2,), rate ~ LogNormal(0, 1), obs ~ N(A a + log(rate), 0.5): Gaussian in
    # the unconstrained (a, log rate)
    a = pyro.sample("a", dist.Normal(y.new_zeros(2), 1.0).to_event(1))
    rate = pyro.sample("rate", dist.LogNormal(y.new_zeros(()), 1.0))
    design = torch.tensor([[1.0, 0.5], [0.3, -1.0], [2.0, 1.0], [0.0, 1.0]], dtype=y.dtype)
    mean = (design * a[..., None, :]).sum(-1) + rate.log()[..., None]
    with pyro.plate("data", 4):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def two_site_posterior(y):
    """Exact posterior of (a, log rate): prior N(0, I_3), design [A, 1], noise 0.5."""
    design = torch.tensor(
        [[1.0, 0.5, 1.0], [0.3, -1.0, 1.0], [2.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=y.dtype
    )
    precision = torch.eye(3, dtype=y.dtype) + design.T @ design / 0.25
    mean = torch.linalg.solve(precision, design.T @ y / 0.25)
    return mean, precision


@pytest.mark.parametrize("order", ["guide", "none"])
def test_packing_order_matches_guide_sites(order):
    y = torch.tensor([0.3, -1.2, 2.5, 0.7], dtype=torch.float64)
    mean, precision = two_site_posterior(y)
    guide = AutoMultivariateNormal(two_site_model)
    result = laplace_init(two_site_model, guide if order == "guide" else None, y)
    assert [name for name, _ in result.sites] == ["a", "rate"]
    assert torch.allclose(result.loc, mean, atol=1e-8)
    assert torch.allclose(result.hessian, precision, atol=1e-6)
    assert torch.allclose(result.mode["rate"], mean[2].exp(), atol=1e-8)
    if order == "guide":
        joint = posterior_of(guide, y, joint=True)
        exact = MultivariateNormal(mean, precision_matrix=precision)
        assert float(kl_divergence(joint.base, exact)) < 1e-6
        # the per-site marginals land on the right sites
        assert torch.allclose(posterior_of(guide, y, site="a").mean, mean[:2], atol=1e-8)


def test_auto_normal_sites_and_constrained_scale():
    y = torch.tensor([0.3, -1.2, 2.5, 0.7], dtype=torch.float64)
    mean, precision = two_site_posterior(y)
    guide = AutoNormal(two_site_model)
    laplace_init(two_site_model, guide, y)
    with guide._pyro_context:
        loc_a, scale_a = guide._get_loc_and_scale("a")
        loc_r, scale_r = guide._get_loc_and_scale("rate")
    assert torch.allclose(loc_a, mean[:2], atol=1e-8)
    assert torch.allclose(loc_r, mean[2], atol=1e-8)
    conditional = precision.diagonal().rsqrt()
    assert torch.allclose(scale_a, conditional[:2], rtol=1e-6)
    assert torch.allclose(scale_r, conditional[2], rtol=1e-6)


def test_float32_model_gets_float64_stage():
    # the same oracle in float32: the stage casts data to float64 exactly, so the mode is as
    # accurate as the float64 answer for the float32 data
    oracle32 = raw_design(torch.float32)
    exact = LinearRegression(
        oracle32.X.double(), oracle32.y.double(), oracle32.prior_scale.double(), 1.0
    ).posterior()
    guide = AutoMultivariateNormal(oracle32.model)
    result = laplace_init(oracle32.model, guide)
    assert result.loc.dtype == torch.float64 and guide.loc.dtype == torch.float32
    assert ((result.loc - exact.mean) / exact.stddev).abs().max() < 1e-6


# ------------------------------------------------------------------------------ fallbacks


def test_positive_definite_repairs_eigenvalues():
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    rot = rot.double()
    hess = rot @ torch.diag(torch.tensor([-4.0, 1e-20, 9.0], dtype=torch.float64)) @ rot.T
    precision, note = positive_definite(hess)
    lam = torch.linalg.eigvalsh(precision)
    assert torch.allclose(lam, torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), atol=1e-9)
    assert "not positive definite" in note and "1 negative" in note
    ok = rot @ torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) @ rot.T
    same, none = positive_definite(ok)
    assert same is ok and none is None


def bimodal_model():
    # the start (the prior mean 0) is a local maximum of the potential: zero gradient,
    # negative curvature
    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    bumps = torch.stack([dist.Normal(-3.0, 0.5).log_prob(z), dist.Normal(3.0, 0.5).log_prob(z)])
    pyro.factor("bimodal", torch.logsumexp(bumps, 0))


def test_non_pd_hessian_falls_back():
    guide = AutoNormal(bimodal_model)
    result = laplace_init(bimodal_model, guide, path_candidates=0)
    assert not result.positive_definite and not result.converged
    assert "not positive definite" in result.fallback
    assert float(result.hessian[0, 0]) < 0
    # the repaired curvature max(|lambda|, 1) gives a finite, positive scale
    with guide._pyro_context:
        scale = guide._get_loc_and_scale("z")[1]
    assert float(scale.detach()) == pytest.approx(1 / math.sqrt(abs(float(result.hessian[0, 0]))), rel=1e-6)


def test_unsupported_guide_left_untouched(oracle):
    guide = AutoIAFNormal(oracle.model)
    guide()
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    result = laplace_init(oracle.model, guide)
    assert not result.guide_initialized and "left as it is" in result.message
    for k, v in guide.named_parameters():
        assert torch.equal(v.detach(), before[k])
    assert ((result.loc - oracle.posterior().mean) / oracle.posterior().stddev).abs().max() < 1e-6


def test_subsampling_model_is_unavailable(oracle):
    with pytest.raises(LaplaceUnavailable, match="subsample"):
        laplace_init(oracle.model, None, subsample_size=10)


# ------------------------------------------------------------------- the stochastic stage


def test_whitened_stage_reaches_exact_answer_on_badly_scaled_design(oracle):
    """After the Laplace stage, knock the guide 3 sds off along every whitened direction and
    double its width; whitened Adam + STL, with no tuning, gets back to KL < 0.01, where Adam
    at Pyro's lr 0.01 on the raw parameters does not move the KL below 1."""
    post = oracle.posterior()
    kls = {}
    for name in ("whitened", "adam"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(oracle.model)
        result = laplace_init(oracle.model, guide)
        with guide._pyro_context:
            guide.loc.data = result.loc + result.scale_tril @ torch.full_like(result.loc, 3.0)
            guide.scale = 2 * guide.scale.detach()
        start = float(kl_divergence(posterior_of(guide), post))
        optim = WhitenedAdam(guide) if name == "whitened" else pyro.optim.Adam({"lr": 0.01})
        svi = pyro.infer.SVI(oracle.model, guide, optim, ELBO(4, estimator="stl"))
        with pyro.validation_enabled(False):
            for _ in range(300):
                svi.step()
        kls[name] = float(kl_divergence(posterior_of(guide), post))
    assert start > 10
    assert kls["whitened"] < 0.01
    assert kls["adam"] > 1
