"""ELBO gradient estimators against exact gradients (issue 3).

* Unbiasedness: on NormalNormal and LinearRegression (D=3) with a Gaussian guide away from its
  optimum, the ELBO is closed form (E_q log p(x, z) for Gaussians plus the Gaussian entropy), so
  its exact gradient is autograd through that formula.  The mean of 2000 gradient draws must match
  it within 4 SE for every parameter element, for "reparam", "stl" and "score" (both baselines).
* Zero variance at the optimum: STL's gradient variance is < 1e-12 at the exact posterior, for
  AutoNormal (real and constrained sites), AutoMultivariateNormal and a pyro.param guide.
* Variance reduction: the leave-one-out baseline lowers the score-function variance.
* Every guide type runs one SVI step and one differentiable_loss backward, for every estimator.

Many independent gradient draws come from one backward pass: the model and guide are replicated
M times in an outer ``pyro.plate("replicas", M, dim=-2)`` and the guide's parameters get a replica
dim, so the gradient of the summed loss with respect to replica j's parameters is a single-step
gradient draw of replica j's ELBO, independent across replicas.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch.distributions import constraints, kl_divergence, transform_to

from pyro_elbo.conjugate import LinearRegression, NormalGamma, NormalNormal
from pyro_elbo.diagnostics.gradient_variance import gradient_variance
from pyro_elbo.objectives.elbo import ELBO

NUM_DRAWS = 8000



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def replicate(fn, num_replicas):
    """``fn`` run inside an outer plate of independent replicas at dim -2."""

    def replicated(*args, **kwargs):
        with pyro.plate("replicas", num_replicas, dim=-2):
            return fn(*args, **kwargs)

    return replicated


# ------------------------------------------------------------------------ problems


def normal_normal():
    data = torch.tensor([0.9, 1.7, 0.2, 1.1, 0.6])
    return NormalNormal(data, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0)


def linear_regression():
    return LinearRegression.simulate(20, 3, seed=3, noise_scale=1.0)


class NormalGuide:
    """q(loc) = Normal(m, s), parameters with a replica dim: m, s of shape (M, 1)."""

    site = "loc"

    def __init__(self, num_replicas, m, s, reparameterized=True):
        self.shape = (num_replicas, 1)
        self.m0, self.s0, self.reparameterized = m, s, reparameterized

    def __call__(self):
        m = pyro.param("m", torch.full(self.shape, self.m0))
        s = pyro.param("s", torch.full(self.shape, self.s0), constraint=constraints.positive)
        fn = dist.Normal(m, s)
        if not self.reparameterized:
            fn = fn.has_rsample_(False)
        with pyro.plate("replicas", self.shape[0], dim=-2):
            pyro.sample(self.site, fn)

    @staticmethod
    def exact_elbo(oracle, params):
        """Closed-form ELBO of q = N(m, s^2): E_q log p(x | z) - KL(q || p(z))."""
        m, s = params["m"], transform_to(constraints.positive)(params["s"])
        x, sigma = oracle.data, oracle.obs_scale
        loglik = -0.5 * len(x) * torch.log(2 * math.pi * sigma**2) - (
            ((x - m) ** 2).sum() + len(x) * s**2
        ) / (2 * sigma**2)
        kl = kl_divergence(dist.Normal(m, s), dist.Normal(oracle.prior_loc, oracle.prior_scale))
        return loglik - kl


class MVNGuide:
    """q(w) = MultivariateNormal(m, L L^T), parameters with a replica dim: m (M, 1, D) and a
    lower-Cholesky L (M, 1, D, D)."""

    site = "weights"

    def __init__(self, num_replicas, m, scale_tril):
        self.num_replicas = num_replicas
        self.m0, self.L0 = m, scale_tril

    def __call__(self):
        M = self.num_replicas
        m = pyro.param("m", self.m0.expand(M, 1, -1).clone())
        L = pyro.param(
            "L", self.L0.expand(M, 1, -1, -1).clone(), constraint=constraints.lower_cholesky
        )
        with pyro.plate("replicas", M, dim=-2):
            pyro.sample(self.site, dist.MultivariateNormal(m, scale_tril=L))

    @staticmethod
    def exact_elbo(oracle, params):
        """Closed form: E_q log p(y | w) = sum_i log N(y_i; x_i.m, s^2) - x_i^T S x_i / (2 s^2)."""
        m = params["m"]
        L = transform_to(constraints.lower_cholesky)(params["L"])
        X, y, sigma = oracle.X, oracle.y, oracle.noise_scale
        cov = L @ L.T
        loglik = dist.Normal(X @ m, sigma).log_prob(y).sum() - torch.einsum(
            "nd,de,ne->", X, cov, X
        ) / (2 * sigma**2)
        prior = dist.MultivariateNormal(
            torch.zeros_like(m), covariance_matrix=torch.diag(oracle.prior_scale**2)
        )
        kl = kl_divergence(dist.MultivariateNormal(m, scale_tril=L), prior)
        return loglik - kl


def make_problem(name, num_replicas):
    """(oracle, guide) away from the optimum."""
    if name == "NormalNormal":
        oracle = normal_normal()
        post = oracle.posterior()
        m, s = float(post.loc) + 0.6, float(post.scale) * 0.7
        return oracle, NormalGuide(num_replicas, m, s)
    oracle = linear_regression()
    post = oracle.posterior()
    m = post.loc + torch.tensor([0.3, -0.2, 0.25])
    L = post.scale_tril * 1.3 + torch.tensor([[0.0, 0, 0], [0.05, 0, 0], [-0.04, 0.03, 0]])
    return oracle, MVNGuide(num_replicas, m, L)


def store_leaves():
    """The guide's unconstrained parameter tensors, by name, in a fixed order."""
    store = pyro.get_param_store()
    return {name: store[name].unconstrained() for name in sorted(store.keys())}


