"""Guides against exact answers (issue 7): AmortizedNormal, ExactGuide and posterior_of.

* AmortizedNormal on a linear-Gaussian latent model, whose exact amortized posterior is known
  (z_i ~ N(0, I), x_i ~ N(a * z_i + b, diag s^2): q(z_i | x_i) = N(c * (x_i - b), diag v) with
  v = 1 / (1 + a^2 / s^2), c = v a / s^2, a linear function of x_i that a linear encoder holds):
  - with every objective (ELBO reparam / STL / score / analytic KL, IWELBO reparam / DReG / STL,
    CUBO, InclusiveKL) SVI lowers the loss and the encoder lands on the exact posterior (mean
    within 0.05 posterior sd, RMS over data points; sd within 5%), also with subsampled
    minibatches;
  - at the exact encoder, the STL and DReG gradients have zero variance (< 1e-12, float64):
    the engine holds the encoder's weights constant in log q; the plain reparam gradient does not;
  - minibatches: the guide's plate picks the rows the model observes, and a minibatch passed as
    the data is scaled by N / B.
* ExactGuide: on every conjugate oracle ELBO = IW bound = CUBO = log p(x) within 1e-6 (float64),
  and STL / DReG have zero gradient variance at it (``learnable=True``).
* posterior_of: for AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal and
  AutoLowRankMultivariateNormal, the per-site marginals and the joint (``joint=True``) have the
  moments of 100k draws of the guide (within 5 SE), and the joint's ``log_prob`` is the guide's
  own log q.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch import nn

from pyro_elbo.conjugate import (
    BetaBernoulli,
    DirichletCategorical,
    GammaPoisson,
    LinearRegression,
    NormalGamma,
    NormalGammaPosterior,
    NormalNormal,
)
from pyro_elbo.diagnostics.check import check
from pyro_elbo.diagnostics.gradient_variance import gradient_variance
from pyro_elbo.engine.particles import run_particles
from pyro_elbo.guides import AmortizedNormal, ExactGuide, JointPosterior, posterior_of
from pyro_elbo.objectives.cubo import CUBO
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.inclusive_kl import InclusiveKL
from pyro_elbo.objectives.iwelbo import IWELBO, importance_weights


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------------ linear-Gaussian model


class LinearGaussian:
    """z_i ~ N(0, I_2), x_i ~ N(a * z_i + b, diag s^2), N data points (elementwise a, b, s)."""

    D = 2

    def __init__(self, num_data=400, seed=0):
        self.a = torch.tensor([2.0, -0.7])
        self.b = torch.tensor([0.5, 1.0])
        self.s = torch.tensor([0.8, 1.2])
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num_data, self.D, generator=g)
        self.x = self.a * z + self.b + self.s * torch.randn(num_data, self.D, generator=g)
        self.var = 1 / (1 + self.a**2 / self.s**2)  # posterior variance per dim
        self.coef = self.var * self.a / self.s**2
        self.indices = []  # the rows the model observed, per call

    def model(self, x, subsample_size=None):
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            self.indices.append(idx)
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.D]).to_event(1))
            pyro.sample("x", dist.Normal(self.a * z + self.b, self.s).to_event(1), obs=x[idx])

    def batch_model(self, x, num_data=None):
        """The minibatch form: ``x`` is the minibatch, the plate scales by num_data / len(x)."""
        num_data = x.shape[0] if num_data is None else num_data
        with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.D]).to_event(1))
            pyro.sample("x", dist.Normal(self.a * z + self.b, self.s).to_event(1), obs=x)

    def posterior_mean(self, x):
        return self.coef * (x - self.b)

    def log_evidence(self, x):
        """log p(x_i) per data point: x_i ~ N(b, a^2 + s^2) per dim."""
        marginal = dist.Normal(self.b, (self.a**2 + self.s**2).sqrt())
        return marginal.log_prob(x).sum(-1)

    def guide(self, init="default", **kwargs):
        """A linear encoder [loc, raw scale] = W x + c (softplus scale)."""
        D = self.D
        encoder = nn.Linear(D, 2 * D)
        with torch.no_grad():
            if init == "exact":
                encoder.weight.zero_()
                encoder.weight[:D] = torch.diag(self.coef)
                encoder.bias[:D] = -self.coef * self.b
                encoder.bias[D:] = torch.log(torch.expm1(self.var.sqrt()))
            elif init == "wide":  # off the optimum, wider than the posterior (CUBO needs that)
                encoder.weight.zero_()
                encoder.weight[:D] = torch.diag(1.2 * self.coef)
                encoder.bias[:D] = -self.coef * self.b + 0.3
                encoder.bias[D:] = torch.log(torch.expm1(1.5 * self.var.sqrt()))
            else:  # near the prior: N(~0, 1)
                encoder.weight.mul_(0.1)
                encoder.bias.zero_()
                encoder.bias[D:] = math.log(math.expm1(1.0))
        kwargs.setdefault("subsample_size", "subsample_size")
        return AmortizedNormal(encoder, site="z", plate="data", data=0, **kwargs)

    def errors(self, guide):
        """(RMS over data of |mean error| / posterior sd, max relative sd error)."""
        q = posterior_of(guide, self.x)
        sd = self.var.sqrt()
        mean_error = ((q.mean - self.posterior_mean(self.x)) / sd).pow(2).mean().sqrt()
        sd_error = (q.stddev / sd - 1).abs().max()
        return float(mean_error), float(sd_error)


OBJECTIVES = {
    "ELBO-reparam": (lambda: ELBO(), 0.03, "default"),
    "ELBO-stl": (lambda: ELBO(estimator="stl"), 0.03, "default"),
    "ELBO-score": (lambda: ELBO(8, estimator="score"), 0.03, "default"),
    "ELBO-analytic-kl": (lambda: ELBO(analytic_kl=True), 0.03, "default"),
    "IWELBO-reparam": (lambda: IWELBO(4), 0.03, "default"),
    "IWELBO-dreg": (lambda: IWELBO(8, estimator="dreg"), 0.03, "default"),
    "IWELBO-stl": (lambda: IWELBO(8, estimator="stl"), 0.03, "default"),
    "CUBO": (lambda: CUBO(16), 0.02, "wide"),
    "InclusiveKL": (lambda: InclusiveKL(8), 0.03, "default"),
}


def fit(problem, guide, objective, lr, steps=800, **kwargs):
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.001 ** (1 / steps)})
    svi = SVI(problem.model, guide, optim, loss=objective)
    return [svi.step(problem.x, **kwargs) for _ in range(steps)]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_amortized_normal_fits_the_exact_posterior_with_every_objective(name):
    factory, lr, init = OBJECTIVES[name]
    problem = LinearGaussian()
    guide = problem.guide(init)
    before = problem.errors(guide)
    losses = fit(problem, guide, factory(), lr)
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < first - 1.0, (first, last)
    mean_error, sd_error = problem.errors(guide)
    assert mean_error < 0.05 and sd_error < 0.05, (before, (mean_error, sd_error))


@pytest.mark.parametrize(
    "name,factory",
    [
        ("ELBO-4", lambda: ELBO(4)),
        ("IWELBO-dreg", lambda: IWELBO(8, estimator="dreg")),
        ("InclusiveKL", lambda: InclusiveKL(8)),
    ],
)
def test_amortized_normal_fits_with_subsampled_minibatches(name, factory):
    problem = LinearGaussian()
    guide = problem.guide()
    losses = fit(problem, guide, factory(), 0.03, subsample_size=100)
    assert sum(losses[-50:]) < sum(losses[:50]) - 50.0
    mean_error, sd_error = problem.errors(guide)
    assert mean_error < 0.05 and sd_error < 0.05, (mean_error, sd_error)


PATH_ESTIMATORS = {
    "ELBO-stl": lambda: ELBO(estimator="stl"),
    "ELBO-stl-4": lambda: ELBO(4, estimator="stl"),
    "IWELBO-dreg": lambda: IWELBO(8, estimator="dreg"),
    "IWELBO-stl": lambda: IWELBO(8, estimator="stl"),
    "IWELBO-dreg-sequential": lambda: IWELBO(3, estimator="dreg", vectorize_particles=False),
}


@pytest.mark.parametrize("subsample_size", [None, 50])
@pytest.mark.parametrize("name", list(PATH_ESTIMATORS))
def test_stl_and_dreg_have_zero_variance_at_the_exact_encoder(name, subsample_size):
    """The engine replays the guide with the encoder's weights detached, so log q depends on them
    only through z; at the exact posterior grad_z (log p - log q) = 0 for every draw."""
    problem = LinearGaussian(num_data=100)
    guide = problem.guide("exact")
    result = gradient_variance(
        PATH_ESTIMATORS[name](), problem.model, guide, problem.x, num_draws=20,
        subsample_size=subsample_size,
    )
    assert set(result.var) == {"amortized_z$$$encoder.weight", "amortized_z$$$encoder.bias"}
    assert result.total_variance < 1e-12, result.total_variance
    assert all(float(m.abs().max()) < 1e-10 for m in result.mean.values())


@pytest.mark.parametrize("factory", [lambda: ELBO(), lambda: IWELBO(8)], ids=["ELBO", "IWELBO"])
def test_reparam_gradient_is_noisy_at_the_exact_encoder(factory):
    """The contrast: the plain pathwise gradient keeps the encoder's direct term, whose variance
    does not vanish at the optimum (so the zero-variance test above can fail)."""
    problem = LinearGaussian(num_data=100)
    result = gradient_variance(factory(), problem.model, problem.guide("exact"), problem.x,
                               num_draws=20)
    assert result.total_variance > 1.0, result.total_variance


def test_guide_plate_picks_the_rows_the_model_observes():
    """With subsampling the guide draws the indices and the model replays them: at the exact
    encoder every element's log weight is log p(x_i) of the *same* row, for every particle."""
    problem = LinearGaussian(num_data=100)
    guide = problem.guide("exact")
    particles = run_particles(
        problem.model, guide, (problem.x,), {"subsample_size": 30}, num_particles=16,
        plate_nesting=1,
    )
    weights = importance_weights(particles, "test")
    idx = problem.indices[-1]
    assert idx.shape == (30,) and float(weights.scale) == pytest.approx(100 / 30)
    expected = problem.log_evidence(problem.x[idx])
    assert torch.allclose(weights.log_w, expected.expand(16, -1), atol=1e-10)


