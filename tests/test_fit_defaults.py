"""``fit``'s stage before step 1 (recommended guide and objective, the Laplace stage, WhitenedAdam)
and ``fit(compile=True)``, the compiled fast path, against the normal path."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import kl_divergence

from pyro_elbo.conjugate import LinearRegression, NormalNormal
from pyro_elbo.fit import fit
from pyro_elbo.fit.initial import run_laplace
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.init.conditioning import WhitenedAdam
from pyro_elbo.objectives.elbo import ELBO


def linreg(seed=0, dtype=torch.float64):
    return LinearRegression.simulate(200, 4, seed=seed, dtype=dtype)


# ------------------------------------------------------------------ the Laplace stage


def test_laplace_stage_puts_a_full_rank_guide_at_the_exact_posterior_before_step_1():
    oracle = linreg()
    guide = AutoMultivariateNormal(oracle.model)
    result = fit(oracle.model, guide, num_steps=1, loss=ELBO(4, estimator="stl"),
                 progress=False, seed=0)
    assert result.init.ran and "L-BFGS" in result.init.message
    # the posterior is Gaussian: N(mode, H^-1) is exact, and STL leaves it there (a zero
    # gradient at the exact posterior, so one whitened Adam step does not move it)
    kl = float(kl_divergence(posterior_of(guide), oracle.posterior()))
    assert kl < 1e-8


def test_laplace_stage_with_the_users_optimizer_and_pyro_defaults_guide():
    """Pyro's default AutoNormal and the user's optimizer (here one that does not move, to see
    the stage's answer): the stage sets the means to the mode, which is the exact posterior mean
    of a linear regression, and each scale to the conditional sd 1 / sqrt(H_ii), the mean-field
    optimum for a Gaussian posterior (Bishop 2006, sec. 10.1.2)."""
    oracle = linreg()
    guide = AutoNormal(oracle.model, init_scale=0.1)
    optim = pyro.optim.SGD({"lr": 0.0})
    result = fit(oracle.model, guide, optim=optim, loss=ELBO(), num_steps=1, progress=False,
                 seed=0)
    assert result.init.ran and result.optim is optim  # the user's optimizer is kept
    q = posterior_of(guide)
    q = q["weights"] if isinstance(q, dict) else q
    exact = oracle.posterior()
    assert torch.allclose(q.mean, exact.mean, rtol=0, atol=1e-8 * float(exact.stddev.min()))
    conditional_sd = exact.precision_matrix.diagonal().rsqrt()
    assert torch.allclose(q.stddev, conditional_sd, rtol=1e-8)


def test_init_none_starts_from_the_guide_as_it_is():
    oracle = NormalNormal(torch.tensor([2.0, 3.0, 4.0]))
    guide = AutoNormal(oracle.model)
    result = fit(oracle.model, guide, num_steps=1, progress=False, seed=0, init=None,
                 loss=ELBO(), optim=pyro.optim.SGD({"lr": 0.0}))
    assert not result.init.ran and "init=None" in result.init.message
    assert float(pyro.param("AutoNormal.locs.loc")) == 0.0  # untouched


def test_auto_skips_what_it_cannot_set_and_laplace_says_why():
    oracle = NormalNormal(torch.tensor([2.0, 3.0, 4.0]))

    def guide():
        loc = pyro.param("m", torch.tensor(0.0))
        pyro.sample("loc", dist.Normal(loc, 1.0))

    result = fit(oracle.model, guide, num_steps=2, progress=False)
    assert not result.init.ran and "not an autoguide" in result.init.message
    with pytest.raises(ValueError, match=r"init='laplace'.*not an autoguide.*init=None"):
        fit(oracle.model, guide, num_steps=2, progress=False, init="laplace")

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 40, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    batches = [(torch.randn(8),) for _ in range(3)]
    result = fit(model, AutoNormal(model), data=batches, num_steps=3, progress=False)
    assert not result.init.ran and "minibatches" in result.init.message
    with pytest.raises(ValueError, match="mode of one minibatch"):
        fit(model, AutoNormal(model), data=batches, num_steps=3, progress=False, init="laplace")


def test_auto_skips_a_subsampling_model():
    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 40, subsample_size=10):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.zeros(10))

    result = fit(model, AutoNormal(model), num_steps=2, progress=False)
    assert not result.init.ran and "subsampl" in result.init.message


def test_a_failing_laplace_stage_leaves_the_guide_as_it_was(monkeypatch):
    oracle = NormalNormal(torch.tensor([2.0, 3.0, 4.0]))
    guide = AutoNormal(oracle.model)

    def broken(model, guide, *args, **kwargs):
        with guide._pyro_context:  # writes into the guide, then fails
            guide.locs.loc = torch.tensor(123.0)
        raise RuntimeError("linesearch exploded")

    monkeypatch.setattr("pyro_elbo.init.laplace.laplace_init", broken)
    with pytest.warns(UserWarning, match=r"Laplace stage failed \(RuntimeError: linesearch"):
        result = fit(oracle.model, guide, num_steps=1, progress=False, seed=0, loss=ELBO(),
                     optim=pyro.optim.SGD({"lr": 0.0}))
    assert not result.init.ran and result.optim is not None
    assert float(pyro.param("AutoNormal.locs.loc")) == 0.0  # put back, not 123
    with pytest.raises(RuntimeError, match="linesearch exploded"):
        fit(oracle.model, guide, num_steps=1, progress=False, init="laplace")


def test_the_stage_draws_no_random_numbers():
    oracle = linreg()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run_laplace("auto", oracle.model, AutoMultivariateNormal(oracle.model), (), {},
                        batched=False)
    assert torch.equal(torch.rand(3), expected)


def test_no_guide_takes_the_recommended_one_and_returns_it():
    oracle = linreg()
    result = fit(oracle.model, None, seed=0, progress=False, method="svi")
    assert isinstance(result.guide, AutoMultivariateNormal)
    assert isinstance(result.optim, WhitenedAdam) and result.loss.estimator == "stl"
    assert result.converged and result.num_steps < 10_000
    kl = float(kl_divergence(posterior_of(result.guide), oracle.posterior()))
    assert kl < 0.01


# ------------------------------------------------------------------ compile=True


def logistic(num_data=300, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(num_data, dim, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, dim)), generator=gen)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)

    return model, X, y


@pytest.mark.parametrize("estimator", ["reparam", "stl"])
def test_compiled_fit_gives_the_normal_paths_losses_and_parameters(estimator, monkeypatch):
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")  # the captured graph as is
    model, X, y = logistic()
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        guide = AutoNormal(model)
        result = fit(model, guide, X, y, loss=ELBO(2, estimator=estimator), num_steps=150,
                     seed=0, progress=False, init=None, compile=compiled)
        assert bool(result.compiled) is compiled, result.compiled
        store = pyro.get_param_store()
        runs.append((result.losses, {n: store[n].detach().clone() for n in store.keys()}))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a.shape == losses_b.shape == (150,)
    assert abs(losses_a - losses_b).max() < 1e-4 * abs(losses_a).max()
    for name in params_a:
        assert torch.allclose(params_a[name], params_b[name], atol=1e-5), name


def test_compiled_fit_with_the_default_pipeline_reaches_the_exact_posterior():
    oracle = linreg()
    result = fit(oracle.model, None, seed=0, progress=False, compile=True)
    assert result.compiled and result.init.ran and result.converged
    kl = float(kl_divergence(posterior_of(result.guide), oracle.posterior()))
    assert kl < 0.01


def test_compiled_fit_retraces_for_a_smaller_last_batch(monkeypatch):
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")  # the captured graph as is
    data = torch.linspace(-2, 3, 20)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 20, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    batches = [(data[:8],), (data[8:16],), (data[16:],)]  # 8, 8, 4
    runs = []
    for compiled in (False, True):
        pyro.clear_param_store()
        result = fit(model, AutoNormal(model), data=batches, loss=ELBO(2), num_steps=30,
                     seed=1, progress=False, compile=compiled)
        runs.append(result.losses)
        assert bool(result.compiled) is compiled
    assert abs(runs[0] - runs[1]).max() < 1e-4 * abs(runs[0]).max()


def test_compiled_fit_takes_plain_constants_and_falls_back_on_other_arguments(monkeypatch):
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")  # the capture is what counts

    def model(scale, names=None):
        pyro.sample("x", dist.Normal(pyro.sample("loc", dist.Normal(0.0, scale)), 1.0),
                    obs=torch.tensor(1.0))

    result = fit(model, AutoNormal(model), 2.0, num_steps=3, progress=False, compile=True)
    assert result.compiled  # a float is a constant of the graph (one graph per value)
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match=r"argument 'names' is a list: only tensors and plain"):
        result = fit(model, AutoNormal(model), 2.0, names=["a"], num_steps=3, progress=False,
                     compile=True)
    assert not result.compiled and "is a list" in result.compiled.reason


def test_the_density_check_runs_after_the_laplace_stage():
    """A raw-scale Poisson GLM: the guide's own first draw (beta ~ N(0, 0.1), x ~ 1500)
    overflows exp, so without the Laplace stage fit refuses to start, naming the site; the
    Laplace stage starts from the prior's mean and puts the guide where the density is finite."""
    gen = torch.Generator().manual_seed(2)
    x = 1500.0 + 100.0 * torch.randn(200, generator=gen)
    y = torch.poisson(torch.exp(1.0 - 5e-4 * x), generator=gen)

    def model(x, y):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Poisson(torch.exp(alpha + beta * x)), obs=y)

    with pytest.raises(ValueError, match=r"model site 'obs' is .* at the guide's initial draw"):
        fit(model, AutoNormal(model), x, y, num_steps=5, progress=False, seed=0, init=None)
    pyro.clear_param_store()
    result = fit(model, None, x, y, seed=0, progress=False, escalate=False)
    assert result.init.ran and result.converged
    assert all(math.isfinite(v) for v in result.losses)