def gradient_draws(objective, oracle, guide, num_replicas):
    """(M, P) single-step gradient draws of the loss, one per replica, and the leaves."""
    model = replicate(oracle.model, num_replicas)
    loss = objective.differentiable_loss(model, guide)
    leaves = store_leaves()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return torch.cat([g.reshape(num_replicas, -1) for g in grads], dim=1), leaves


def exact_gradient(oracle, guide, leaves):
    """Gradient of -ELBO with respect to one replica's unconstrained parameters."""
    single = {
        name: leaf.detach()[0, 0].clone().requires_grad_(True) for name, leaf in leaves.items()
    }
    loss = -guide.exact_elbo(oracle, single)
    grads = torch.autograd.grad(loss, list(single.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def mean_and_se(draws):
    return draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])


# ------------------------------------------------------------------------ unbiasedness

ESTIMATORS = [
    ("reparam", "loo", 1),
    ("stl", "loo", 1),
    ("score", "none", 4),
    ("score", "loo", 4),
]


@pytest.mark.parametrize("problem", ["NormalNormal", "LinearRegression"])
@pytest.mark.parametrize("estimator,baseline,num_particles", ESTIMATORS)
def test_gradient_is_unbiased(problem, estimator, baseline, num_particles):
    oracle, guide = make_problem(problem, NUM_DRAWS)
    objective = ELBO(num_particles, estimator=estimator, baseline=baseline)
    draws, leaves = gradient_draws(objective, oracle, guide, NUM_DRAWS)
    exact = exact_gradient(oracle, guide, leaves)
    mean, se = mean_and_se(draws)
    # elements fixed by the parametrization (the upper triangle of L's unconstrained matrix)
    # have an exactly zero gradient and SE
    assert torch.all((mean - exact).abs() <= 4 * se + 1e-12), (mean, exact, se)
    # the exact gradient is many SEs from zero, so an estimator that is zero or has the wrong
    # sign cannot pass
    assert (exact.abs() > 6 * se).any()