def test_minibatch_passed_as_data_is_scaled():
    """Data with fewer rows than the plate's size are the minibatch: every site is scaled by
    N / B and the minibatch IW bound averages to the full-data one."""
    problem = LinearGaussian(num_data=100)
    guide = problem.guide("exact", size="num_data", subsample_size=None)
    batch = problem.x[:25]
    trace = poutine.trace(guide).get_trace(batch, num_data=100)
    assert trace.nodes["z"]["scale"] == pytest.approx(4.0)
    assert trace.nodes["z"]["value"].shape == (25, 2)
    loss = IWELBO(4).loss(problem.batch_model, guide, batch, num_data=100)
    assert loss == pytest.approx(-4.0 * float(problem.log_evidence(batch).sum()), rel=1e-10)
    full = sum(IWELBO(4).loss(problem.batch_model, guide, problem.x[i : i + 25], num_data=100)
               for i in range(0, 100, 25)) / 4
    assert full == pytest.approx(-float(problem.log_evidence(problem.x).sum()), rel=1e-10)


def test_posterior_distributions_and_elbo_module():
    problem = LinearGaussian(num_data=50)
    guide = problem.guide("exact")
    q = posterior_of(guide, problem.x)
    assert q.batch_shape == (50,) and q.event_shape == (2,)
    assert torch.allclose(q.mean, problem.posterior_mean(problem.x))
    assert torch.allclose(q.stddev, problem.var.sqrt().expand(50, 2))
    assert posterior_of(guide, problem.x, joint=True).mean.shape == (50, 2)
    # obj(model, guide) is a torch module holding the encoder's weights
    module = IWELBO(4, estimator="dreg")(problem.model, guide)
    names = {n for n, _ in module.named_parameters()}
    assert names == {"guide.encoder.weight", "guide.encoder.bias"}
    module(problem.x).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_encoder_output_forms():
    """A (loc, scale) pair is used as is; a (loc, raw) pair with scale_transform; one tensor is
    split in halves with softplus."""

    class Pair(nn.Module):
        def __init__(self, transform=None):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.5))
            self.transform = transform

        def forward(self, x):
            return x * self.w, torch.full_like(x, -1.0 if self.transform else 0.3)

    x = torch.randn(5, 3)
    loc, scale = AmortizedNormal(Pair()).encode(x)
    assert torch.allclose(loc, 0.5 * x) and torch.allclose(scale, torch.full_like(x, 0.3))
    _, scale = AmortizedNormal(Pair(True), scale_transform="exp", min_scale=0.1).encode(x)
    assert torch.allclose(scale, torch.full_like(x, math.exp(-1.0) + 0.1))
    scalar = AmortizedNormal(nn.Linear(3, 2), event_dim=0)
    loc, scale = scalar.encode(x)
    assert loc.shape == scale.shape == (5,)
    assert scalar._distribution(x, plate_dims=True).event_shape == ()
    single = nn.Linear(3, 6)
    loc, scale = AmortizedNormal(single).encode(x)
    out = single(x)
    assert torch.allclose(loc, out[:, :3]) and torch.allclose(scale, nn.functional.softplus(out[:, 3:]))


