"""fit's checks before step 1: one test per case of issue 5, item 6.

Every case asserts the exception type, that the message names the site or argument, and (through
a callback that would record it) that no optimization step was taken.
"""

import functools

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_elbo.engine.validation import ModelGuideMismatchError
from pyro_elbo.fit import PlateMismatchError, SupportMismatchError, fit
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.iwelbo import IWELBO

DATA = torch.tensor([0.3, -0.2, 1.1, 0.4])


def normal_model(data=DATA):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def normal_guide(data=DATA):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def run(model, guide, *args, **kwargs):
    """fit with a callback that fails the test if a step is ever taken."""

    def no_step(state):
        raise AssertionError(f"step {state.step} ran although the check should have failed")

    return fit(
        model,
        guide,
        *args,
        num_steps=kwargs.pop("num_steps", 5),
        progress=False,
        callbacks=(no_step,),
        **kwargs,
    )


def test_a_good_pair_passes():
    result = fit(normal_model, normal_guide, num_steps=3, progress=False)
    assert result.num_steps == 3


# ------------------------------------------------------------------ structure


def test_guide_missing_a_latent_site():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'b'.*missing from the guide"):
        run(model, guide)


def test_guide_site_absent_from_model():
    def guide(data=DATA):
        normal_guide(data)
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'extra' does not appear in the model"):
        run(normal_model, guide)


def test_auxiliary_guide_site_is_allowed():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        u = pyro.sample(
            "u", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0), infer={"is_auxiliary": True}
        )
        pyro.sample("z", dist.Delta(u))

    assert fit(model, guide, num_steps=2, progress=False).num_steps == 2


def test_guide_sampling_an_observed_site():
    def guide(data=DATA):
        normal_guide(data)
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'x', which is an observed site"):
        run(normal_model, guide)


def test_batch_shape_mismatch():
    def model():
        with pyro.plate("p", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(4)), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match=r"site 'z'.*shape \(4,\).*\(3,\)"):
        run(model, guide)


def test_event_shape_mismatch():
    def model():
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.sample("w", dist.Normal(pyro.param("m", torch.zeros(2)), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match=r"site 'w'.*shape \(2,\).*\(3,\)"):
        run(model, guide)


# ------------------------------------------------------------------ supports


@pytest.mark.parametrize(
    "prior",
    [dist.Gamma(2.0, 1.0), dist.Beta(2.0, 2.0), dist.HalfCauchy(1.0)],
    ids=["gamma", "beta", "halfcauchy"],
)
def test_normal_guide_for_a_constrained_latent(prior):
    def model():
        pyro.sample("rate", prior)

    def guide():
        pyro.sample("rate", dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.1))

    with pytest.raises(SupportMismatchError, match="'rate'.*Normal.*not inside the support"):
        run(model, guide)


def test_lognormal_guide_for_a_beta_latent():
    # positive is not inside the unit interval
    def model():
        pyro.sample("p", dist.Beta(2.0, 2.0))

    def guide():
        pyro.sample("p", dist.LogNormal(pyro.param("m", torch.tensor(-1.0)), 0.1))

    with pytest.raises(SupportMismatchError, match="'p'"):
        run(model, guide)


def test_matching_supports_pass():
    def model():
        pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("s", dist.Dirichlet(torch.ones(3)))

    def guide():
        pyro.sample("rate", dist.LogNormal(pyro.param("m", torch.tensor(0.0)), 0.1))
        pyro.sample(
            "p",
            dist.Kumaraswamy(
                2.0, pyro.param("b", torch.tensor(2.0), constraint=dist.constraints.positive)
            ),
        )
        pyro.sample(
            "s",
            dist.Dirichlet(pyro.param("c", torch.ones(3), constraint=dist.constraints.positive)),
        )

    assert fit(model, guide, num_steps=2, progress=False).num_steps == 2
    pyro.clear_param_store()
    # autoguides sample Delta sites with a nominal real support: no false alarm
    assert fit(model, AutoNormal(model), num_steps=2, progress=False).num_steps == 2