def test_reparam_with_a_non_reparameterized_site_is_unbiased():
    """ELBO('reparam') gives sites without rsample score-function terms with the LOO baseline."""
    oracle, guide = make_problem("NormalNormal", NUM_DRAWS)
    guide.reparameterized = False
    draws, leaves = gradient_draws(ELBO(4), oracle, guide, NUM_DRAWS)
    exact = exact_gradient(oracle, guide, leaves)
    mean, se = mean_and_se(draws)
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)
    assert (exact.abs() > 6 * se).any()


def test_reparam_with_one_particle_matches_trace_elbo_on_a_non_reparameterized_site():
    """With one particle a non-reparameterizable site gets no baseline, as in Trace_ELBO: the
    gradients are identical at the same seed."""
    oracle = normal_normal()
    guide = NormalGuide(1, 0.3, 0.7, reparameterized=False)
    model = replicate(oracle.model, 1)
    grads = []
    for objective in (ELBO(1), pyro.infer.Trace_ELBO(max_plate_nesting=2)):
        objective.loss(model, guide)
        pyro.set_rng_seed(6)
        loss = objective.differentiable_loss(model, guide)
        grads.append(torch.autograd.grad(loss, list(store_leaves().values())))
    for ours, pyros in zip(*grads):
        assert torch.allclose(ours, pyros, rtol=1e-10, atol=1e-14)


def test_stl_gives_a_non_reparameterized_site_its_score_function_term():
    """As Trace_ELBO does: a site without rsample has no path derivative, so STL's gradient for
    it is the score-function one, the same as estimator='reparam' on the same draws."""
    oracle = normal_normal()
    guide = NormalGuide(1, 0.3, 0.7, reparameterized=False)
    model = replicate(oracle.model, 1)
    grads = []
    for objective in (ELBO(2, estimator="stl"), ELBO(2)):
        objective.loss(model, guide)
        pyro.set_rng_seed(6)
        loss = objective.differentiable_loss(model, guide)
        grads.append(torch.autograd.grad(loss, list(store_leaves().values())))
    for stl, reparam in zip(*grads):
        assert reparam.abs().max() > 1e-3
        assert torch.allclose(stl, reparam, rtol=1e-12, atol=1e-14)


def test_closed_form_elbo_reference():
    """The closed-form ELBO used as the reference is itself right: compare with a large-sample
    Monte Carlo ELBO (common random numbers) and with the known optimum (zero gradient)."""
    for name in ("NormalNormal", "LinearRegression"):
        oracle, guide = make_problem(name, 1)
        guide()
        leaves = store_leaves()
        single = {n: leaf.detach()[0, 0] for n, leaf in leaves.items()}
        exact = float(guide.exact_elbo(oracle, single))
        mc = [-ELBO(2000).loss(replicate(oracle.model, 1), guide) for _ in range(20)]
        mean = sum(mc) / len(mc)
        se = float(torch.tensor(mc).std()) / math.sqrt(len(mc))
        assert abs(mean - exact) < 4 * se, (name, mean, exact)
        pyro.clear_param_store()
    # at the exact posterior the closed-form ELBO is log p(x) and its gradient vanishes
    oracle = linear_regression()
    post = oracle.posterior()
    params = {
        "m": post.loc.clone().requires_grad_(True),
        "L": transform_to(constraints.lower_cholesky)
        .inv(post.scale_tril)
        .clone()
        .requires_grad_(True),
    }
    elbo = MVNGuide.exact_elbo(oracle, params)
    assert abs((elbo - oracle.log_evidence()).item()) < 1e-9
    grads = torch.autograd.grad(elbo, list(params.values()))
    assert max(float(g.abs().max()) for g in grads) < 1e-9


# ------------------------------------------------------------------------ variance reduction


def test_engine_detach_samples_records_detached_values():
    """run_particles(detach_samples=True): the traces must hold the detached samples."""
    from pyro_elbo.engine.particles import run_particles

    oracle, guide = make_problem("NormalNormal", 3)
    model = replicate(oracle.model, 3)
    particles = run_particles(
        model, guide, (), {}, num_particles=4, plate_nesting=2, detach_samples=True
    )
    assert not particles.guide_traces[0].nodes["loc"]["value"].requires_grad
    assert not particles.model_sites["obs"].log_prob.requires_grad


