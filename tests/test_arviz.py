"""to_inference_data / loo: ArviZ groups from a fitted guide, checked against direct computation,
NUTS, and (in a Python 3.12 venv) ArviZ 1.x."""

import json
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI
from pyro.infer.autoguide import AutoNormal

from pyro_elbo.diagnostics.arviz import InferenceDict, loo, to_dict, to_inference_data
from pyro_elbo.engine.validation import ModelGuideMismatchError
from pyro_elbo.objectives.elbo import ELBO

matplotlib.use("Agg")

# Eight schools (Rubin 1981), posteriordb eight_schools-eight_schools_noncentered
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SCHOOLS = list("ABCDEFGH")
S = 2000


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools)
    svi = SVI(eight_schools, guide, pyro.optim.Adam({"lr": 0.05}), loss=ELBO())
    losses = [svi.step(SIGMA, Y) for _ in range(1000)]
    pyro.set_rng_seed(1)
    data = to_dict(
        eight_schools, guide, SIGMA, y=Y, num_samples=S, coords={"school": SCHOOLS}, losses=losses
    )
    return guide, data, losses


@pytest.fixture(scope="module")
def idata(fitted):
    return fitted[1].to_arviz()


def test_groups_shapes_and_dims(fitted, idata):
    _, _, losses = fitted
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
        "optimization",
    }
    post = idata.posterior
    # constrained latents and the deterministic site; no AutoNormal auxiliary sites
    assert set(post.data_vars) == {"mu", "tau", "theta_tilde", "theta"}
    assert dict(post.sizes) == {"chain": 1, "draw": S, "school": 8}
    assert post["theta"].dims == ("chain", "draw", "school")
    assert list(post["school"].values) == SCHOOLS
    assert (post["tau"] > 0).all()
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["obs"].dims == ("chain", "draw", "school")
    assert idata.observed_data["obs"].dims == ("school",)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, Y.numpy())
    stats = idata.sample_stats
    np.testing.assert_allclose(stats["log_weight"], stats["lp"] - stats["log_q"], rtol=1e-6)
    assert idata.optimization["loss"].dims == ("step",)
    np.testing.assert_allclose(idata.optimization["loss"].values, losses)


def test_summary_stats_are_finite(idata):
    summary = az.summary(idata, kind="stats")
    assert len(summary) == 2 + 8 + 8
    assert np.isfinite(summary.values).all()


def test_deterministic_and_pointwise_log_likelihood_match_direct_computation(idata):
    post = idata.posterior
    mu, tau = post["mu"].values[0], post["tau"].values[0]
    theta_tilde, theta = post["theta_tilde"].values[0], post["theta"].values[0]
    np.testing.assert_allclose(theta, mu[:, None] + tau[:, None] * theta_tilde, rtol=1e-5)
    ll = idata.log_likelihood["obs"].values[0]
    rng = np.random.default_rng(0)
    for s, i in zip(rng.integers(0, S, 10), rng.integers(0, 8, 10)):
        direct = dist.Normal(torch.tensor(mu[s] + tau[s] * theta_tilde[s, i]), SIGMA[i]).log_prob(
            Y[i]
        )
        assert ll[s, i] == pytest.approx(float(direct), rel=1e-5, abs=1e-5)


def test_lp_and_log_q_match_direct_computation(fitted, idata):
    guide = fitted[0]
    post = idata.posterior
    mu = torch.as_tensor(post["mu"].values[0])
    tau = torch.as_tensor(post["tau"].values[0])
    tt = torch.as_tensor(post["theta_tilde"].values[0])
    ll = torch.as_tensor(idata.log_likelihood["obs"].values[0])
    lp = (
        dist.Normal(0.0, 5.0).log_prob(mu)
        + dist.HalfCauchy(5.0).log_prob(tau)
        + dist.Normal(0.0, 1.0).log_prob(tt).sum(-1)
        + ll.sum(-1)
    )
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], lp, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        loc, scale = guide.locs, guide.scales
        log_q = (
            dist.Normal(loc.mu, scale.mu).log_prob(mu)
            + dist.Normal(loc.tau, scale.tau).log_prob(tau.log())
            - tau.log()  # Jacobian of tau = exp(u)
            + dist.Normal(loc.theta_tilde, scale.theta_tilde).log_prob(tt).sum(-1)
        )
    np.testing.assert_allclose(idata.sample_stats["log_q"].values[0], log_q, rtol=1e-5, atol=1e-4)


