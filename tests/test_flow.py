"""The flow guide (AutoRealNVP), the escalating default of ``fit(model, None)``, PSIS-resampled
draws, and the funnel advice / non-centering, against exact answers."""

import importlib
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_elbo.diagnostics.arviz import to_dict
from pyro_elbo.diagnostics.trust import diagnose
from pyro_elbo.engine.traces import forked_rng
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


@pytest.mark.parametrize("module_local_params", [False, True])
def test_stl_without_the_second_guide_pass_is_the_replays_gradient(monkeypatch,
                                                                    module_local_params):
    """STL on AutoRealNVP scores the live draw with a detached copy of the flow (no second guide
    pass, :func:`~pyro_elbo.engine.detach.detach_auxiliary_sites`); on a constrained model (a
    HalfNormal scale: a Jacobian on the path) and perturbed weights, its loss and gradient are
    the general replay's (``log_q_with_constant_params``) to float64 rounding, with the guide's
    parameters in the param store or module-local."""
    def model():
        scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=torch.float64), scale))
        pyro.sample("y", dist.Normal(x, 0.5), obs=torch.tensor(0.3, dtype=torch.float64))

    def gradient(guide):
        for p in guide.parameters():
            p.grad = None
        with forked_rng():
            torch.manual_seed(3)
            loss = ELBO(16, estimator="stl").loss_and_grads(model, guide)
        return loss, torch.cat([p.grad.reshape(-1) for p in guide.parameters()])

    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=module_local_params):
        guide = AutoRealNVP(model, base=(torch.zeros(2, dtype=torch.float64),
                                         torch.eye(2, dtype=torch.float64)))
        guide()
        _perturbed(guide, 0.05, seed=2)
        with torch.no_grad():
            guide.shift.add_(torch.tensor([0.4, -0.7], dtype=torch.float64))
        short_loss, short = gradient(guide)
        monkeypatch.setattr(AutoRealNVP, "auxiliary_depends_on_params_only", False)
        replay_loss, replay = gradient(guide)
    assert short_loss == pytest.approx(replay_loss, rel=1e-12)
    assert float(replay.abs().max()) > 1e-2  # not a trivially zero gradient
    assert torch.allclose(short, replay, rtol=1e-9, atol=1e-12)


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
        with forked_rng():
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
    # reparam=None: the user keeps the model as written (no automatic non-centering)
    result = escalating_fit(fit, funnel10, (), {}, {"max_steps": 500, "progress": False,
                                                    "flow_steps": 300, "reparam": None})
    names = [s.name for s in result.stages]
    assert names == ["gaussian", "flow"]
    assert result.stages[0].khat >= 0.7 and "continuing with a flow" in result.stages[0].reason
    assert "a funnel at ['x']" in result.stages[0].reason  # and the cure is named
    assert all(s.seconds > 0 for s in result.stages)
    assert result.stages[1].num_steps == 300
    assert result.model is funnel10


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
    with pytest.raises(ValueError, match="reparam must be .auto."):
        fit(model, None, *args, reparam="centered")


# ------------------------------------------------------------------ robust escalation


def _v_and_x_draws(result, num_draws=4000):
    """Draws of the funnel's v and x from the fitted guide, through ``result.model`` (x is a
    deterministic site there when the escalation non-centered it)."""
    from pyro.infer.importance import vectorized_importance_weights

    with forked_rng():
        torch.manual_seed(11)
        _, trace, _ = vectorized_importance_weights(result.model, result.guide,
                                                    num_samples=num_draws, max_plate_nesting=1)
    return trace.nodes["v"]["value"].double(), trace.nodes["x"]["value"].double()


def test_a_funnel_with_no_mode_is_non_centered_by_default_and_comes_out_exact():
    """Neal's funnel in 10 dimensions has no mode (the density grows without bound as v -> -inf
    at x = 0), and no Gaussian holds it.  The default path's mode check finds no mode and a
    latent scale at x, and non-centers it before fitting; the rewritten model (v ~ N(0, 3),
    x_decentered ~ N(0, I)) is Gaussian, so the Gaussian stage is exact: v's mean and sd within
    5 SE of 0 and 3, and x's IQR (exact by quadrature: 1.148) within 5 SE."""
    pyro.clear_param_store()
    result = fit(funnel10, None, max_steps=500, progress=False, seed=0)
    names = [s.name for s in result.stages]
    assert names == ["mode check", "gaussian (non-centered)"]
    assert "no mode" in result.stages[0].reason and "['x']" in result.stages[0].reason
    assert "non-centering" in result.stages[0].reason
    assert result.stages[1].khat < 0.7 and "holds the posterior" in result.stages[1].reason
    assert result.model is not funnel10 and result.resample == "psis"
    v, x = _v_and_x_draws(result)
    assert _within_5_se(v, 0.0, 3.0), (v.mean(), v.std())
    iqr = (x.quantile(0.75, dim=0) - x.quantile(0.25, dim=0)).median()
    # SE of a sample quartile: sqrt(p (1 - p) / n) / f(q) with the marginal density f(0.574) =
    # 0.193 (quadrature over v); the IQR's SE is at most sqrt(2) times that: 0.050
    assert abs(float(iqr) - 1.148) < 5 * 0.050