def test_leave_one_out_baseline_lowers_score_variance():
    """Score-function gradient variance on NormalNormal with K=4: LOO baseline vs none.

    Measured with the engine fix: var(none) / var(loo) = 14 for m and 5.8 for log s."""
    oracle, guide = make_problem("NormalNormal", NUM_DRAWS)
    variances = {}
    for baseline in ("none", "loo"):
        pyro.clear_param_store()
        draws, _ = gradient_draws(
            ELBO(4, estimator="score", baseline=baseline), oracle, guide, NUM_DRAWS
        )
        variances[baseline] = draws.var(0)
    ratio = variances["none"] / variances["loo"]
    print(f"score-function variance ratio none/loo (m, log s): {ratio.tolist()}")
    # a variance from n draws has relative SE ~ sqrt(2 / n) = 3.2 %: the ratio must exceed 1 by
    # far more than that
    assert torch.all(ratio > 1 + 8 * math.sqrt(2 / NUM_DRAWS)), ratio
    assert torch.all(ratio > 3), ratio


def test_stl_has_lower_variance_than_reparam_near_the_optimum():
    """Near q = p the path derivative beats the full pathwise gradient (both unbiased)."""
    oracle = normal_normal()
    post = oracle.posterior()
    guide = NormalGuide(NUM_DRAWS, float(post.loc) + 0.05, float(post.scale) * 1.05)
    reparam, _ = gradient_draws(ELBO(1), oracle, guide, NUM_DRAWS)
    stl, _ = gradient_draws(ELBO(1, estimator="stl"), oracle, guide, NUM_DRAWS)
    assert torch.all(stl.var(0) < 0.1 * reparam.var(0))


# ------------------------------------------------------------------------ zero variance


def lognormal_model(data, prior_loc=0.3, prior_scale=0.8, obs_scale=0.5):
    """z ~ LogNormal(mu0, s0), x_i ~ Normal(log z, sigma): the posterior of log z is
    Normal(m_n, s_n), so the exact posterior of z is LogNormal(m_n, s_n), in AutoNormal's family."""

    def model():
        z = pyro.sample("z", dist.LogNormal(prior_loc, prior_scale))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(z.log(), obs_scale), obs=data)

    precision = prior_scale**-2 + len(data) / obs_scale**2
    post_scale = precision**-0.5
    post_loc = (prior_loc / prior_scale**2 + float(data.sum()) / obs_scale**2) / precision
    return model, post_loc, post_scale


def at_posterior(case):
    """(model, guide) with the guide set to the exact posterior."""
    store = pyro.get_param_store()
    if case == "NormalNormal-AutoNormal":
        oracle = normal_normal()
        post = oracle.posterior()
        guide = AutoNormal(oracle.model)
        guide()
        store["AutoNormal.locs.loc"] = post.loc.clone()
        store["AutoNormal.scales.loc"] = post.scale.clone()
        return oracle.model, guide
    if case == "LinearRegression-AutoMultivariateNormal":
        oracle = linear_regression()
        post = oracle.posterior()
        guide = AutoMultivariateNormal(oracle.model)
        guide()
        L = post.scale_tril
        guide.loc.data = post.loc.clone()  # a plain nn.Parameter: set through the module
        store["AutoMultivariateNormal.scale"] = L.diagonal().clone()
        store["AutoMultivariateNormal.scale_tril"] = (L / L.diagonal().unsqueeze(-1)).clone()
        return oracle.model, guide
    if case == "LogNormal-AutoNormal":
        data = torch.tensor([0.4, -0.2, 0.9, 0.5])
        model, loc, scale = lognormal_model(data)
        guide = AutoNormal(model)
        guide()
        store["AutoNormal.locs.z"] = torch.tensor(loc)
        store["AutoNormal.scales.z"] = torch.tensor(scale)
        return model, guide
    assert case == "NormalNormal-param"
    oracle = normal_normal()
    post = oracle.posterior()
    guide = NormalGuide(1, float(post.loc), float(post.scale))
    return replicate(oracle.model, 1), guide


