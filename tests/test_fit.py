"""``pyro_elbo.fit``: convergence, NaN guard, reproducibility, Pyro's ELBOs, result object.

Exact references: the LinearRegression oracle's MultivariateNormal posterior (KL in closed form),
NormalNormal's Normal posterior, split-R-hat against ArviZ, ESS against the AR(1) formula, the
Fisher information of a Normal in closed form.
"""

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_elbo.conjugate import LinearRegression, NormalNormal
from pyro_elbo.fit import (
    NonFiniteError,
    RelativeTolerance,
    effective_sample_size,
    fit,
    split_rhat,
)
from pyro_elbo.fit.convergence import fisher_diagonal
from pyro_elbo.objectives.elbo import ELBO


def adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)


def unconstrained(names):
    store = pyro.get_param_store()
    return torch.cat([store[n].unconstrained().detach().reshape(-1) for n in names])


# ------------------------------------------------------------------ diagnostics


def test_split_rhat_matches_arviz():
    az = pytest.importorskip("arviz")
    g = torch.Generator().manual_seed(0)
    trend = torch.linspace(0, 1, 400, dtype=torch.float64)[:, None] * torch.arange(4)
    x = torch.randn(400, 4, generator=g, dtype=torch.float64) + trend
    ours = split_rhat(x, jitter=0.0)
    for i in range(4):
        # split-R-hat of one chain = classic R-hat of its two halves
        ref = az.rhat(x[:, i].numpy().reshape(2, 200), method="identity")
        assert float(ours[i]) == pytest.approx(float(ref), rel=1e-10)
    assert float(ours[0]) < 1.05 and float(ours[3]) > 1.1