def test_the_mode_check_names_latent_scales_and_needs_no_mode():
    """Centered eight schools: theta's scale tau is latent (it differs between prior draws) and
    L-BFGS finds no mode (it runs down the funnel), so the check returns theta; the
    non-centered model has no latent scale, so it returns None without running L-BFGS."""
    from pyro_elbo.fit.noncentering import funnel_without_mode, scale_sites

    model, args = schools(centered=True)
    assert scale_sites(model, args, {}) == ["theta"]
    found = funnel_without_mode(model, args, {})
    assert found is not None and found[0] == ["theta"]
    assert found[1].selected == "path" and not found[1].converged
    model_nc, _ = schools(centered=False)
    assert scale_sites(model_nc, args, {}) == []
    assert funnel_without_mode(model_nc, args, {}) is None


def test_the_gaussian_stage_falls_back_to_sgd_from_the_prior_when_it_raises(monkeypatch):
    """When the Gaussian stage raises (no mode, a failed Hessian...), the escalation reruns it
    as SGD from the prior's median, records both, and the answer is the exact conjugate one
    (mean within 0.05 sd, sd within 5%)."""
    escalate = importlib.import_module("pyro_elbo.fit.escalate")

    y = torch.tensor([2.1, 3.4, 2.7, 3.9, 2.2, 3.1], dtype=torch.float64)

    def model(y):  # mu sees y, tau sees y - 5: independent conjugate posteriors
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        tau = pyro.sample("tau", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        with pyro.plate("data", y.shape[-1]):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)
            pyro.sample("obs2", dist.Normal(tau, 1.0), obs=y - 5)

    def broken(*args, **kwargs):
        raise RuntimeError("no mode found (test)")

    monkeypatch.setattr(escalate, "gaussian_stage", broken)
    pyro.clear_param_store()
    result = fit(model, None, y, max_steps=1500, progress=False, seed=0)
    assert [s.name for s in result.stages][:2] == [
        "gaussian", "gaussian (fallback: SGD from the prior median, no Laplace stage)"]
    assert "failed (RuntimeError: no mode found (test))" in result.stages[0].reason
    assert result.init.ran is False
    # exact posterior: mu ~ N(sum y / (n + 1/100), 1 / (n + 1/100)), tau likewise with y - 5
    precision = len(y) + 1 / 100
    mean = torch.stack([y.sum(), (y - 5).sum()]) / precision
    cov = torch.eye(2, dtype=torch.float64) / precision
    # what the user gets: the guide's draws, PSIS-resampled (its k-hat allows it), within 5 SE
    assert result.resample == "psis"
    pyro.set_rng_seed(3)
    idata = to_dict(result.model, result.guide, y, num_samples=4000, log_likelihood=False,
                    posterior_predictive=False, resample=result.resample)
    n = 1 / (1 / idata.attrs["posterior"]["psis_ess"] + 1 / 4000)
    sd = cov.diagonal().sqrt()
    for index, name in enumerate(("mu", "tau")):
        draws = np.asarray(idata.groups["posterior"][name]).ravel()
        assert abs(draws.mean() - float(mean[index])) < 5 * float(sd[index]) / math.sqrt(n)
        assert abs(draws.std() - float(sd[index])) < 5 * float(sd[index]) / math.sqrt(2 * n)


def test_a_flow_that_goes_non_finite_is_retried_with_a_smaller_step(monkeypatch):
    """The first flow run raises (as a non-finite one does); the escalation drops its
    parameters, reruns it with the step divided by FLOW_RETRY_FACTOR, and records both."""
    escalate = importlib.import_module("pyro_elbo.fit.escalate")
    from pyro_elbo.fit.loop import NonFiniteError

    calls = []
    real = escalate._flow_stage

    def first_fails(fit_, model, base, args, kwargs, options, lr=None):
        calls.append(lr)
        if len(calls) == 1:
            # what a diverged flow leaves in the param store: the retry must not start there
            pyro.param("AutoRealNVP.shift", torch.full((10,), math.nan))
            raise NonFiniteError("fit: the loss is nan at step 7 (test)", step=7)
        return real(fit_, model, base, args, kwargs, options, lr=lr)

    monkeypatch.setattr(escalate, "_flow_stage", first_fails)
    pyro.clear_param_store()
    result = escalate.escalating_fit(fit, funnel10, (), {}, {
        "max_steps": 300, "progress": False, "flow_steps": 200, "reparam": None})
    names = [s.name for s in result.stages]
    assert names == ["gaussian", "flow", "flow (retry, step 0.001)"]
    assert "failed (NonFiniteError" in result.stages[1].reason
    assert calls[0] is None
    assert calls[1] == pytest.approx(flow_optimizer().keywords["lr"] / escalate.FLOW_RETRY_FACTOR)
    assert result.stages[2].num_steps == 200 and math.isfinite(result.stages[2].khat)
    assert "AutoRealNVP.shift" in pyro.get_param_store()  # the retry's own, finite
    assert bool(torch.isfinite(pyro.param("AutoRealNVP.shift")).all())