def test_delta_guide_outside_the_support():
    def model():
        pyro.sample("rate", dist.Gamma(2.0, 1.0))

    def guide():
        pyro.sample("rate", dist.Delta(pyro.param("r", torch.tensor(-1.0))))

    with pytest.raises(SupportMismatchError, match="'rate' is a point mass"):
        run(model, guide)


# ------------------------------------------------------------------ estimators and enumeration


def bernoulli_model():
    c = pyro.sample("c", dist.Bernoulli(0.3))
    pyro.sample("x", dist.Normal(c, 1.0), obs=torch.tensor(0.8))


def bernoulli_guide():
    p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
    pyro.sample("c", dist.Bernoulli(p))


@pytest.mark.parametrize(
    "loss", [IWELBO(4, estimator="stl"), IWELBO(4, estimator="dreg")], ids=["stl", "dreg"]
)
def test_discrete_guide_site_under_a_pathwise_estimator(loss):
    with pytest.raises(ValueError, match=r"guide site 'c' is discrete.*pathwise"):
        run(bernoulli_model, bernoulli_guide, loss=loss)


def test_discrete_guide_site_under_score_function_is_fine():
    result = fit(bernoulli_model, bernoulli_guide, loss=ELBO(), num_steps=3, progress=False)
    assert result.num_steps == 3


def test_enumerated_guide_site_under_a_monte_carlo_objective():
    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "parallel"})

    # as Trace_ELBO: a warning, and the site is sampled
    with pytest.warns(UserWarning, match="configured for enumeration: c"):
        fit(bernoulli_model, guide, loss=ELBO(2), num_steps=2, progress=False)


def test_enumerated_model_site_under_a_monte_carlo_objective():
    @pyro.infer.config_enumerate
    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(loc + c, 1.0), obs=torch.tensor(0.8))

    def guide():
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    for loss in (ELBO(), Trace_ELBO()):
        with pytest.raises(NotImplementedError, match="model site 'c' is enumerated"):
            run(model, guide, loss=loss)
    # the objective that can sum it out runs
    result = fit(
        model,
        guide,
        loss=pyro.infer.TraceEnum_ELBO(max_plate_nesting=0),
        num_steps=2,
        progress=False,
    )
    assert result.num_steps == 2


# ------------------------------------------------------------------ plates


def test_plate_size_mismatch():
    def model():
        with pyro.plate("groups", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        with pyro.plate("groups", 4):
            pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(4)), 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'groups'|'z'"):
        run(model, guide)


def test_plate_full_size_mismatch_under_subsampling():
    # the guide subsamples the data plate; the model declares the wrong full size, so the two
    # programs would scale the minibatch by different factors (200/10 vs 100/10)
    data = torch.randn(100)

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 200) as idx:
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    def guide(data):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("z", dist.Normal(pyro.param("zm", torch.zeros(100))[idx], 1.0))

    # (the engine's structural check sees the different scales first; either names the site)
    with pytest.raises(ModelGuideMismatchError, match="'z'|plate 'data' has size 200"):
        run(model, guide, data)


def test_plate_name_mismatch():
    def model():
        with pyro.plate("groups", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        with pyro.plate("clusters", 3):
            pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(3)), 1.0))

    with pytest.raises(PlateMismatchError, match=r"'z' is inside plate\(s\) \['groups'\]"):
        run(model, guide)


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_observed_data(bad):
    data = DATA.clone()
    data[2] = bad
    with pytest.raises(ValueError, match=r"observed site 'x' has 1 non-finite.*index \(2,\)"):
        run(normal_model, normal_guide, data)


def test_masked_nan_in_observed_data_is_allowed():
    data = DATA.clone()
    data[2] = float("nan")
    mask = torch.isfinite(data)

    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)), pyro.poutine.mask(mask=mask):
            pyro.sample(
                "x", dist.Normal(z, 1.0), obs=torch.where(mask, data, torch.zeros_like(data))
            )

    assert fit(model, normal_guide, data, num_steps=2, progress=False).num_steps == 2