def test_posterior_predictive_is_drawn_given_the_same_draws(idata):
    theta = idata.posterior["theta"].values[0]
    y_rep = idata.posterior_predictive["obs"].values[0]
    z = ((y_rep - theta) / SIGMA.numpy()).reshape(-1)  # N(0, 1) if drawn from p(y | theta_s)
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)


def nuts_loo():
    pyro.set_rng_seed(0)
    kernel = NUTS(eight_schools, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=500, warmup_steps=500, num_chains=1, disable_progbar=True)
    mcmc.run(SIGMA, Y)
    s = mcmc.get_samples()
    theta = s["mu"][:, None] + s["tau"][:, None] * s["theta_tilde"]
    ll = dist.Normal(theta, SIGMA).log_prob(Y)
    nuts = az.from_dict(
        posterior={k: v.numpy()[None] for k, v in s.items()},
        log_likelihood={"obs": ll.numpy()[None]},
    )
    return az.loo(nuts).elpd_loo


def test_corrected_loo_matches_nuts(idata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto k warnings
        ours = loo(idata)
    assert ours.elpd_loo == pytest.approx(nuts_loo(), abs=1.0)
    assert ours.n_samples == S and ours.n_data_points == 8
    assert ours.pareto_k.dims == ("school",)


def test_loo_is_plain_psis_loo_when_q_is_the_posterior(idata):
    """With lp - log_q constant (q = posterior) the correction vanishes: loo == az.loo."""
    stats = {"lp": idata.sample_stats["log_q"].values + 3.0, "log_q": idata.sample_stats["log_q"]}
    data = az.from_dict(
        posterior={"mu": idata.posterior["mu"].values},
        log_likelihood={"obs": idata.log_likelihood["obs"].values},
        sample_stats={k: np.asarray(v) for k, v in stats.items()},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours, plain = loo(data), az.loo(data)
    assert ours.elpd_loo == pytest.approx(plain.elpd_loo, abs=1e-4)  # float32 log-lik
    assert ours.p_loo == pytest.approx(plain.p_loo, abs=1e-4)
    np.testing.assert_allclose(ours.pareto_k, plain.pareto_k, atol=1e-4)


def test_plots_write_png(idata, tmp_path):
    import matplotlib.pyplot as plt

    axes = az.plot_posterior(idata, var_names=["mu", "tau"])
    assert [ax.get_title() for ax in axes.ravel()] == ["mu", "tau"]
    axes.ravel()[0].figure.savefig(tmp_path / "posterior.png")
    ax = az.plot_ppc(idata, num_pp_samples=50, random_seed=0)
    ax = np.ravel(ax)[0]
    assert len(ax.get_lines()) >= 50 + 1  # replicates + observed
    ax.figure.savefig(tmp_path / "ppc.png")
    plt.close("all")
    for name in ("posterior.png", "ppc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- dims from plates
G, N, D, K = 3, 4, 2, 3


def nested(y):
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(K)))
    with pyro.plate("group", G):  # dim -1
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("item", N):  # dim -2
            mean = loc + probs[..., :D]
            pyro.sample("obs", dist.MultivariateNormal(mean, scale_tril=torch.eye(D)), obs=y)


def nested_data():
    return torch.randn(N, G, D)


def test_dims_follow_nested_plates_and_event_dims():
    y = nested_data()
    idata = to_inference_data(nested, AutoNormal(nested), y, num_samples=7)
    post = idata.posterior
    assert post["probs"].dims == ("chain", "draw", "probs_dim_0")
    assert post["loc"].dims == ("chain", "draw", "group", "loc_dim_1")
    assert post["probs"].shape == (1, 7, K) and post["loc"].shape == (1, 7, G, D)
    np.testing.assert_allclose(post["probs"].sum("probs_dim_0"), 1.0, rtol=1e-5)
    ppc = idata.posterior_predictive["obs"]
    assert ppc.dims == ("chain", "draw", "item", "group", "obs_dim_2")
    assert ppc.shape == (1, 7, N, G, D)
    ll = idata.log_likelihood["obs"]
    assert ll.dims == ("chain", "draw", "item", "group") and ll.shape == (1, 7, N, G)
    assert idata.observed_data["obs"].dims == ("item", "group", "obs_dim_2")
    assert dict(idata.sample_stats.sizes) == {"chain": 1, "draw": 7}


def test_plate_slots_a_site_is_not_in_leave_no_size_one_dims():
    def model(y):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("rows", 4, dim=-2):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))  # batch shape (4, 1)
            pyro.deterministic("twice_a", 2 * a)
            with pyro.plate("cols", 3, dim=-1):
                pyro.sample("obs", dist.Normal(a, scale), obs=y)

    for num_samples in (1, 6):
        data = to_dict(model, AutoNormal(model), torch.zeros(4, 3), num_samples=num_samples)
        post = data.groups["posterior"]
        assert data.dims["a"] == ["rows"] and data.dims["twice_a"] == ["rows"]
        assert post["a"].shape == (1, num_samples, 4) and data.dims["scale"] == []
        np.testing.assert_allclose(post["twice_a"], 2 * post["a"])
        assert data.dims["obs"] == ["rows", "cols"]
        assert data.groups["log_likelihood"]["obs"].shape == (1, num_samples, 4, 3)
        ll = dist.Normal(
            torch.as_tensor(post["a"][0])[..., None],
            torch.as_tensor(post["scale"][0])[:, None, None],
        ).log_prob(torch.zeros(4, 3))
        np.testing.assert_allclose(data.groups["log_likelihood"]["obs"][0], ll, rtol=1e-5)


