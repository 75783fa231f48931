"""The flow guide (AutoRealNVP), the escalating default of ``fit(model, None)``, PSIS-resampled
draws, and the funnel advice / non-centering, against exact answers."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_elbo.diagnostics.arviz import to_dict
from pyro_elbo.diagnostics.trust import diagnose
from pyro_elbo.fit import fit
from pyro_elbo.guides.flow import (
    AutoRealNVP,
    RealNVPTransform,
    bit_masks,
    flow_objective,
    flow_optimizer,
)
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO


def _perturbed(guide, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = guide.coupling_weights
        w.add_(scale * torch.randn(w.shape, generator=gen, dtype=w.dtype))


# ------------------------------------------------------------------ the guide


def test_the_flow_starts_exactly_at_its_gaussian_base():
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    tril = torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [-0.3, 0.2, 0.7]], dtype=torch.float64)

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    pyro.clear_param_store()
    guide = AutoRealNVP(model, base=(loc, tril))
    guide()
    points = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = guide.get_posterior()
    exact = dist.MultivariateNormal(loc, scale_tril=tril)
    assert torch.allclose(q.log_prob(points), exact.log_prob(points), atol=1e-12)


def test_every_ordered_pair_of_coordinates_has_a_layer_where_one_sets_the_other():
    for dim in (2, 3, 10, 37):
        masks = bit_masks(dim, max(4, 2 * math.ceil(math.log2(dim))))
        pairs = {(i, j) for m in masks for i in m for j in range(dim) if j not in m}
        assert len(pairs) == dim * (dim - 1)


def test_stl_gradient_is_exactly_zero_when_the_flow_is_the_posterior():
    """The model's distribution is a trained-looking flow (random coupling weights) and the guide
    holds the same weights, so q = p: the STL gradient is zero for every draw (the integrand
    log p - log q is constant).  It is not if log q with detached parameters took the sampling
    pass's cached noise instead of inverting the flow (then STL = the reparam gradient, nonzero,
    as checked)."""
    dim = 4

    def make_guide(model):
        guide = AutoRealNVP(model, base=(torch.zeros(dim, dtype=torch.float64),
                                         torch.eye(dim, dtype=torch.float64)))
        return guide

    def proto_model():
        pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
                    .expand([dim]).to_event(1))

    pyro.clear_param_store()
    target = make_guide(proto_model)
    target()
    _perturbed(target, 0.1, seed=1)
    with torch.no_grad():
        target.shift.add_(torch.tensor([0.5, -1.0, 0.2, 0.0], dtype=torch.float64))
    frozen = [t.detach().clone() for t in (target.coupling_weights, target.shift)]

    def model():
        with torch.no_grad():
            flow = target.get_transform()
        base = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).expand([dim])
        pyro.sample("z", dist.TransformedDistribution(base.to_event(1), flow))

    grads = {}
    for estimator in ("stl", "reparam"):
        pyro.clear_param_store()
        guide = make_guide(model)
        guide()
        with torch.no_grad():
            guide.coupling_weights.copy_(frozen[0])
            guide.shift.copy_(frozen[1])
        ELBO(64, estimator=estimator).loss_and_grads(model, guide)
        grads[estimator] = max(float(p.grad.abs().max()) for p in guide.parameters())
    assert grads["stl"] < 1e-10
    assert grads["reparam"] > 1e-2


def test_the_inverse_is_exact():
    pyro.clear_param_store()

    def model():
        zero = torch.tensor(0.0, dtype=torch.float64)
        pyro.sample("z", dist.Normal(zero, 1.0).expand([5]).to_event(1))

    guide = AutoRealNVP(model)
    guide()
    _perturbed(guide, 0.2, seed=2)
    transform = guide.get_transform()
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = transform(x)
    fresh = guide.get_transform()  # a fresh transform: no cache
    assert torch.allclose(fresh.inv(y), x, atol=1e-9)
    assert torch.allclose(fresh.log_abs_det_jacobian(fresh.inv(y), y),
                          transform.log_abs_det_jacobian(x, y), atol=1e-9)
    # and against autograd's Jacobian
    jac = torch.autograd.functional.jacobian(lambda v: guide.get_transform()(v), x[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1],
                          transform.log_abs_det_jacobian(x, y)[0], atol=1e-9)
    assert isinstance(transform, RealNVPTransform)


def test_posterior_of_gives_the_joint_and_refuses_marginals_with_a_reason():
    pyro.clear_param_store()
    guide = AutoRealNVP(funnel)
    guide()
    draws = posterior_of(guide, joint=True).sample((10,))
    assert draws["v"].shape == (10,) and draws["x"].shape == (10, FUNNEL_DIM - 1)
    with pytest.raises(TypeError, match="joint=True"):
        posterior_of(guide)


def test_one_latent_dimension_is_refused_with_a_reason():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="at least 2"):
        AutoRealNVP(model)()


# ------------------------------------------------------------------ Neal's funnel (exact)

FUNNEL_DIM = 2


def funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2)[..., None]
    pyro.sample("x", dist.Normal(0.0, scale).expand(v.shape + (FUNNEL_DIM - 1,)).to_event(1))


def _within_5_se(draws, mean, sd):
    """|mean - exact| and |sd - exact| within 5 Monte Carlo SEs of N i.i.d. Normal draws."""
    n = len(draws)
    mean_ok = abs(float(draws.mean()) - mean) < 5 * sd / math.sqrt(n)
    sd_ok = abs(float(draws.std()) - sd) < 5 * sd / math.sqrt(2 * n)
    return mean_ok and sd_ok


def test_flow_fit_gets_the_funnels_log_scale_marginal_and_the_gaussian_does_not():
    """Neal's funnel: v ~ N(0, 3), x | v ~ N(0, exp(v/2)); v's marginal is exactly N(0, 3).
    2000 draws: 5 SE are 0.34 on the mean and 0.24 on the sd."""
    num_draws = 2000
    pyro.clear_param_store()
    gaussian = fit(funnel, AutoMultivariateNormal(funnel), max_steps=1500, progress=False,
                   seed=0)
    pyro.clear_param_store()
    flow = fit(funnel, AutoRealNVP(funnel), loss=flow_objective(), optim=flow_optimizer(),
               num_steps=1500,
               progress=False, seed=0, init=None, skip_nonfinite=100)
    draws = {}
    for name, result in (("gaussian", gaussian), ("flow", flow)):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            draws[name] = posterior_of(result.guide, joint=True).sample((num_draws,))["v"]
    assert _within_5_se(draws["flow"], 0.0, 3.0), (draws["flow"].mean(), draws["flow"].std())
    assert not _within_5_se(draws["gaussian"], 0.0, 3.0)


# ------------------------------------------------------------------ the escalation


def test_escalation_stops_at_the_gaussian_on_a_gaussian_posterior():
    y = torch.tensor([2.1, 3.4, 2.7, 3.9, 2.2, 3.1])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", y.shape[-1]):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    pyro.clear_param_store()
    result = fit(model, None, y, max_steps=300, progress=False, seed=0)
    assert [s.name for s in result.stages] == ["gaussian"]
    assert isinstance(result.guide, AutoMultivariateNormal)
    assert result.stages[0].khat < 0.7 and "holds the posterior" in result.stages[0].reason
    assert result.resample == "psis"
    assert not any("AutoRealNVP" in name for name in pyro.get_param_store().keys())


def test_a_users_guide_is_never_replaced():
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(funnel)
    result = fit(funnel, guide, max_steps=200, progress=False, seed=0)
    assert result.guide is guide and result.stages == []


def funnel10():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2)[..., None]
    pyro.sample("x", dist.Normal(0.0, scale).expand(v.shape + (9,)).to_event(1))


def test_escalation_continues_with_the_flow_on_a_funnel():
    from pyro_elbo.fit.escalate import escalating_fit

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = escalating_fit(fit, funnel10, (), {}, {"max_steps": 500, "progress": False,
                                                    "flow_steps": 300})
    names = [s.name for s in result.stages]
    assert names == ["gaussian", "flow"]
    assert result.stages[0].khat >= 0.7 and "continuing with a flow" in result.stages[0].reason
    assert "a funnel at ['x']" in result.stages[0].reason  # and the cure is named
    assert all(s.seconds > 0 for s in result.stages)
    assert result.stages[1].num_steps == 300


# ------------------------------------------------------------------ PSIS-resampled draws


def test_psis_resampled_draws_of_a_slightly_off_guide_have_the_exact_moments():
    """Normal-normal model (exact posterior N(m, s)); the guide is N(m + 0.3 s, 1.2 s).  Raw
    draws are 0.3 sd off (about 19 SE with 4000 draws); the PSIS-resampled ones are within
    5 Monte Carlo SE of m and s (SE from the PSIS effective sample size)."""
    y = torch.tensor([0.3, -0.4, 1.2, 0.8], dtype=torch.float64)
    prior_sd, noise = 2.0, 1.0
    precision = 1 / prior_sd**2 + len(y) / noise**2
    m, s = float(y.sum() / noise**2 / precision), 1 / math.sqrt(precision)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), prior_sd))
        with pyro.plate("data", y.shape[-1]):
            pyro.sample("obs", dist.Normal(mu, noise), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(torch.tensor(m + 0.3 * s, dtype=torch.float64), 1.2 * s))

    num = 4000
    pyro.set_rng_seed(0)
    raw = to_dict(model, guide, y, num_samples=num, log_likelihood=False,
                  posterior_predictive=False)
    pyro.set_rng_seed(0)
    resampled = to_dict(model, guide, y, num_samples=num, log_likelihood=False,
                        posterior_predictive=False, resample="psis")
    attrs = resampled.attrs["posterior"]
    assert attrs["resampled"] == "psis"
    ess = attrs["psis_ess"]
    draws = np.asarray(resampled.groups["posterior"]["mu"]).ravel()
    raw_draws = np.asarray(raw.groups["posterior"]["mu"]).ravel()
    assert abs(raw_draws.mean() - m) > 5 * s / math.sqrt(num)  # the raw draws are off
    # resampling with replacement adds its own noise: SE from the ESS of the weights and the
    # resample size together
    se = s * math.sqrt(1 / ess + 1 / num)
    assert abs(draws.mean() - m) < 5 * se
    assert abs(draws.std() - s) < 5 * s * math.sqrt(1 / (2 * ess) + 1 / (2 * num))


# ------------------------------------------------------------------ funnels: advice, reparam


def schools(centered):
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            if centered:
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            else:
                eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
                theta = mu + tau * eta
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return model, (y, sigma)


def test_diagnose_names_a_funnel_and_points_at_loc_scale_reparam():
    model, args = schools(centered=True)
    pyro.clear_param_store()
    result = fit(model, None, *args, escalate=False, max_steps=300, progress=False, seed=0)
    found = diagnose(model, result.guide, *args, num_samples=1000)
    assert found.verdict != "good"
    assert found.funnel_sites == ("theta",)
    assert "LocScaleReparam" in found.advice and "reparam='noncentered'" in found.advice
    # the non-centered model has no scale that moves: no funnel named
    model_nc, _ = schools(centered=False)
    pyro.clear_param_store()
    result_nc = fit(model_nc, None, *args, escalate=False, max_steps=300, progress=False, seed=0)
    assert diagnose(model_nc, result_nc.guide, *args, num_samples=1000).funnel_sites == ()


def test_reparam_noncentered_fits_the_rewritten_model():
    model, args = schools(centered=True)
    pyro.clear_param_store()
    result = fit(model, None, *args, reparam="noncentered", escalate=False, max_steps=300,
                 progress=False, seed=0)
    trace = pyro.poutine.trace(result.model).get_trace(*args)
    assert "theta_decentered" in trace.nodes and "theta" in trace.nodes
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"]]
    assert "theta" not in latent  # theta is now deterministic
    with pytest.raises(ValueError, match="reparam must be None or 'noncentered'"):
        fit(model, None, *args, reparam="centered")
