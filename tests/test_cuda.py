"""Everything runs on CUDA when data and parameters are there (skipped without a GPU)."""

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import kl_divergence

import pyro_elbo
from pyro_elbo.conjugate import LinearRegression

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OBJECTIVES = [
    pyro_elbo.ELBO(4),
    pyro_elbo.ELBO(4, estimator="stl"),
    pyro_elbo.ELBO(4, estimator="score"),
    pyro_elbo.ELBO(4, analytic_kl=True),
    pyro_elbo.IWELBO(8),
    pyro_elbo.IWELBO(8, estimator="dreg"),
    pyro_elbo.CUBO(8),
    pyro_elbo.InclusiveKL(8),
]


def cuda_oracle():
    return LinearRegression.simulate(100, 3, seed=0, dtype=torch.float64).to("cuda")


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal])
def test_objectives_step_on_cuda(objective, guide_class):
    oracle = cuda_oracle()
    guide = guide_class(oracle.model, init_scale=0.5)
    svi = SVI(oracle.model, guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    loss = svi.step()
    assert torch.isfinite(torch.tensor(loss))
    for name, value in pyro.get_param_store().items():
        assert value.device.type == "cuda", name


def test_fit_on_cuda_reaches_exact_posterior():
    oracle = cuda_oracle()
    guide = AutoMultivariateNormal(oracle.model)
    svi = SVI(oracle.model, guide, pyro.optim.Adam({"lr": 0.05}), loss=pyro_elbo.ELBO(8, estimator="stl"))
    for _ in range(1500):
        svi.step()
    assert float(kl_divergence(pyro_elbo.posterior_of(guide), oracle.posterior())) < 0.01


def test_compiled_fit_on_cuda_reaches_exact_posterior():
    """The compiled step (one inductor graph per step) with CUDA parameters and data."""
    oracle = cuda_oracle()
    guide = AutoMultivariateNormal(oracle.model)
    result = pyro_elbo.fit(oracle.model, guide, loss=pyro_elbo.ELBO(8, estimator="stl"),
                           optim=pyro.optim.Adam({"lr": 0.05}), num_steps=1500, seed=0,
                           progress=False, init=None, compile=True)
    assert result.compiled, result.compiled.reason
    assert float(kl_divergence(pyro_elbo.posterior_of(guide), oracle.posterior())) < 0.01
