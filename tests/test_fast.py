"""The compiled fast path: same losses as the normal path, same posterior, and a clear fallback."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import kl_divergence

from pyro_elbo import ELBO, posterior_of
from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.fast import CompiledStep, compile_step
from pyro_elbo.fit import fit


def logistic_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5])), generator=gen)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)

    return model, (X, y)


@pytest.mark.parametrize("loss", [ELBO(), ELBO(4), ELBO(4, estimator="stl")], ids=repr)
def test_compiled_loss_and_gradient_match_normal_path(loss):
    """At fixed parameters the traced loss and its gradient have the same distribution as the
    normal path's.  (They are not draw-for-draw equal: under tracing torch draws standard normals
    with ``torch.normal`` instead of ``normal_``, a different stream.)"""
    model, args = logistic_problem()
    guide = AutoNormal(model, init_scale=0.5)
    step = compile_step(model, guide, *args, loss=loss, lr=0.01)
    assert isinstance(step, CompiledStep)

    def draws(evaluate, n=300):
        values = []
        for _ in range(n):
            value = evaluate()
            grads = torch.autograd.grad(value, step.params)
            values.append(torch.cat([value.reshape(1)] + [g.reshape(-1) for g in grads]))
        return torch.stack(values)

    eager = draws(lambda: loss.differentiable_loss(model, guide, *args))
    traced = draws(lambda: step._loss_and_grads.loss(*args))
    se = (eager.var(0) / len(eager) + traced.var(0) / len(traced)).sqrt()
    assert torch.all((eager.mean(0) - traced.mean(0)).abs() < 4 * se + 1e-6)


def test_compiled_fit_reaches_exact_posterior():
    oracle = LinearRegression.simulate(100, 3, seed=1, dtype=torch.float32)
    guide = AutoMultivariateNormal(oracle.model)
    step = compile_step(oracle.model, guide, loss=ELBO(8, estimator="stl"), lr=0.05)
    assert isinstance(step, CompiledStep)
    for _ in range(1500):
        step()
    kl = kl_divergence(posterior_of(guide), oracle.posterior())
    assert float(kl) < 0.01


def dynamic_model():
    """A model whose site ``extra`` comes and goes from one run to the next."""
    counter = {"n": 0}

    def model():
        counter["n"] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        if counter["n"] % 2:
            pyro.sample("extra", dist.Normal(loc, 1.0), obs=torch.tensor(0.0))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(1.0))

    return model


def test_dynamic_structure_falls_back_with_a_warning():
    model = dynamic_model()
    guide = AutoNormal(model)
    with pytest.warns(UserWarning, match="falling back.*structure changes"):
        step = compile_step(model, guide, lr=0.01)
    assert not isinstance(step, CompiledStep)
    assert isinstance(step(), float)


def test_compiled_fit_falls_back_on_dynamic_structure():
    model = dynamic_model()
    guide = AutoNormal(model)
    with pytest.warns(UserWarning, match=r"compile=True\): falling back .*structure changes"):
        result = fit(model, guide, num_steps=5, progress=False, init=None, compile=True)
    assert not result.compiled and len(result.losses) == 5
    assert all(math.isfinite(v) for v in result.losses)