ZERO_VARIANCE_CASES = [
    "NormalNormal-AutoNormal",
    "LinearRegression-AutoMultivariateNormal",
    "LogNormal-AutoNormal",
    "NormalNormal-param",
]


@pytest.mark.parametrize("case", ZERO_VARIANCE_CASES)
def test_stl_has_zero_variance_at_the_exact_posterior(case):
    model, guide = at_posterior(case)
    stl = gradient_variance(ELBO(4, estimator="stl"), model, guide, num_draws=50)
    reparam = gradient_variance(ELBO(4), model, guide, num_draws=50)
    assert stl.total_variance < 1e-12, stl.var
    # the mean is zero too (the exact posterior is a stationary point)
    assert max(float(m.abs().max()) for m in stl.mean.values()) < 1e-6
    # the tool sees every parameter, and the ordinary estimator is noisy at the same point
    assert set(stl.var) == set(reparam.var) and len(stl.var) >= 2
    assert reparam.total_variance > 1e-2


def test_gradient_variance_matches_direct_draws():
    """gradient_variance's mean and variance equal those of hand-collected loss_and_grads draws
    under the same seed, and it leaves parameter values and existing .grad untouched."""
    oracle = normal_normal()
    guide = AutoNormal(oracle.model)
    guide()
    store = pyro.get_param_store()
    before = {n: store[n].detach().clone() for n in store.keys()}
    leaf = store["AutoNormal.locs.loc"].unconstrained()
    leaf.grad = torch.tensor(7.0)
    objective = ELBO(3)
    pyro.set_rng_seed(5)
    result = gradient_variance(objective, oracle.model, guide, num_draws=30)
    assert float(leaf.grad) == 7.0
    assert all(torch.equal(before[n], store[n].detach()) for n in store.keys())

    leaves = {n: store[n].unconstrained() for n in store.keys()}
    objective = ELBO(3)  # fresh, so that it guesses the plate nesting (one guide run) again
    pyro.set_rng_seed(5)
    objective.loss(oracle.model, guide)  # gradient_variance's discovery pass uses the rng too
    draws = {n: [] for n in leaves}
    for _ in range(30):
        for p in leaves.values():
            p.grad = None
        objective.loss_and_grads(oracle.model, guide)
        for n, p in leaves.items():
            draws[n].append(p.grad.clone())
    for n in leaves:
        stacked = torch.stack(draws[n])
        assert torch.allclose(result.mean[n], stacked.mean(0), rtol=1e-12, atol=1e-14)
        assert torch.allclose(result.var[n], stacked.var(0), rtol=1e-12, atol=1e-14)
        assert torch.allclose(result.snr[n], stacked.mean(0).abs() / stacked.std(0))
    assert result.total_variance == pytest.approx(
        sum(float(torch.stack(d).var(0).sum()) for d in draws.values()), rel=1e-12
    )


def test_gradient_variance_bad_input():
    oracle = normal_normal()
    guide = AutoNormal(oracle.model)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_variance(ELBO(), oracle.model, guide, num_draws=1)
    with pytest.raises(TypeError, match="loss_and_grads"):
        gradient_variance(lambda m, g: 0.0, oracle.model, guide)


# ------------------------------------------------------------------------ every guide


def hand_written_guide():
    a = pyro.param("a", torch.tensor(0.0))
    b = pyro.param("b", torch.tensor(0.5), constraint=constraints.positive)
    c = pyro.param("c", torch.tensor(0.0))
    d = pyro.param("d", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("precision", dist.LogNormal(a, b))
    pyro.sample("loc", dist.Normal(c, d))


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": lambda m: AutoLowRankMultivariateNormal(m, rank=1),
    "hand-written": None,
}