def test_effective_sample_size_of_ar1():
    # AR(1) with coefficient rho: ESS = n (1 - rho) / (1 + rho); 32 independent series give the
    # estimator's standard error
    g = torch.Generator().manual_seed(1)
    n, k, rho = 4000, 32, 0.5
    noise = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.empty(n, k, dtype=torch.float64)
    x[0] = noise[0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    ess = effective_sample_size(x)
    expected = n * (1 - rho) / (1 + rho)
    se = float(ess.std()) / math.sqrt(k)
    assert abs(float(ess.mean()) - expected) < 5 * se
    white = effective_sample_size(torch.randn(n, 8, generator=g, dtype=torch.float64))
    assert abs(float(white.mean()) - n) < 5 * float(white.std()) / math.sqrt(8)
    assert float(effective_sample_size(torch.ones(50, 1))[0]) == 50.0


def test_fisher_diagonal_of_a_normal_guide():
    # q = Normal(loc, exp(u)): F_loc = 1 / sigma^2 and F_u = E[(chi2_1 - 1)^2] = 2
    sigma = 0.5

    def guide():
        loc = pyro.param("loc", torch.tensor(0.3))
        scale = pyro.param("scale", torch.tensor(sigma), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    guide()
    store = pyro.get_param_store()
    leaves = [store["loc"].unconstrained(), store["scale"].unconstrained()]
    before = torch.get_rng_state()
    n = 1000
    fisher = fisher_diagonal(guide, (), {}, leaves, num_draws=n, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    # squared scores: (chi2_1 / sigma^2) has sd sqrt(2)/sigma^2; (chi2_1 - 1)^2 has sd sqrt(56)
    assert abs(float(fisher[0]) - sigma**-2) < 5 * math.sqrt(2) * sigma**-2 / math.sqrt(n)
    assert abs(float(fisher[1]) - 2.0) < 5 * math.sqrt(56) / math.sqrt(n)


# ------------------------------------------------------------------ convergence


@pytest.fixture(scope="module")
def linreg():
    """LinearRegression D=10 fitted with an AutoMultivariateNormal guide and STL until fit stops
    on its own; every step's unconstrained parameters are recorded."""
    pyro.clear_param_store()
    oracle = LinearRegression.simulate(100, 10, seed=0)
    guide = AutoMultivariateNormal(oracle.model)
    names = []
    iterates = []

    def record(state):
        if not names:
            names.extend(sorted(state.params))
        iterates.append(unconstrained(names))

    result = fit(
        oracle.model,
        guide,
        loss=ELBO(estimator="stl"),
        optim=adam(0.03),
        max_steps=6000,
        seed=0,
        progress=False,
        callbacks=(record,),
    )
    q = guide.get_posterior()
    with torch.no_grad():
        kl = float(
            kl_divergence(MultivariateNormal(q.loc, scale_tril=q.scale_tril), oracle.posterior())
        )
    final = unconstrained(names)
    pyro.clear_param_store()
    return {
        "result": result,
        "kl": kl,
        "iterates": torch.stack(iterates),
        "final": final,
        "max_steps": 6000,
    }


def test_linear_regression_stops_on_its_own_at_the_posterior(linreg):
    result = linreg["result"]
    assert result.converged, result.reason
    assert result.num_steps < linreg["max_steps"]
    assert result.reason.startswith("converged: iterates stationary")
    assert result.diagnostics["rhat"] <= 1.1
    assert result.diagnostics["mcse"] < 0.1
    assert linreg["kl"] < 0.01


def test_guide_ends_at_the_average_of_the_stationary_iterates(linreg):
    result = linreg["result"]
    start = result.diagnostics["stationary_from"]
    iterates = linreg["iterates"]
    assert iterates.shape[0] == result.num_steps
    expected = iterates[start:].double().mean(0).float()
    assert torch.allclose(linreg["final"], expected, rtol=0, atol=2e-6)
    # and that is not the last iterate (averaging did something)
    assert not torch.equal(linreg["final"], iterates[-1])


def test_still_moving_at_the_step_cap_is_not_converged():
    oracle = NormalNormal(torch.full((20,), 3.0))
    result = fit(
        oracle.model,
        AutoNormal(oracle.model),
        optim=adam(1e-4),
        max_steps=800,
        seed=0,
        progress=False,
        init=None,  # the Laplace stage would start it at the answer
    )
    assert not result.converged
    assert result.num_steps == 800 and len(result.losses) == 800
    assert result.reason.startswith("max_steps=800 reached without convergence: not stationary")
    assert result.diagnostics["rhat"] > 1.1


def test_relative_tolerance_rule_follows_its_definition():
    oracle = NormalNormal(torch.linspace(-1, 2, 30))
    rule = RelativeTolerance(tol=0.01, eval_every=50, buffer=3)
    result = fit(
        oracle.model,
        AutoNormal(oracle.model),
        optim=adam(0.05),
        max_steps=5000,
        convergence=rule,
        seed=0,
        progress=False,
    )
    assert result.converged
    losses = result.losses
    assert len(losses) % 50 == 0 and len(losses) < 5000
    elbos = -losses.reshape(-1, 50).mean(1)
    changes = np.abs(np.diff(elbos) / elbos[1:])

    def met(j):  # after evaluation j (0-based), with changes[:j] available
        window = changes[max(0, j - 3) : j]
        return len(window) == 3 and (window.mean() < 0.01 or np.median(window) < 0.01)

    last = len(elbos) - 1
    assert met(last) and not any(met(j) for j in range(last))
    assert np.allclose(result.diagnostics["relative_changes"], changes[-3:], rtol=1e-9)


def test_num_steps_runs_exactly_that_many():
    oracle = NormalNormal(torch.tensor([0.5, 1.0]))
    result = fit(oracle.model, AutoNormal(oracle.model), num_steps=37, progress=False)
    assert result.num_steps == 37 and len(result.losses) == 37 and not result.converged
    assert "num_steps=37" in result.reason


# ------------------------------------------------------------------ reproducibility


def normal_fit(seed, **options):
    pyro.clear_param_store()
    oracle = NormalNormal(torch.linspace(-1, 2, 10))
    guide = AutoNormal(oracle.model)
    result = fit(oracle.model, guide, seed=seed, progress=False, **options)
    return result, unconstrained(sorted(pyro.get_param_store().keys()))


def test_same_seed_same_losses():
    first, params1 = normal_fit(3, num_steps=150)
    second, params2 = normal_fit(3, num_steps=150)
    other, _ = normal_fit(4, num_steps=150)
    assert np.array_equal(first.losses, second.losses)
    assert torch.equal(params1, params2)
    assert not np.array_equal(first.losses, other.losses)


def test_convergence_checks_do_not_change_the_trajectory():
    # the Fisher draws of the MCSE checks use a forked RNG: same losses with and without them
    auto, _ = normal_fit(1, loss=ELBO(estimator="stl"), optim=adam(0.05), max_steps=3000)
    assert auto.converged and "mcse" in auto.diagnostics
    fixed, _ = normal_fit(1, loss=ELBO(estimator="stl"), optim=adam(0.05), num_steps=auto.num_steps)
    assert np.array_equal(auto.losses, fixed.losses)


# ------------------------------------------------------------------ Pyro's own ELBOs


def test_pyro_trace_elbo():
    oracle = NormalNormal(torch.linspace(-1, 3, 20))
    guide = AutoNormal(oracle.model)
    result = fit(
        oracle.model,
        guide,
        loss=Trace_ELBO(),
        optim=pyro.optim.Adam({"lr": 0.02}),
        max_steps=8000,
        seed=0,
        progress=False,
    )
    assert result.converged, result.reason
    post = oracle.posterior()
    loc = pyro.param("AutoNormal.locs.loc").item()
    scale = pyro.param("AutoNormal.scales.loc").item()
    # the rule stops at MCSE < 0.1 of scale: 5 MCSE is 0.5 sd for the location and
    # 5 * 0.1 / sqrt(2) = 0.35 for the log-scale (Fisher information 2)
    assert abs(loc - float(post.mean)) < 0.5 * float(post.stddev)
    assert abs(math.log(scale / float(post.stddev))) < 0.35


def test_pyro_trace_enum_elbo_gaussian_mixture():
    # two well-separated clusters: the posterior of each location is ~ Normal(cluster mean,
    # 1 / n_k) (every responsibility is 0 or 1 to float precision)
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(40, generator=g) - 4.0, torch.randn(60, generator=g) + 3.0])

    @config_enumerate
    def model(data):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        with pyro.plate("data", len(data)):
            k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6])))
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=data)

    guide = AutoNormal(
        pyro.poutine.block(model, expose=["locs"]),
        init_loc_fn=init_to_value(values={"locs": torch.tensor([-1.0, 1.0])}),
    )
    result = fit(
        model,
        guide,
        data,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        optim=adam(0.1),
        max_steps=6000,
        seed=0,
        progress=False,
    )
    assert result.converged, result.reason
    locs = pyro.param("AutoNormal.locs.locs").detach()
    means = torch.stack([data[:40].mean(), data[40:].mean()])
    sds = torch.tensor([1 / math.sqrt(40), 1 / math.sqrt(60)])
    assert torch.all((locs - means).abs() < 0.5 * sds + 1e-3)