def test_user_dims_and_coords_override():
    idata = to_inference_data(
        nested,
        AutoNormal(nested),
        nested_data(),
        num_samples=5,
        dims={"loc": ["group", "xy"], "obs": ["item", "group", "xy"]},
        coords={"group": ["a", "b", "c"], "xy": ["x", "y"]},
    )
    assert idata.posterior["loc"].dims == ("chain", "draw", "group", "xy")
    assert list(idata.posterior["group"].values) == ["a", "b", "c"]
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "item", "group", "xy")
    assert list(idata.observed_data["xy"].values) == ["x", "y"]


def test_model_that_does_not_vectorize_falls_back_to_a_loop():
    data = torch.tensor([0.5, 1.5, 1.0])

    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = 1.0 if loc.item() > 0 else 2.0  # Python control flow on a sample
        with pyro.plate("data", 3):
            pyro.sample("obs", dist.Normal(loc, scale), obs=y)

    def guide(y):
        pyro.sample("loc", dist.Normal(0.5, 1.0))

    with pytest.warns(RuntimeWarning, match="one at a time"):
        data_dict = to_dict(model, guide, data, num_samples=20)
    loc = torch.as_tensor(data_dict.groups["posterior"]["loc"][0])
    assert loc.shape == (20,) and loc.unique().numel() == 20
    scale = torch.where(loc > 0, 1.0, 2.0)
    ll = dist.Normal(loc[:, None], scale[:, None]).log_prob(data)
    np.testing.assert_allclose(data_dict.groups["log_likelihood"]["obs"][0], ll, rtol=1e-6)
    log_q = dist.Normal(0.5, 1.0).log_prob(loc)
    np.testing.assert_allclose(data_dict.groups["sample_stats"]["log_q"][0], log_q, rtol=1e-6)