ALL_ELBO_ESTIMATORS = {
    "reparam": lambda: ELBO(4),
    "stl": lambda: ELBO(4, estimator="stl"),
    "score-loo": lambda: ELBO(4, estimator="score"),
    "score-none": lambda: ELBO(4, estimator="score", baseline="none"),
}


def assert_objective_runs(make_objective, guide_name, oracle):
    """One SVI step and one differentiable_loss backward; the two give the same gradient."""
    model = oracle.model
    factory = GUIDES[guide_name]
    guide = hand_written_guide if factory is None else factory(model)
    objective = make_objective()
    pyro.set_rng_seed(1)
    objective.loss(model, guide)  # create the parameters
    store = pyro.get_param_store()
    leaves = {n: store[n].unconstrained() for n in store.keys()}
    assert leaves

    pyro.set_rng_seed(2)
    loss_a = objective.loss_and_grads(model, guide)
    grads_a = {n: p.grad.clone() for n, p in leaves.items()}
    for p in leaves.values():
        p.grad = None
    pyro.set_rng_seed(2)
    loss_b = objective.differentiable_loss(model, guide)
    loss_b.backward()
    grads_b = {n: p.grad.clone() for n, p in leaves.items()}
    for p in leaves.values():
        p.grad = None
    assert loss_a == pytest.approx(loss_b.item(), rel=1e-12)
    for n in leaves:
        assert torch.isfinite(grads_a[n]).all()
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-10, atol=1e-12), n
    assert any(float(g.abs().max()) > 0 for g in grads_a.values())

    before = {n: store[n].detach().clone() for n in store.keys()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    assert math.isfinite(svi.step())
    moved = [n for n in store.keys() if not torch.equal(before[n], store[n].detach())]
    assert moved, "SVI did not update any parameter"
    assert all(torch.isfinite(store[n]).all() for n in store.keys())


@pytest.mark.parametrize("guide_name", list(GUIDES))
@pytest.mark.parametrize("estimator", list(ALL_ELBO_ESTIMATORS))
def test_every_guide_runs(estimator, guide_name):
    oracle = NormalGamma(torch.tensor([0.3, -0.4, 1.2, 0.8, 0.1]))
    assert_objective_runs(ALL_ELBO_ESTIMATORS[estimator], guide_name, oracle)


@pytest.mark.parametrize(
    "guide_cls",
    [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal],
    ids=lambda c: c.__name__,
)
@pytest.mark.parametrize("objective", ["stl", "dreg"])
def test_detached_log_q_shortcut_equals_the_replay(guide_cls, objective):
    """For Pyro's Gaussian autoguides the engine detaches the auxiliary sites' distributions
    instead of replaying the guide; a subclass (which may override ``forward``) takes the
    replay.  Same draws, same gradients, to round-off, on a constrained (Gamma) latent too."""
    from pyro_elbo.objectives.iwelbo import IWELBO

    data = torch.tensor([0.3, 1.2, 2.0, 0.7], dtype=torch.float64)

    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", 4):
            pyro.sample("x", dist.Normal(loc.sum(-1), 1 / rate.sqrt()), obs=data)

    replaying = type("Replaying" + guide_cls.__name__, (guide_cls,), {})
    grads = []
    for cls in (guide_cls, replaying):
        pyro.clear_param_store()
        guide = cls(model, init_loc_fn=pyro.infer.autoguide.init_to_sample)
        pyro.set_rng_seed(3)
        guide()  # parameters at a random, off-optimum point (same seed for both)
        loss = ELBO(4, estimator="stl") if objective == "stl" else IWELBO(4, estimator="dreg")
        pyro.set_rng_seed(4)
        value = loss.differentiable_loss(model, guide)
        names = sorted(pyro.get_param_store().keys())
        leaves = [pyro.get_param_store()[n].unconstrained() for n in names]
        grads.append((float(value), torch.autograd.grad(value, leaves, allow_unused=True)))
    (value_a, grad_a), (value_b, grad_b) = grads
    assert value_a == pytest.approx(value_b, rel=1e-12)
    for a, b in zip(grad_a, grad_b):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