# ------------------------------------------------------------------ NaN guard

X_LOG = torch.full((10,), math.log(0.1))  # observations of log(z + 2): z near -1.9


def log_model(data=X_LOG):
    # the likelihood's location is log(z + 2): NaN for z < -2
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(torch.log(z + 2.0), 0.5), obs=data)


def log_guide(data=X_LOG):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(0.1), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def record_params(history):
    def callback(state):
        history.append({name: value.detach().clone() for name, value in state.params.items()})

    return callback


@pytest.mark.parametrize("validate", [True, False], ids=["validation", "no-validation"])
def test_nan_names_the_site_and_keeps_the_last_finite_parameters(validate):
    history = []
    with pyro.validation_enabled(validate), pytest.raises(NonFiniteError) as info:
        fit(
            log_model,
            log_guide,
            optim=adam(0.05),
            num_steps=2000,
            seed=0,
            progress=False,
            callbacks=(record_params(history),),
        )
    error = info.value
    assert error.step > 1 and error.step == len(history) + 1
    assert ("model", "obs") in [(role, name) for role, name, _ in error.sites]
    message = str(error)
    assert f"at step {error.step}" in message and "model site 'obs'" in message
    assert "skip_nonfinite" in message
    last_good = history[-1]
    for name in ("loc", "scale"):
        assert torch.equal(pyro.param(name).detach(), last_good[name])
    assert pyro.param("loc").item() < -1.5  # it was heading for z < -2
    assert len(error.losses) == error.step and not math.isfinite(error.losses[-1])
    if validate:  # the distribution refused NaN: the original error is chained
        assert isinstance(error.__cause__, ValueError)


