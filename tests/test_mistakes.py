"""A Pyro user's common mistakes, each caught with a message that names the site or argument:
through ``fit`` and through ``SVI(..., loss=pyro_elbo.ELBO())`` alike (the objectives run fit's
checks on their first call), and in the diagnostics (a guide that was never fitted)."""

import importlib
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

import pyro_elbo
from pyro_elbo.fit.data_checks import NoObservationsWarning
from pyro_elbo.fit.preflight import SupportMismatchError
from pyro_elbo.guides.unfitted import UnfittedGuideWarning

DATA = torch.distributions.Normal(1.0, 1.0).sample((50,))


def forgot_obs(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0))  # obs=x forgotten


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def kw_model(*, x):
    return model(x)


def lognormal_model(x):
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(0.0, s), obs=x)


def normal_guide_for_lognormal(x):
    pyro.sample("s", dist.Normal(pyro.param("s_loc", torch.tensor(0.0)), 1.0))


def hand_guide(x):
    loc = pyro.param("mu_loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 1.0))


def _svi(model, guide, objective=None):
    return SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=objective or pyro_elbo.ELBO())


def _messages(record, category=UserWarning, text=""):
    return [str(w.message) for w in record if issubclass(w.category, category)
            and text in str(w.message)]


# ------------------------------------------------------------------ forgetting obs=
def test_svi_warns_once_about_a_model_with_nothing_observed():
    pyro.clear_param_store()
    svi = _svi(forgot_obs, AutoNormal(forgot_obs))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            svi.step(DATA)
    found = _messages(record, NoObservationsWarning, text="no observed site")
    assert len(found) == 1
    assert [w.filename for w in record if "no observed site" in str(w.message)] == [__file__]
    assert "latent sites ['mu', 'obs'] are fitted to their prior" in found[0]
    assert "obs=" in found[0]


def test_fit_warns_once_about_a_model_with_nothing_observed():
    pyro.clear_param_store()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pyro_elbo.fit(forgot_obs, None, DATA, num_steps=5, progress=False, init=None)
    assert [w.filename for w in record if "no observed site" in str(w.message)] == [__file__]


def test_a_factor_counts_as_data():
    def factor_model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("like", -0.5 * (z - 1.0) ** 2)

    pyro.clear_param_store()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _svi(factor_model, AutoNormal(factor_model)).step()
    assert not _messages(record, text="no observed site")


# ------------------------------------------------------------------ numpy and list data
@pytest.mark.parametrize("convert, kind", [(lambda x: x.numpy(), "numpy array"),
                                           (lambda x: x.tolist(), "Python list")])
def test_fit_names_a_numpy_or_list_argument(convert, kind):
    pyro.clear_param_store()
    with pytest.raises(TypeError) as info:
        pyro_elbo.fit(model, AutoNormal(model), convert(DATA), num_steps=5, progress=False)
    text = str(info.value)
    assert f"the model's argument 1 (positional) is a {kind}" in text
    assert "site 'obs'" in text and "torch.as_tensor(data" in text


def test_fit_names_a_keyword_argument():
    pyro.clear_param_store()
    with pytest.raises(TypeError, match=r"the model's argument x= is a numpy array"):
        pyro_elbo.fit(kw_model, AutoNormal(kw_model), x=DATA.numpy(), num_steps=5,
                      progress=False)


def test_svi_names_a_numpy_argument():
    pyro.clear_param_store()
    svi = _svi(model, AutoNormal(model), pyro_elbo.IWELBO(4))
    with pytest.raises(TypeError, match=r"argument 1 \(positional\) is a numpy array \(dtype "
                                        r"float32\), used as the observed value of site 'obs'"):
        svi.step(DATA.numpy())


# ------------------------------------------------------------------ support mismatch in SVI
@pytest.mark.parametrize("validate", [True, False])
def test_svi_gives_the_support_mismatch_error(validate):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = _svi(lognormal_model, normal_guide_for_lognormal, pyro_elbo.ELBO(4))
    try:
        pyro.enable_validation(validate)
        with pytest.raises(SupportMismatchError, match="guide site 's': the guide's Normal has "
                                                       "support Real, which is not inside"):
            svi.step(DATA)
    finally:
        pyro.enable_validation(True)


def test_first_call_checks_run_once_and_draw_no_random_numbers(monkeypatch):
    preflight = importlib.import_module("pyro_elbo.fit.preflight")

    def run(check):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        if not check:
            monkeypatch.setattr(preflight, "check_pair", lambda *a, **k: None)
        calls = []
        original = preflight.check_pair
        monkeypatch.setattr(preflight, "check_pair",
                            lambda *a, **k: calls.append(1) or original(*a, **k))
        svi = _svi(model, AutoNormal(model), pyro_elbo.ELBO(2))
        losses = [svi.step(DATA) for _ in range(4)]
        monkeypatch.undo()
        return losses, len(calls)

    checked, calls = run(True)
    unchecked, _ = run(False)
    assert calls == 1
    assert checked == unchecked  # bit for bit: the check consumed no random numbers


# ------------------------------------------------------------------ a guide never fitted
def test_to_inference_data_warns_about_a_guide_never_fitted():
    pyro.clear_param_store()
    with pytest.warns(UnfittedGuideWarning, match="to_inference_data: the guide AutoNormal has "
                                                  "never been fitted") as record:
        pyro_elbo.to_inference_data(model, AutoNormal(model), DATA, num_samples=20)
    assert record[0].filename == __file__  # points at the user's line


@pytest.mark.parametrize("function", ["diagnose", "evidence_bounds"])
def test_diagnose_warns_about_a_hand_written_guide_never_fitted(function):
    pyro.clear_param_store()
    with pytest.warns(UnfittedGuideWarning,
                      match=f"{function}: the guide hand_guide has never") as record:
        getattr(pyro_elbo, function)(model, hand_guide, DATA, num_samples=200)
    assert record[0].filename == __file__


def test_no_warning_for_a_fitted_guide():
    pyro.clear_param_store()
    guide = AutoNormal(model)
    pyro_elbo.fit(model, guide, DATA, num_steps=3, progress=False)
    _svi(model, hand_guide).step(DATA)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pyro_elbo.to_inference_data(model, guide, DATA, num_samples=20)
        pyro_elbo.diagnose(model, hand_guide, DATA, num_samples=200)
        pyro_elbo.posterior_of(guide)
    assert not [w for w in record if issubclass(w.category, UnfittedGuideWarning)]


def test_posterior_of_a_guide_never_run_says_how_to_pass_the_arguments():
    pyro.clear_param_store()
    guide = AutoNormal(model)
    with pytest.warns(UnfittedGuideWarning), pytest.raises(TypeError) as info:
        pyro_elbo.posterior_of(guide)
    assert "pass them as posterior_of(guide, *model_args, **model_kwargs)" in str(info.value)
    with pytest.warns(UnfittedGuideWarning, match="posterior_of: the guide AutoNormal"):
        q = pyro_elbo.posterior_of(guide, DATA)
    assert float(q.mean) == pytest.approx(0.0, abs=3.0)  # the initial guide, as warned
    assert isinstance(np.asarray(q.sample()), np.ndarray)