def test_bad_input_is_named():
    problem = LinearGaussian(num_data=10)
    with pytest.raises(TypeError, match="encoder must be a torch.nn.Module"):
        AmortizedNormal(lambda x: x)
    with pytest.raises(ValueError, match="data must be"):
        AmortizedNormal(nn.Linear(2, 4), data=1.5)
    with pytest.raises(ValueError, match="data=2 names the model's argument 2"):
        AmortizedNormal(nn.Linear(2, 4), data=2, name="a")(problem.x)
    with pytest.raises(ValueError, match="'z'.*even size"):
        AmortizedNormal(nn.Linear(2, 3), name="b")(problem.x)

    class Negative(nn.Module):
        def forward(self, x):
            return x, -torch.ones_like(x)

    with pytest.raises(ValueError, match="'z'.*scale <= 0.*softplus"):
        AmortizedNormal(Negative(), name="c")(problem.x)
    with pytest.raises(ValueError, match="12 rows but the plate 'data' has size 10"):
        AmortizedNormal(nn.Linear(2, 4), size=10, name="d")(torch.randn(12, 2))
    # two guides under one name would share a store entry: refused, naming it
    AmortizedNormal(nn.Linear(2, 4))(problem.x)
    with pytest.raises(ValueError, match="already holds 'amortized_z\\$\\$\\$encoder.weight'"):
        AmortizedNormal(nn.Linear(2, 4))(problem.x)
    AmortizedNormal(nn.Linear(2, 4), name="other")(problem.x)