def test_save_and_load_round_trip(fitted, tmp_path):
    data = fitted[1]
    back = InferenceDict.load(data.save(tmp_path / "eight"))
    assert back.dims == data.dims and back.coords == data.coords
    for group, variables in data.groups.items():
        for name, array in variables.items():
            np.testing.assert_array_equal(back.groups[group][name], array)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_bad_num_samples(num_samples):
    guide = AutoNormal(eight_schools)
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(eight_schools, guide, SIGMA, y=Y, num_samples=num_samples)


def test_guide_that_does_not_match_the_model():
    def guide(sigma, y=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("school", 8):
            pyro.sample("theta_hat", dist.Normal(0.0, 1.0))  # the model calls it theta_tilde

    with pytest.raises(ModelGuideMismatchError, match="'theta_tilde'|'theta_hat'"):
        to_inference_data(eight_schools, guide, SIGMA, y=Y, num_samples=10)


def test_model_without_observed_site_and_log_likelihood_requested():
    def prior_only():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    guide = AutoNormal(prior_only)
    with pytest.raises(ValueError, match="no observed site"):
        to_inference_data(prior_only, guide, num_samples=10)
    data = to_dict(prior_only, guide, num_samples=10, log_likelihood=False)
    assert set(data.groups) == {"posterior", "sample_stats"}


def test_unknown_variable_in_dims():
    with pytest.raises(ValueError, match="'theta_hat'"):
        to_inference_data(
            eight_schools,
            AutoNormal(eight_schools),
            SIGMA,
            y=Y,
            num_samples=5,
            dims={"theta_hat": ["school"]},
        )


def test_loo_needs_lp_and_log_q():
    data = az.from_dict(
        posterior={"mu": np.zeros((1, 10))}, log_likelihood={"obs": np.zeros((1, 10, 3))}
    )
    with pytest.raises(ValueError, match="sample_stats.lp"):
        loo(data)


# ---------------------------------------------------------------- ArviZ 1.x (Python 3.12)
def _arviz1_python():
    """A Python 3.12 venv with only ArviZ 1.x (created once, cached), or a skip reason."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyro_elbo"
    venv = cache / "arviz1-venv"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python, None
    candidates = sorted((Path.home() / ".pyenv" / "versions").glob("3.12*/bin/python"))[::-1]
    candidates += [Path(p) for p in [shutil.which("python3.12")] if p]
    if not candidates:
        return None, "Python 3.12 is not installed (ArviZ 1.x needs Python >= 3.12)"
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "arviz1-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if ready.exists():
            return python, None
        steps = [
            [str(candidates[0]), "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--retries", "1", "arviz>=1"],
        ]
        for step in steps:  # about 30 s, once
            result = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                return None, f"could not build the ArviZ 1.x venv ({' '.join(step[:4])}): " + (
                    result.stderr.strip().splitlines() or ["no output"]
                )[-1]
        ready.touch()
    return python, None


def test_arviz1_path_converts_and_corrects_loo(fitted, idata, tmp_path):
    python, reason = _arviz1_python()  # not on Python 3.12 here: ArviZ 1.x needs a venv
    if python is None:
        pytest.skip(reason)
    data = fitted[1]
    npz = data.save(tmp_path / "eight")
    module = Path(__file__).parents[1] / "pyro_elbo" / "diagnostics" / "arviz.py"
    script = Path(__file__).with_name("arviz1_convert.py")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [str(python), str(script), str(module), str(npz), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["arviz_major"] >= 1 and result["type"] == "DataTree"
    assert set(result["groups"]) == set(idata.groups())
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        for name, dims in result["dims"][group].items():
            assert tuple(dims) == idata[group][name].dims, (group, name)
    assert result["dims"]["optimization"]["loss"] == ["step"]
    assert result["summary_finite"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours_0x = loo(idata).elpd_loo
    # same draws, same correction; ArviZ 1.x's PSIS implementation differs slightly
    assert result["loo_elpd"] == pytest.approx(ours_0x, abs=0.05)
    assert result["khat"] == pytest.approx(
        float(az.psislw(data.groups["sample_stats"]["log_weight"].reshape(-1))[1]), abs=0.05
    )


# ---------------------------------------------------------------- PSIS-resampled draws


def _shifted_guide(oracle, shift, scale):
    """The exact posterior moved by ``shift`` sds and widened by ``scale``."""
    post = oracle.posterior()
    loc = post.mean + shift * post.stddev
    tril = scale * post.scale_tril

    def guide():
        pyro.sample("weights", dist.MultivariateNormal(loc, scale_tril=tril))

    return guide


def test_psis_resampling_removes_the_bias_of_a_slightly_off_guide():
    from pyro_elbo.conjugate import LinearRegression

    oracle = LinearRegression.simulate(100, 3, seed=0, dtype=torch.float64)
    post = oracle.posterior()
    guide = _shifted_guide(oracle, shift=0.3, scale=1.2)
    num = 20_000
    pyro.set_rng_seed(0)
    raw = to_dict(oracle.model, guide, num_samples=num)
    pyro.set_rng_seed(0)
    resampled = to_dict(oracle.model, guide, num_samples=num, resample="psis")
    attrs = resampled.attrs["posterior"]
    assert attrs["resampled"] == "psis" and attrs["psis_khat"] < 0.5
    mean = post.mean.numpy()
    sd = post.stddev.numpy()
    raw_error = (raw.groups["posterior"]["weights"][0].mean(0) - mean) / sd
    new = resampled.groups["posterior"]["weights"][0]
    new_error = (new.mean(0) - mean) / sd
    # weighted-then-resampled mean: SE from the weights' ESS plus the multinomial draw
    se = np.sqrt(1 / attrs["psis_ess"] + 1 / num)
    assert np.all(np.abs(raw_error) > 0.25)  # the guide's bias: 0.3 sd
    assert np.all(np.abs(new_error) < 5 * se), (new_error, se)
    # the sd of a sd estimate is about sd / sqrt(2 ESS)
    assert np.all(np.abs(new.std(0) / sd - 1.0) < 5 * np.sqrt(1 / (2 * attrs["psis_ess"])))
    assert np.all(raw.groups["posterior"]["weights"][0].std(0) / sd > 1.15)  # q is 1.2x too wide
    # every group is resampled with the same index: the stats still belong together, and the
    # log-likelihood still belongs to its draw
    stats = resampled.groups["sample_stats"]
    np.testing.assert_allclose(stats["log_weight"], stats["lp"] - stats["log_q"], rtol=1e-12)
    ll = resampled.groups["log_likelihood"]["obs"][0]
    direct = torch.distributions.Normal(
        torch.as_tensor(new) @ oracle.X.T, oracle.noise_scale
    ).log_prob(oracle.y)
    np.testing.assert_allclose(ll, direct.numpy(), rtol=1e-6)
    idata = resampled.to_arviz()
    assert idata.posterior.attrs["resampled"] == "psis"


def test_psis_resampling_refuses_unreliable_weights():
    from pyro_elbo.conjugate import LinearRegression

    oracle = LinearRegression.simulate(100, 3, seed=0, dtype=torch.float64)
    guide = _shifted_guide(oracle, shift=0.0, scale=0.3)  # far too narrow: k-hat > 0.7
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match=r"resample='psis': k-hat 0\.\d+ > 0\.70.*not resampled"):
        data = to_dict(oracle.model, guide, num_samples=10_000, resample="psis")
    assert data.attrs["posterior"]["resampled"] == "none"
    pyro.set_rng_seed(0)
    plain = to_dict(oracle.model, guide, num_samples=10_000)
    np.testing.assert_array_equal(
        data.groups["posterior"]["weights"], plain.groups["posterior"]["weights"]
    )
    with pytest.raises(ValueError, match="resample must be None or 'psis'"):
        to_dict(oracle.model, guide, num_samples=10, resample="sir")