# ------------------------------------------------------------------ the flow's stopping rule


def _feed(rule, losses):
    for step, loss in enumerate(losses, 1):
        if rule.update(step, float(loss)):
            return step
    return None


def test_loss_plateau_stops_on_noise_and_not_while_the_loss_falls():
    from pyro_elbo.fit.plateau import LossPlateau

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3000, generator=gen, dtype=torch.float64)
    # a flat, noisy loss: the first test (step 400) finds no gain beyond 2 se
    rule = LossPlateau()
    assert _feed(rule, 10 + 0.5 * noise) == 400
    assert rule.converged and "not distinguishable from the loss's noise" in rule.reason(True)
    # falling by 0.05 nats per 200 steps, little noise: never stops
    rule = LossPlateau()
    assert _feed(rule, 10 - 0.00025 * torch.arange(3000) + 0.01 * noise) is None
    assert not rule.converged and "still falling" in rule.reason(False)
    # falls fast, then flat with little noise: stops once two windows are flat, below tol
    curve = 10 + 5 * torch.exp(-torch.arange(3000.0, dtype=torch.float64) / 100) + 1e-4 * noise
    rule = LossPlateau()
    stop = _feed(rule, curve)
    assert stop is not None and 700 <= stop <= 1600, stop
    assert "below the tolerance" in rule.reason(True)
    # a checkpointed rule resumes to the same decision
    # a plateau that fails ``accept`` does not stop the run; the reason says why
    calls = []
    rule = LossPlateau(accept=lambda: (calls.append(1), (len(calls) > 1, "k-hat test"))[1])
    assert _feed(rule, 10 + 0.5 * noise) == 900  # refused at 400, accepted 500 steps later
    assert "and k-hat test" in rule.reason(True) and len(calls) == 2
    rule, resumed = LossPlateau(), LossPlateau()
    _feed(rule, curve[:650])
    resumed.load_state_dict(rule.state_dict())
    assert [resumed.update(s, float(curve[s - 1])) for s in range(651, 1300)] == \
        [rule.update(s, float(curve[s - 1])) for s in range(651, 1300)]


BANANA_B, BANANA_S = 0.5, 2.0


def banana():
    x1 = pyro.sample("x1", dist.Normal(0.0, BANANA_S))
    pyro.sample("x2", dist.Normal(BANANA_B * (x1**2 - BANANA_S**2), 1.0))


def test_the_flow_stage_stops_on_its_rule_and_gets_the_bananas_exact_moments():
    """A banana (x1 ~ N(0, 2), x2 | x1 ~ N(0.5 (x1^2 - 4), 1)): exact E x2 = 0, sd x2 = 3.  The
    default escalates to the flow, which stops on LossPlateau before FLOW_MAX_STEPS and says
    why; its PSIS-resampled draws (4000) give x2's mean and sd within 5 SE."""
    from pyro_elbo.fit.escalate import FLOW_MAX_STEPS

    pyro.clear_param_store()
    # whether the plateau test fires before the cap is a property of the run's noise, not only
    # of the rule (the flow's k-hat at a plateau is 0.3-0.9 from seed to seed): measured on
    # seeds 7-16, 7 of 10 runs stopped on the rule (with and without STL's detached-flow
    # shortcut); this seed is one that does (at step 600, k-hat 0.40), so the test checks the
    # stop's reason and the moments that follow it
    result = fit(banana, None, max_steps=500, progress=False, seed=16)
    flow = result.stages[-1]
    assert [s.name for s in result.stages] == ["gaussian", "flow"]
    assert flow.converged and flow.num_steps < FLOW_MAX_STEPS
    assert "the loss stopped falling" in flow.reason
    idata = to_dict(result.model, result.guide, num_samples=4000, log_likelihood=False,
                    posterior_predictive=False, resample=result.resample)
    assert result.resample == "psis"
    ess = idata.attrs["posterior"]["psis_ess"]
    x2 = np.asarray(idata.groups["posterior"]["x2"]).ravel()
    n = 1 / (1 / ess + 1 / 4000)  # the PSIS weights' ESS and the resampling, together
    assert abs(x2.mean()) < 5 * 3.0 / math.sqrt(n)
    # SE of a sample sd: sqrt((mu4 - sigma^4) / n) / (2 sigma), x2's fourth central moment
    # mu4 = 1011 (x2 = 2 (u^2 - 1) + e with u, e ~ N(0, 1)), sigma = 3
    assert abs(x2.std() - 3.0) < 5 * math.sqrt((1011 - 81) / n) / 6