def test_skip_nonfinite_skips_up_to_the_limit():
    data = torch.full((10,), math.log(0.3))  # posterior near z = -1.7: q's tail crosses -2

    def guide(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(0.6), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    result = fit(
        log_model,
        guide,
        data,
        optim=adam(0.05),
        num_steps=400,
        seed=0,
        progress=False,
        skip_nonfinite=50,
    )
    skipped = result.skipped_steps
    assert 0 < len(skipped) <= 50 and result.num_steps == 400
    bad = [i + 1 for i, v in enumerate(result.losses) if not math.isfinite(v)]
    assert bad == list(skipped)
    assert all(torch.isfinite(pyro.param(n)).all() for n in ("loc", "scale"))
    # the same run with a smaller limit raises at the step after the limit is used up
    pyro.clear_param_store()
    limit = len(skipped) - 1
    with pytest.raises(NonFiniteError) as info:
        fit(
            log_model,
            guide,
            data,
            optim=adam(0.05),
            num_steps=400,
            seed=0,
            progress=False,
            skip_nonfinite=limit,
        )
    assert info.value.step == skipped[limit]
    assert f"Steps already skipped: {limit}" in str(info.value)


def test_non_finite_initial_loss_is_reported_before_step_1():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("boom", torch.where(z > 5.0, 0.0, float("-inf")) + 0.0 * z)

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="before step 1.*'boom'"):
        fit(model, guide, num_steps=5, progress=False)


# ------------------------------------------------------------------ callbacks, data, progress


def test_callback_can_stop_the_run():
    oracle = NormalNormal(torch.tensor([0.5, 1.0]))
    seen = []

    def stop_at_seven(state):
        seen.append((state.step, state.loss))
        return state.step == 7

    result = fit(
        oracle.model,
        AutoNormal(oracle.model),
        num_steps=100,
        progress=False,
        callbacks=[stop_at_seven],
    )
    assert result.num_steps == 7 and [s for s, _ in seen] == list(range(1, 8))
    assert [v for _, v in seen] == list(result.losses)
    assert "stopped by the callback" in result.reason and "stop_at_seven" in result.reason


def test_data_batches_are_cycled_after_the_positional_args():
    calls = []
    batches = [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0])]

    def model(scale, x):
        z = pyro.sample("z", dist.Normal(0.0, scale))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(scale, x):
        calls.append(len(x))
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    fit(model, guide, 2.0, data=[(b,) for b in batches], loss=ELBO(), num_steps=5, progress=False)
    assert calls[-5:] == [2, 3, 2, 3, 2]


def test_progress_bar_shows_step_loss_and_status(capsys):
    oracle = NormalNormal(torch.tensor([0.5, 1.0]))
    fit(oracle.model, AutoNormal(oracle.model), max_steps=100, progress=True)
    err = capsys.readouterr().err
    assert "100/100" in err and "loss" in err and "warming up" in err