# ------------------------------------------------------------------------ ExactGuide

ORACLES = {
    "NormalNormal": lambda: NormalNormal.simulate(20, seed=1),
    "NormalNormal-D3": lambda: NormalNormal.simulate(15, 3, seed=2),
    "LinearRegression": lambda: LinearRegression.simulate(25, 3, seed=3),
    "BetaBernoulli": lambda: BetaBernoulli.simulate(30, seed=4),
    "GammaPoisson": lambda: GammaPoisson.simulate(25, seed=5),
    "DirichletCategorical": lambda: DirichletCategorical.simulate(40, 4, seed=6),
    "NormalGamma": lambda: NormalGamma.simulate(20, seed=7),
}


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("name", list(ORACLES))
def test_exact_guide_makes_every_bound_the_evidence(name, learnable):
    oracle = ORACLES[name]()
    guide = ExactGuide(oracle, learnable=learnable)
    log_evidence = float(oracle.log_evidence())
    model = oracle.model
    assert -ELBO(64).loss(model, guide) == pytest.approx(log_evidence, abs=1e-6)
    assert -IWELBO(64).loss(model, guide) == pytest.approx(log_evidence, abs=1e-6)
    assert CUBO(64).loss(model, guide) == pytest.approx(log_evidence, abs=1e-6)
    assert -InclusiveKL(8).loss(model, guide) == pytest.approx(log_evidence, abs=1e-6)
    result = check(oracle, guide, num_samples=200)
    assert abs(result.kl) < 1e-6 and abs(result.residual) < 1e-6


@pytest.mark.parametrize("name", list(ORACLES))
def test_exact_guide_has_zero_stl_and_dreg_variance(name):
    oracle = ORACLES[name]()
    guide = ExactGuide(oracle, learnable=True)
    for objective in (ELBO(estimator="stl"), ELBO(4, estimator="stl"), IWELBO(8, estimator="dreg")):
        result = gradient_variance(objective, oracle.model, guide, num_draws=10)
        assert result.var and result.total_variance < 1e-12, (objective, result.total_variance)
    # contrast: the reparam gradient is noisy there, and moving q off p opens every gap
    assert gradient_variance(ELBO(), oracle.model, guide, num_draws=10).total_variance > 1e-4
    store = pyro.get_param_store()
    with torch.no_grad():
        for key in store.keys():
            store._params[key].add_(0.2)
    log_evidence = float(oracle.log_evidence())
    assert -ELBO(2000).loss(oracle.model, guide) < log_evidence - 1e-3
    assert CUBO(2000).loss(oracle.model, guide) > log_evidence + 1e-3


def test_exact_guide_posterior_of():
    oracle = ORACLES["LinearRegression"]()
    q = posterior_of(ExactGuide(oracle))
    p = oracle.posterior()
    assert torch.equal(q.loc, p.loc) and torch.allclose(q.covariance_matrix, p.covariance_matrix)
    ng = ORACLES["NormalGamma"]()
    marginals = posterior_of(ExactGuide(ng))
    assert set(marginals) == {"precision", "loc"}
    assert torch.allclose(marginals["loc"].scale, ng.posterior().marginal("loc").scale)
    joint = posterior_of(ExactGuide(ng), joint=True)
    assert isinstance(joint, NormalGammaPosterior)
    with pytest.raises(TypeError, match="conjugate oracle"):
        ExactGuide(object())


