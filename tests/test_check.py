"""check(): identity (1) of MATH.md, log p(x) = ELBO + KL(q || p(z|x)), on every oracle."""

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value
from torch.distributions import kl_divergence

from pyro_elbo import ELBO
from pyro_elbo.conjugate import (
    BetaBernoulli,
    DirichletCategorical,
    GammaPoisson,
    LinearRegression,
    NormalGamma,
    NormalNormal,
)
from pyro_elbo.diagnostics.check import check


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


ORACLES = {
    "NormalNormal": lambda: NormalNormal.simulate(20, seed=1, dtype=torch.float64),
    "NormalNormal-D3": lambda: NormalNormal.simulate(20, 3, seed=2, dtype=torch.float64),
    "LinearRegression": lambda: LinearRegression.simulate(50, 3, seed=3, dtype=torch.float64),
    "BetaBernoulli": lambda: BetaBernoulli.simulate(30, seed=4, dtype=torch.float64),
    "GammaPoisson": lambda: GammaPoisson.simulate(30, seed=5, dtype=torch.float64),
    "DirichletCategorical": lambda: DirichletCategorical.simulate(40, 3, seed=6, dtype=torch.float64),
    "NormalGamma": lambda: NormalGamma.simulate(25, seed=7, dtype=torch.float64),
}


def fitted(oracle, guide_class, steps=400):
    guide = guide_class(oracle.model)
    svi = SVI(oracle.model, guide, pyro.optim.Adam({"lr": 0.05}), loss=ELBO(4, estimator="stl"))
    for _ in range(steps):
        svi.step()
    return guide


def wrong(oracle, guide_class):
    """A guide far from the posterior: centred on a prior draw, unit scale."""
    with torch.no_grad():
        prior_draw = pyro.poutine.trace(oracle.model).get_trace().nodes
    values = {name: prior_draw[name]["value"] for name in oracle.latents}
    return guide_class(oracle.model, init_loc_fn=init_to_value(values=values), init_scale=1.0)


@pytest.mark.parametrize("name", list(ORACLES))
@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal])
@pytest.mark.parametrize("quality", ["fitted", "wrong"])
def test_identity_holds_within_4_se(name, guide_class, quality):
    pyro.set_rng_seed(0)
    oracle = ORACLES[name]()
    guide = fitted(oracle, guide_class) if quality == "fitted" else wrong(oracle, guide_class)
    result = check(oracle, guide, num_samples=4000)
    assert result.residual_se > 0
    assert abs(result.residual) < 4 * result.residual_se, result
    assert result.kl > -4 * max(result.kl_se, 1e-12)
    if quality == "fitted":  # mean field can't reach 0 on Dirichlet / NormalGamma posteriors
        assert result.kl < 0.25, result
    else:
        assert result.kl > 0.5, result


def test_closed_form_and_monte_carlo_kl_agree():
    """The same q read two ways: AutoNormal (closed-form KL) and a hand-written guide (MC KL)."""
    oracle = ORACLES["NormalNormal"]()
    guide = AutoNormal(oracle.model, init_scale=0.5)
    guide()
    loc, scale = guide._get_loc_and_scale("loc")

    def hand_written():
        pyro.sample("loc", pyro.distributions.Normal(loc.detach(), scale.detach()))

    closed = check(oracle, guide, num_samples=4000)
    monte_carlo = check(oracle, hand_written, num_samples=4000)
    assert closed.kl_closed_form and not monte_carlo.kl_closed_form
    assert closed.kl_se == 0.0
    exact = float(kl_divergence(torch.distributions.Normal(loc, scale), oracle.posterior()))
    assert closed.kl == pytest.approx(exact, rel=1e-10)
    assert abs(monte_carlo.kl - exact) < 4 * monte_carlo.kl_se


def test_bad_num_samples():
    oracle = ORACLES["NormalNormal"]()
    with pytest.raises(ValueError, match="num_samples"):
        check(oracle, AutoNormal(oracle.model), num_samples=0)