def test_initial_log_density_infinite():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("barrier", torch.where(z > 100.0, 0.0, float("-inf")))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="log-density of model site 'barrier' is -inf"):
        run(model, guide)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "loss, error, match",
    [
        (ELBO, TypeError, r"loss=ELBO is a class; pass an instance"),
        ("elbo", TypeError, "loss must be a pyro_elbo objective"),
        (Trace_ELBO(num_particles=0), ValueError, "num_particles=0"),
        (Trace_ELBO(max_plate_nesting=-1), ValueError, "max_plate_nesting=-1"),
    ],
    ids=["class", "string", "particles", "nesting"],
)
def test_invalid_objective(loss, error, match):
    with pytest.raises(error, match=match):
        run(normal_model, normal_guide, loss=loss)


def test_invalid_objective_arguments_at_construction():
    with pytest.raises(ValueError, match="estimator"):
        ELBO(estimator="pathwise")
    with pytest.raises(ValueError, match="num_particles"):
        IWELBO(num_particles=0)


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"num_steps": -3}, "num_steps must be a positive integer"),
        ({"num_steps": 2.5}, "num_steps must be a positive integer"),
        ({"num_steps": None, "max_steps": 0}, "max_steps must be a positive integer"),
        ({"num_steps": None, "max_steps": True}, "max_steps must be a positive integer"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a positive integer"),
        ({"skip_nonfinite": -1}, "skip_nonfinite must be a non-negative integer"),
    ],
)
def test_invalid_step_counts(setting, match):
    with pytest.raises(ValueError, match=match):
        run(normal_model, normal_guide, **setting)


@pytest.mark.parametrize(
    "optim, match",
    [
        ("adam", "optim must be a Pyro or torch optimizer"),
        (0.01, "optim must be a Pyro or torch optimizer"),
        (pyro.optim.Adam, r"optim=pyro.optim.Adam is the optimizer's constructor"),
        (torch.nn.Linear(1, 1), "optim must be a Pyro or torch optimizer"),
    ],
    ids=["string", "float", "pyro-class", "module"],
)
def test_not_an_optimizer(optim, match):
    with pytest.raises(TypeError, match=match):
        run(normal_model, normal_guide, optim=optim)


@pytest.mark.parametrize(
    "optim",
    [
        pyro.optim.Adam({"lr": 0.01}),
        functools.partial(torch.optim.SGD, lr=0.01),
        torch.optim.Adam,
    ],
    ids=["pyro", "partial", "class"],
)
def test_accepted_optimizers(optim):
    result = fit(normal_model, normal_guide, optim=optim, num_steps=3, progress=False)
    assert result.num_steps == 3
    assert pyro.param("loc").item() != 0.0  # the optimizer moved the parameters


def test_torch_optimizer_instance_missing_parameters():
    other = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not hold the parameters \['loc', 'scale'\]"):
        run(normal_model, normal_guide, optim=torch.optim.Adam([other]))


def test_guide_with_no_parameters():
    def guide(data=DATA):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"the guide 'guide' has no parameters"):
        run(normal_model, guide)


def test_guide_without_parameters_but_model_with_some_warns():
    def model(data=DATA):
        shift = pyro.param("shift", torch.tensor(0.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z + shift, 1.0), obs=data)

    def guide(data=DATA):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="has no parameters; only the model's parameters"):
        result = fit(model, guide, num_steps=2, progress=False)
    assert result.num_steps == 2


def test_other_settings():
    with pytest.raises(ValueError, match="progress must be True, False or 'auto'"):
        fit(normal_model, normal_guide, num_steps=2, progress="yes")
    with pytest.raises(TypeError, match=r"callbacks\[0\] is not callable"):
        fit(normal_model, normal_guide, num_steps=2, progress=False, callbacks=(1,))
    with pytest.raises(ValueError, match="convergence must be"):
        fit(normal_model, normal_guide, progress=False, convergence="fast")
    with pytest.raises(ValueError, match="pass max_steps=... instead of num_steps"):
        fit(normal_model, normal_guide, num_steps=5, progress=False, convergence="relative")
    with pytest.raises(TypeError, match="compile must be True or False"):
        fit(normal_model, normal_guide, num_steps=5, progress=False, compile="yes")
    with pytest.raises(ValueError, match="init must be 'auto'"):
        fit(normal_model, normal_guide, num_steps=5, progress=False, init="map")