def _knocked_off(dim):
    """LinearRegression(D) with the guide at its Laplace answer, then 1 sd off along every
    whitened direction and 1.5x too wide."""
    from pyro_elbo.init.laplace import laplace_init

    oracle = LinearRegression.simulate(1000, dim, seed=0, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(oracle.model)
    laplace_init(oracle.model, guide)
    with guide._pyro_context:
        tril = (guide.scale[:, None] * guide.scale_tril).detach()
        guide.loc.data = guide.loc.data + tril @ torch.ones(dim, dtype=torch.float64)
        guide.scale = 1.5 * guide.scale.detach()
    return oracle, guide


def test_the_whitened_step_shrinks_with_the_dimension():
    """At D = 50 a whitened step of 0.05 (eps 0.1) multiplies the error (the STL noise in the
    D^2 Cholesky coordinates); fit's default, 0.05 * sqrt(20 / D) with eps 1, converges."""
    from pyro_elbo.init.conditioning import default_lr, whitened_optim

    assert default_lr(5) == 0.05 and default_lr(80) == pytest.approx(0.025)
    kls = {}
    for label in ("fixed", "default"):
        oracle, guide = _knocked_off(50)
        optim = WhitenedAdam(guide, 0.05, eps=0.1) if label == "fixed" else whitened_optim(guide)
        svi = pyro.infer.SVI(oracle.model, guide, optim, ELBO(4, estimator="stl"))
        with pyro.validation_enabled(False):
            for _ in range(400):
                svi.step()
        kls[label] = float(kl_divergence(posterior_of(guide), oracle.posterior()))
    assert kls["fixed"] > 1.0, kls
    assert kls["default"] < 1e-3, kls