# ------------------------------------------------------------------------ posterior_of


def mixed_model():
    """Real, positive, simplex, vector and plate-local latents, with some data."""
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Gamma(3.0, 2.0))
    c = pyro.sample("c", dist.Dirichlet(torch.ones(3)))
    d = pyro.sample("d", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("groups", 3, dim=-1):
        e = pyro.sample("e", dist.Normal(a, 1.0))
        pyro.sample("y", dist.Normal(e + d.sum() + c[..., :1], b), obs=torch.tensor([0.5, 1, 2]))


AUTOGUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": lambda m: AutoLowRankMultivariateNormal(m, rank=2),
}
SITES = ("a", "b", "c", "d", "e")
S = 100_000


def _flat(values):
    """``{site: (S, ...)}`` -> ``(S, 10)`` in the order of SITES."""
    return torch.cat([values[n].reshape(S, -1) for n in SITES], -1)


def _assert_same_moments(x, y, z=5.0):
    """Means, variances and covariances of two independent (S, d) samples agree within z SE."""
    n = x.shape[0]
    for stat in ("mean", "var", "cov") if x.shape[1] > 1 else ("mean", "var"):
        if stat == "mean":
            fx, fy = x, y
        elif stat == "var":
            fx, fy = (x - x.mean(0)) ** 2, (y - y.mean(0)) ** 2
        else:  # products of neighbouring coordinates
            xc, yc = x - x.mean(0), y - y.mean(0)
            fx, fy = xc[:, :-1] * xc[:, 1:], yc[:, :-1] * yc[:, 1:]
        se = ((fx.var(0) + fy.var(0)) / n).sqrt()
        gap = (fx.mean(0) - fy.mean(0)).abs()
        assert (gap < z * se).all(), (stat, gap / se)


@pytest.mark.parametrize("name", list(AUTOGUIDES))
def test_posterior_of_matches_guide_samples(name):
    guide = AUTOGUIDES[name](mixed_model)
    guide()
    torch.manual_seed(1)
    with torch.no_grad():  # move every parameter off its initial value
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with torch.no_grad(), pyro.plate("draws", S, dim=-2):
        trace = poutine.trace(guide).get_trace()
    drawn = {n: trace.nodes[n]["value"] for n in SITES}
    drawn = {n: v.reshape((S,) + v.shape[2:]) if n in "abcd" else v.reshape(S, 3)
             for n, v in drawn.items()}

    marginals = posterior_of(guide)
    assert set(marginals) == set(SITES)
    from_marginals = {n: marginals[n].sample((S,)) for n in SITES}
    for n in SITES:  # per site (the marginals carry no cross-site correlation)
        _assert_same_moments(from_marginals[n].reshape(S, -1), drawn[n].reshape(S, -1))
    joint = posterior_of(guide, joint=True)
    assert isinstance(joint, JointPosterior) and joint.latents == SITES
    _assert_same_moments(_flat(joint.sample((S,))), _flat(drawn))
    for n in ("a", "d"):  # closed-form moments where q is Gaussian
        assert torch.allclose(drawn[n].mean(0), marginals[n].mean, atol=5 * float(
            marginals[n].stddev.max()) / math.sqrt(S))

    # the joint density is the guide's own log q (every Jacobian included)
    with torch.no_grad(), pyro.plate("draws", 7, dim=-2):
        small = poutine.trace(guide).get_trace()
    small.compute_log_prob()
    log_q = sum(
        (site["log_prob"] + torch.zeros(7, 1)).reshape(7, -1).sum(-1)
        for site in small.nodes.values()
        if site["type"] == "sample"
    )
    values = {n: small.nodes[n]["value"] for n in SITES}
    values = {n: v.reshape((7,) + v.shape[2:]) if n in "abcd" else v.reshape(7, 3)
              for n, v in values.items()}
    assert torch.allclose(joint.log_prob(values), log_q, atol=1e-9)


def test_posterior_of_errors():
    with pytest.raises(TypeError, match="posterior_of does not know"):
        posterior_of(lambda: None)
    guide = AutoNormal(mixed_model)
    with pytest.raises(ValueError, match="either site= .* or joint=True"):
        posterior_of(guide, site="a", joint=True)
    with pytest.raises(KeyError, match="'nope'"):
        posterior_of(guide, site="nope")