def test_result_plot_draws_the_loss_trace():
    matplotlib = pytest.importorskip("matplotlib")
    oracle = NormalNormal(torch.tensor([0.5, 1.0]))
    result = fit(oracle.model, AutoNormal(oracle.model), num_steps=60, progress=False)
    fig = result.plot()
    assert isinstance(fig, matplotlib.figure.Figure)
    line = fig.axes[0].lines[0]
    assert np.array_equal(line.get_xdata(), np.arange(1, 61))
    final = result.losses[-6:].mean()  # no averaging: the mean of the last tenth
    np.testing.assert_allclose(line.get_ydata(), result.losses - final, rtol=0, atol=1e-9)
    assert "not converged after 60 steps" in fig.axes[0].get_title()
    assert fig.axes[0].get_ylabel() == f"loss − final ({final:.6g})"


def test_result_plot_after_laplace_is_relative_and_marks_the_stage():
    # Laplace starts at the optimum: the losses fluctuate around a large value (~ -70); drawn
    # relative to the final mean, without an offset, with the stage marked in the legend
    matplotlib = pytest.importorskip("matplotlib")
    oracle = NormalNormal.simulate(50, seed=0)
    pyro.clear_param_store()
    result = fit(oracle.model, AutoNormal(oracle.model), max_steps=300, progress=False, seed=0)
    assert result.init.ran
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.yaxis.get_major_formatter().get_useOffset() is False
    final = float(ax.get_ylabel().split("(")[1].rstrip(")"))
    assert abs(final - result.losses[-30:].mean()) < 1e-3 * abs(final) + 1e-9
    assert np.nanmax(np.abs(ax.lines[0].get_ydata())) < 50  # a readable scale, not ~1e2 offsets
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("start: Laplace stage") for label in labels)
    assert isinstance(fig, matplotlib.figure.Figure)


def test_max_steps_reason_states_what_was_checked():
    oracle = NormalNormal.simulate(50, seed=0)
    pyro.clear_param_store()
    result = fit(oracle.model, AutoNormal(oracle.model), max_steps=300, progress=False, seed=0)
    assert not result.converged
    assert "too few" not in result.reason
    assert "max_steps=300 reached without convergence" in result.reason
    assert "split-R-hat is tested every 200 steps" in result.reason
    assert "first test is at step 400" in result.reason
    assert "stopped after 300 steps" in result.reason
    assert "Raise max_steps to more than 400" in result.reason


def test_one_shot_iterator_of_batches_loses_no_batch():
    seen = []

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        seen.append(float(x))
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    batches = (torch.tensor(float(i)) for i in range(4))
    result = fit(model, guide, data=batches, loss=ELBO(), num_steps=10, progress=False)
    assert result.num_steps == 4 and "exhausted after 4 steps" in result.reason
    assert seen[-4:] == [0.0, 1.0, 2.0, 3.0]


def test_keyboard_interrupt_returns_the_state_reached(tmp_path):
    oracle = NormalNormal(torch.tensor([0.5, 1.0]))

    def interrupt(state):
        if state.step == 5:
            raise KeyboardInterrupt

    path = tmp_path / "run.ckpt"
    with pytest.warns(UserWarning, match="interrupted"):
        result = fit(
            oracle.model,
            AutoNormal(oracle.model),
            num_steps=50,
            progress=False,
            callbacks=(interrupt,),
            checkpoint=path,
        )
    assert result.num_steps == 5 and result.reason.startswith("interrupted (KeyboardInterrupt)")
    pyro.clear_param_store()
    resumed = fit(
        oracle.model, AutoNormal(oracle.model), num_steps=50, progress=False, checkpoint=path
    )
    assert resumed.resumed_from == 5 and resumed.num_steps == 50


def test_max_steps_reason_of_the_relative_rule_states_what_was_checked():
    oracle = NormalNormal.simulate(50, seed=0)
    pyro.clear_param_store()
    result = fit(oracle.model, AutoNormal(oracle.model), max_steps=250, convergence="relative",
                 progress=False, seed=0)
    assert not result.converged
    assert "compares the mean or median of 2 relative ELBO changes (one every 100 steps)" in (
        result.reason
    )
    assert "first test is at step 300" in result.reason
    assert "stopped after 250 steps (1 change(s))" in result.reason
