"""pyro_elbo.ELBO against exact answers: closed-form ELBO, KL and gradients on conjugate models."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import kl_divergence

from pyro_elbo import ELBO
from pyro_elbo.conjugate import GammaPoisson, LinearRegression, NormalNormal
from pyro_elbo.engine.validation import ModelGuideMismatchError
from pyro_elbo.guides import posterior_of


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def normal_normal(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = 0.8 + torch.randn(n, generator=gen, dtype=torch.float64)
    return NormalNormal(data, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0)


def gaussian_guide(loc, scale, name="loc"):
    """A hand-written Normal guide with parameters ``m`` and ``s`` (positive)."""

    def guide(*args, **kwargs):
        m = pyro.param("m", torch.tensor(loc))
        s = pyro.param("s", torch.tensor(scale), constraint=dist.constraints.positive)
        pyro.sample(name, dist.Normal(m, s))

    return guide


def exact_elbo_normal_normal(oracle, m, s):
    """Closed-form ELBO of q = N(m, s^2) on NormalNormal: E_q log p(x|z) - KL(q || prior)."""
    x, sigma = oracle.data, oracle.obs_scale
    expected_loglik = (
        -0.5 * len(x) * math.log(2 * math.pi * sigma**2)
        - (((x - m) ** 2).sum() + len(x) * s**2) / (2 * sigma**2)
    )
    kl_prior = kl_divergence(
        dist.Normal(m, s), dist.Normal(oracle.prior_loc, oracle.prior_scale)
    )
    return expected_loglik, kl_prior


def mean_and_se(values):
    values = torch.as_tensor(values)
    return values.mean(), values.std() / math.sqrt(len(values))


# ------------------------------------------------------------------------ value of the loss


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_loss_matches_closed_form_elbo(vectorize, analytic_kl):
    oracle = normal_normal()
    m, s = 0.3, 0.7
    guide = gaussian_guide(m, s)
    loglik, kl = exact_elbo_normal_normal(oracle, torch.tensor(m), torch.tensor(s))
    exact_loss = float(-(loglik - kl))
    elbo = ELBO(num_particles=50, vectorize_particles=vectorize, analytic_kl=analytic_kl)
    losses = [elbo.loss(oracle.model, guide) for _ in range(200)]
    mean, se = mean_and_se(losses)
    assert abs(mean - exact_loss) < 4 * se


def test_beta_weights_the_kl():
    oracle = normal_normal()
    m, s, beta = torch.tensor(0.3), torch.tensor(0.7), 4.0
    guide = gaussian_guide(float(m), float(s))
    loglik, kl = exact_elbo_normal_normal(oracle, m, s)
    exact = float(-(loglik - beta * kl))
    losses = [ELBO(50, beta=beta).loss(oracle.model, guide) for _ in range(200)]
    mean, se = mean_and_se(losses)
    assert abs(mean - exact) < 4 * se
    # with the KL in closed form only E log p(x|z) is random
    losses = [ELBO(50, beta=beta, analytic_kl=True).loss(oracle.model, guide) for _ in range(200)]
    mean, se = mean_and_se(losses)
    assert abs(mean - exact) < 4 * se
    # and beta changes the answer by (beta - 1) KL, far beyond the noise
    assert abs(exact - float(-(loglik - kl))) > 10 * se


# ------------------------------------------------------------------------ gradients


def grad_draws(objective, model, guide, num_draws):
    """Single-step gradient estimates of the guide's (m, s) params, stacked."""
    draws = []
    for _ in range(num_draws):
        loss = objective.differentiable_loss(model, guide)
        params = [pyro.param("m").unconstrained(), pyro.param("s").unconstrained()]
        draws.append(torch.stack([g for g in torch.autograd.grad(loss, params)]))
    return torch.stack(draws)


def exact_loss_gradient(oracle, m0, s0):
    m = torch.tensor(m0, requires_grad=True)
    log_s = torch.tensor(math.log(s0), requires_grad=True)
    loglik, kl = exact_elbo_normal_normal(oracle, m, log_s.exp())
    return torch.stack(torch.autograd.grad(-(loglik - kl), [m, log_s]))


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_reparam_gradient_is_unbiased(analytic_kl):
    oracle = normal_normal()
    guide = gaussian_guide(0.3, 0.7)
    draws = grad_draws(ELBO(1, analytic_kl=analytic_kl), oracle.model, guide, 2000)
    exact = exact_loss_gradient(oracle, 0.3, 0.7)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - exact).abs() < 4 * se), (mean, exact, se)


def test_analytic_kl_lowers_gradient_variance():
    oracle = normal_normal()
    guide = gaussian_guide(0.3, 0.7)
    mc = grad_draws(ELBO(1), oracle.model, guide, 1000).var(0)
    analytic = grad_draws(ELBO(1, analytic_kl=True), oracle.model, guide, 1000).var(0)
    # the variance of a variance estimate from n draws has relative SE ~ sqrt(2/n) = 4.5 %
    assert torch.all(analytic < mc * (1 - 4 * math.sqrt(2 / 1000))), (analytic, mc)


def lognormal_site_model(data):
    """A positive latent under AutoNormal: its Delta site carries a Jacobian."""

    def model():
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Poisson(rate), obs=data)

    return model


def autonormal_grad_draws(objective, oracle, guide, num_draws):
    draws, losses = [], []
    for _ in range(num_draws):
        loss = objective.differentiable_loss(oracle.model, guide)
        params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
        draws.append(torch.stack(torch.autograd.grad(loss, params)).reshape(-1))
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack(draws)


