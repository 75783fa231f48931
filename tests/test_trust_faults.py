"""diagnose / evidence_bounds never endorse a broken fit: a collapsed or point-mass guide is
reported as degenerate (never "exact"), and ``contains`` accepts the exact log evidence of the
exact posterior whatever the dtype.  InferenceDict files: dotted names, atomic writes."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta

from pyro_elbo.conjugate import LinearRegression, NormalNormal
from pyro_elbo.diagnostics.arviz import InferenceDict
from pyro_elbo.diagnostics.degenerate import DegenerateGuideError
from pyro_elbo.diagnostics.trust import diagnose, evidence_bounds


def scaled_posterior_guide(oracle, scale):
    """A guide at the exact posterior mean with ``scale`` times its sd."""
    base = oracle.posterior()
    base = base.base_dist if isinstance(base, dist.Independent) else base

    def guide():
        pyro.sample(oracle.latent, dist.Normal(base.loc, scale * base.scale).to_event(1))

    return guide


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float64, 1e-30), (torch.float32, 1e-15)])
def test_collapsed_guide_is_degenerate_not_exact(dtype, scale):
    # loc + 1e-30 * sd * eps == loc in float64: every draw is the mean, the log weights are
    # constant (k-hat -inf), and they equal log p(x, mean) - log q(mean), far below log p(x)
    oracle = NormalNormal.simulate(20, 3, seed=2, dtype=dtype)
    guide = scaled_posterior_guide(oracle, scale)
    exact = float(oracle.log_evidence())
    result = diagnose(oracle.model, guide, num_samples=1000)
    assert result.verdict == "bad"
    assert result.degenerate == "the draws of 'loc' (3 of 3 coordinates) do not vary"
    assert "degenerate guide" in repr(result) and "exact posterior" not in repr(result)
    bounds = evidence_bounds(oracle.model, guide, num_samples=1000)
    assert bounds.degenerate and bounds.upper == np.inf and bounds.width == np.inf
    assert bounds.lower < exact - 50  # the IW estimate is still a (very loose) lower bound
    assert bounds.contains(exact) and "no upper bound: degenerate guide" in repr(bounds)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_collapsed_guide_whose_density_overflows_is_a_named_error():
    # float32: (1e-30 sd)^2 underflows to 0, log q(loc) is nan: no estimate at all, it says why
    oracle = NormalNormal.simulate(20, 3, seed=2, dtype=torch.float32)
    guide = scaled_posterior_guide(oracle, 1e-30)
    for check in (diagnose, evidence_bounds):
        with pytest.raises(DegenerateGuideError, match=r"degenerate guide: the draws of 'loc'"):
            check(oracle.model, guide, num_samples=200)


def test_point_mass_guide_is_degenerate():
    oracle = LinearRegression.simulate(30, 2, seed=1)
    result = diagnose(oracle.model, AutoDelta(oracle.model), num_samples=200)
    assert result.verdict == "bad" and "'weights' (2 of 2 coordinates)" in result.degenerate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_posterior_is_good_and_contained_for_every_seed(dtype):
    for seed in range(9):
        oracle = NormalNormal.simulate(20, 3, seed=seed, dtype=dtype)
        posterior = oracle.posterior()

        def guide(oracle=oracle, posterior=posterior):
            pyro.sample(oracle.latent, posterior)

        exact = float(oracle.log_evidence())
        bounds = evidence_bounds(oracle.model, guide, num_samples=200)
        assert not bounds.degenerate and bounds.resolution > 0
        # constant log weights: SE 0, and the estimate off by round-off only
        assert abs(bounds.lower - exact) < 3 * bounds.resolution
        assert bounds.contains(exact), (seed, bounds, exact)
        assert not bounds.contains(exact + 10 * bounds.resolution + 1e-3)
        result = diagnose(oracle.model, guide, num_samples=200)
        assert result.verdict == "good" and not result.degenerate


def test_inference_dict_keeps_dotted_names_and_writes_atomically(tmp_path):
    def data(value):
        return InferenceDict({"posterior": {"z": np.full((1, 3), value)}}, attrs={"posterior": {}})

    first = data(1.0).save(tmp_path / "fit.seed1")
    second = data(2.0).save(tmp_path / "fit.seed2")
    assert first.name == "fit.seed1.npz" and second.name == "fit.seed2.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fit.seed1.json",
        "fit.seed1.npz",
        "fit.seed2.json",
        "fit.seed2.npz",
    ]  # no temporary files left
    assert InferenceDict.load(tmp_path / "fit.seed1").groups["posterior"]["z"][0, 0] == 1.0
    assert InferenceDict.load(second).groups["posterior"]["z"][0, 0] == 2.0
    # the npz carries its own metadata: a json from another save cannot be paired with it
    (tmp_path / "fit.seed1.json").write_text((tmp_path / "fit.seed2.json").read_text())
    (tmp_path / "fit.seed2.json").unlink()
    assert InferenceDict.load(second).groups["posterior"]["z"][0, 0] == 2.0
    assert data(3.0).save(tmp_path / "plain.npz").name == "plain.npz"