def test_analytic_kl_is_unbiased_on_constrained_sites():
    """GammaPoisson + AutoNormal away from the optimum: analytic KL must fall back to the Delta's
    Jacobian-carrying Monte Carlo terms and agree with plain Monte Carlo; Pyro's
    TraceMeanField_ELBO uses KL(Delta, p) = -log p(v), which drops the Jacobian."""
    oracle = GammaPoisson(torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]), concentration=2.0, rate=1.0)
    guide = AutoNormal(oracle.model, init_scale=0.3)
    guide()
    store = pyro.get_param_store()
    store["AutoNormal.locs.rate"] = torch.tensor(0.9)  # log-rate loc, off the optimum
    store["AutoNormal.scales.rate"] = torch.tensor(0.6)

    n, k = 600, 16
    mc_loss, mc_grad = autonormal_grad_draws(ELBO(k), oracle, guide, n)
    an_loss, an_grad = autonormal_grad_draws(ELBO(k, analytic_kl=True), oracle, guide, n)
    mean_field = TraceMeanField_ELBO(k, vectorize_particles=True)
    pyro_loss, pyro_grad = autonormal_grad_draws(mean_field, oracle, guide, n)

    def z(a, b):
        return (a.mean(0) - b.mean(0)).abs() / (
            (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        )

    assert torch.all(z(an_loss, mc_loss) < 4)
    assert torch.all(z(an_grad, mc_grad) < 4)
    # Pyro's mean-field ELBO is biased here: it drops the Jacobian term E_q[u] = loc from the
    # loss, so its mean gradient in loc is off by exactly 1
    assert z(pyro_grad, mc_grad)[0] > 6
    bias_se = float((pyro_grad[:, 0].var() / n + mc_grad[:, 0].var() / n).sqrt())
    assert abs(float(pyro_grad[:, 0].mean() - mc_grad[:, 0].mean()) - 1.0) < 4 * bias_se


# ------------------------------------------------------------------------ fitting


def svi_fit(model, guide, objective, steps, lr=0.05, decay=0.01):
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay ** (1 / steps)})
    svi = SVI(model, guide, optim, loss=objective)
    for _ in range(steps):
        svi.step()


def test_fit_normal_normal_autonormal():
    oracle = normal_normal(n=20)
    guide = AutoNormal(oracle.model)
    svi_fit(oracle.model, guide, ELBO(8), 1500)
    q = posterior_of(guide)
    assert float(kl_divergence(q, oracle.posterior())) < 0.01


def test_fit_linear_regression_automvn():
    oracle = LinearRegression.simulate(100, 5, seed=1)
    guide = AutoMultivariateNormal(oracle.model)
    svi_fit(oracle.model, guide, ELBO(8), 2000)
    q = posterior_of(guide)
    assert float(kl_divergence(q, oracle.posterior())) < 0.01


def test_pyro_svi_with_trace_elbo_and_ours_agree_on_fit():
    """The same SVI loop with Trace_ELBO and with ELBO reach the same posterior."""
    oracle = normal_normal(n=20)
    fits = []
    for objective in (Trace_ELBO(8, vectorize_particles=True), ELBO(8)):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = AutoNormal(oracle.model)
        svi_fit(oracle.model, guide, objective, 1500)
        fits.append(posterior_of(guide))
    exact = oracle.posterior()
    for q in fits:
        assert abs(float(q.loc - exact.loc)) < 0.05 * float(exact.scale)
        assert abs(float(q.scale / exact.scale) - 1) < 0.05


# ------------------------------------------------------------------------ bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_particles"):
        ELBO(0)
    with pytest.raises(ValueError, match="beta"):
        ELBO(beta=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        ELBO(estimator="magic")
    with pytest.raises(ValueError, match="baseline"):
        ELBO(baseline="mean")
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ELBO(1, estimator="score")


def test_guide_missing_a_latent_site():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(a, 1.0))
        pyro.sample("x", dist.Normal(b, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("a", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'b'"):
        ELBO().loss(model, guide)


def test_guide_sampling_an_observed_site():
    oracle = normal_normal()

    def guide():
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        with pyro.plate("data", len(oracle.data)):
            pyro.sample("obs", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'obs'"):
        ELBO().loss(oracle.model, guide)


def test_guide_site_with_wrong_shape():
    oracle = normal_normal()

    def guide():
        m = pyro.param("m", torch.zeros(3))
        pyro.sample("loc", dist.Normal(m, 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match="'loc'.*shape"):
        ELBO().loss(oracle.model, guide)


def test_guide_site_unknown_to_model():
    oracle = normal_normal()

    def guide():
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    # as Trace_ELBO: Pyro's warning, and the extra site's log q kept (fit refuses the pair)
    objective = ELBO()
    with pytest.warns(UserWarning, match="(?s)guide but not model.*extra"):
        objective.loss(oracle.model, guide)
    pyro.set_rng_seed(2)
    ours = objective.loss(oracle.model, guide)
    pyro.set_rng_seed(2)
    assert ours == pytest.approx(pyro.infer.Trace_ELBO().loss(oracle.model, guide), abs=1e-5)


def test_elbo_module_for_torch_optimizers():
    """ELBO()(model, guide) is a module whose forward is the differentiable loss."""
    oracle = normal_normal()
    guide = AutoNormal(oracle.model)
    module = ELBO(4, estimator="reparam")(oracle.model, guide)
    loss = module()
    loss.backward()
    params = list(module.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert loss.shape == ()


def test_guide_site_with_a_different_subsampling_scale():
    def model():
        with pyro.plate("data", 10, subsample_size=5):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        m = pyro.param("m", torch.tensor(0.0))
        with pyro.plate("data", 5):  # the guide forgot the full size
            pyro.sample("z", dist.Normal(m, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'z' has scale 2 in the model but 1"):
        ELBO().loss(model, guide)
