"""fit's default optimizer (WhitenedAdam after the Laplace stage) inside the fused compiled step.

The update (VJP through each whitening block, Adam on the whitened coordinates, the write-back,
plain Adam for the rest) is checked on the captured graph run as it is (``backend="eager"``:
where the update could go wrong, at no compile cost) against the eager ``WhitenedAdam``; the
default fit and the resume are checked compiled by inductor.
"""

import pyro
import pytest
import torch
from logistic_data import X, Y, model  # the shared model
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_elbo import ELBO
from pyro_elbo.compile.whitened import WINDOW, WhitenedPlan
from pyro_elbo.fit import NonFiniteError, compiling, fit
from pyro_elbo.init import WhitenedAdam, cosine_decay

GUIDES = {
    "default": lambda: None,  # fit's recommended guide (full rank here)
    "AutoNormal": lambda: AutoNormal(model),
    "AutoDiagonalNormal": lambda: AutoDiagonalNormal(model),
    "AutoLowRank": lambda: AutoLowRankMultivariateNormal(model, rank=2),
}


def snapshot():
    return {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


def default_fit(guide_name, compile_, args=(X, Y), **options):
    """fit's default pipeline (Laplace stage, then WhitenedAdam) at a fixed seed."""
    pyro.clear_param_store()
    result = fit(model, GUIDES[guide_name](), *args, loss=ELBO(2), seed=0, progress=False,
                 compile=compile_, **options)
    assert isinstance(result.optim, WhitenedAdam) and result.optim.whitened
    return result, snapshot()


def assert_same_run(a, b, tol):
    (result_a, params_a), (result_b, params_b) = a, b
    assert abs(result_a.losses - result_b.losses).max() < tol * abs(result_b.losses).max()
    assert params_a.keys() == params_b.keys()
    for n, value in params_b.items():
        assert torch.allclose(params_a[n], value, atol=tol, rtol=tol), n
    optim_a, optim_b = result_a.optim, result_b.optim
    assert optim_a.num_steps == optim_b.num_steps
    for leaf_a, leaf_b in zip(optim_a._psi, optim_b._psi):
        assert torch.allclose(leaf_a, leaf_b, atol=tol, rtol=tol)
        state_a, state_b = optim_a._adam.state[leaf_a], optim_b._adam.state[leaf_b]
        assert float(state_a["step"]) == float(state_b["step"])
        assert torch.allclose(state_a["exp_avg"], state_b["exp_avg"], atol=tol, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_whitened_adam_in_the_graph_steps_as_the_eager_one(guide_name, dtype, monkeypatch):
    """Full-rank, mean-field (AutoNormal's blocks per site, AutoDiagonalNormal's one) and
    low-rank blocks: after 60 steps at the same seed the compiled step (VJP, whitened Adam with
    lr_scales, write-back) gives the eager WhitenedAdam's losses, guide parameters, whitened
    coordinates and Adam state, up to rounding."""
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        args = (X.to(dtype), Y.to(dtype))
        compiled_, eager = (default_fit(guide_name, c, args, num_steps=60) for c in (True, False))
    finally:
        torch.set_default_dtype(default)
    assert compiled_[0].compiled and "the optimizer update" in compiled_[0].compiled.reason
    assert all(v.dtype == dtype for v in compiled_[1].values())
    assert_same_run(compiled_, eager, 1e-4 if dtype == torch.float32 else 1e-10)
    if guide_name == "AutoLowRank":  # its (mu, rho, F) steps at (1, 0.1, 0.1)
        plan = WhitenedPlan(type("A", (), {"optimizer": compiled_[0].optim})(),
                            list(pyro.get_param_store()._params.values()))
        assert [g["scale"] for g in plan.groups] == [1.0, 0.1, 0.1]


def test_auto_switches_from_the_eager_whitened_step_to_the_graph(monkeypatch):
    """compile="auto" under a convergence rule switches at step AUTO_AFTER (here 30): the graph
    takes WhitenedAdam's state from the eager steps (no resync of the whitened coordinates) and
    the run ends where the eager one does, up to rounding."""
    from pyro_elbo.fit.convergence import RelativeTolerance

    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")
    monkeypatch.setattr(compiling, "AUTO_AFTER", 30)
    monkeypatch.setattr(compiling, "AUTO_REMAINING", 30)
    never = RelativeTolerance(tol=1e-12)
    auto, eager = (default_fit("default", c, max_steps=80, convergence=never)
                   for c in ("auto", False))
    assert auto[0].compiled.from_step == 31 and "the optimizer update" in auto[0].compiled.reason
    assert_same_run(auto, eager, 1e-4)


def test_schedule_and_averaging_in_the_graph_as_eager(monkeypatch):
    """A user's WhitenedAdam with a cosine schedule (crossing the device's window of
    multipliers twice) and Polyak averaging: the compiled run's state and ``finalize``'s
    average are the eager ones."""
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")
    steps = 2 * WINDOW + 20
    runs = []
    for compile_ in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(model)
        guide(X, Y)
        optim = WhitenedAdam(guide, 0.05, schedule=cosine_decay(steps), average_from=steps // 2)
        result = fit(model, guide, X, Y, loss=ELBO(2), optim=optim, seed=1, progress=False,
                     init=None, num_steps=steps, compile=compile_)
        runs.append((result, snapshot()))
        assert optim._count == steps - steps // 2
        assert optim.finalize()
        runs[-1] += (snapshot(),)
    assert runs[0][0].compiled and "the optimizer update" in runs[0][0].compiled.reason
    assert_same_run(runs[0][:2], runs[1][:2], 1e-4)
    for n, value in runs[1][2].items():  # the averages written into the guide
        assert torch.allclose(runs[0][2][n], value, atol=1e-4), n
    loc = next(n for n in runs[1][2] if n.endswith("loc"))
    assert not torch.allclose(runs[1][1][loc], runs[1][2][loc], atol=1e-4)  # an average


def test_default_fit_compiles_the_whitened_step_with_inductor(monkeypatch):
    """compile="auto" at its default rule (lowered here to 100 steps for a short test): the
    default fit (guide=None: Laplace, then WhitenedAdam) runs loss, gradients and WhitenedAdam
    as one inductor graph, and ends where the eager fit does, up to rounding."""
    monkeypatch.setattr(compiling, "AUTO_MIN_STEPS", 100)
    auto = default_fit("default", "auto", num_steps=100)
    reason = auto[0].compiled.reason
    assert auto[0].compiled and auto[0].compiled.from_step == 1, reason
    assert "inductor: loss, gradients and the optimizer update" in reason
    assert "eagerly" not in reason
    assert_same_run(auto, default_fit("default", False, num_steps=100), 1e-4)


def test_default_compiled_fit_resumes_bit_for_bit(tmp_path):
    """The compiled default fit stopped at step 70 and resumed from its checkpoint ends where
    the uninterrupted one does, bit for bit: guide parameters, whitened coordinates, Adam
    state, losses."""
    def run(checkpoint=None, stop_at=None):
        callbacks = [lambda state: state.step == stop_at] if stop_at else []
        return default_fit("default", True, num_steps=130, checkpoint=checkpoint,
                           checkpoint_every=40, callbacks=callbacks)

    full, full_params = run()
    path = tmp_path / "run.pt"
    first, _ = run(path, stop_at=70)
    assert first.num_steps == 70
    resumed, resumed_params = run(path)
    assert resumed.resumed_from == 70 and resumed.compiled
    assert (resumed.losses == full.losses).all()
    for name, value in full_params.items():
        assert torch.equal(value, resumed_params[name]), name
    for leaf_a, leaf_b in zip(resumed.optim._psi, full.optim._psi):
        assert torch.equal(leaf_a, leaf_b)
        assert torch.equal(resumed.optim._adam.state[leaf_a]["exp_avg_sq"],
                           full.optim._adam.state[leaf_b]["exp_avg_sq"])
    assert resumed.optim.num_steps == 130


def nan_batches(bad_step, num=120):
    poisoned = X.clone()
    poisoned[3, 1] = float("nan")
    return [(poisoned if step == bad_step else X, Y) for step in range(1, num + 1)]


@pytest.mark.parametrize("bad_step", [7, 63])
def test_a_nan_at_step_k_leaves_the_whitened_state_of_step_k_minus_1(bad_step, monkeypatch):
    """A NaN in step k's data: NonFiniteError names step k, and the guide's parameters, the
    whitened coordinates and their Adam state are those of a run stopped after step k - 1."""
    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")

    def run(batches):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(model)
        guide(X, Y)
        optims.append(WhitenedAdam(guide, 0.05))
        fit(model, guide, loss=ELBO(2), optim=optims[-1], seed=0, progress=False, init=None,
            compile=True, data=batches, num_steps=len(batches))

    optims = []
    with pytest.raises(NonFiniteError) as caught:
        run(nan_batches(bad_step))
    assert caught.value.step == bad_step and len(caught.value.losses) == bad_step
    stopped = snapshot()
    run(nan_batches(bad_step)[: bad_step - 1])
    for n, value in snapshot().items():
        assert torch.equal(stopped[n], value), n
    halted, before = optims
    assert halted.num_steps == before.num_steps == bad_step - 1
    for leaf_a, leaf_b in zip(halted._psi, before._psi):
        assert torch.equal(leaf_a, leaf_b)
        assert torch.equal(halted._adam.state[leaf_a]["exp_avg"],
                           before._adam.state[leaf_b]["exp_avg"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_whitened_step_in_the_graph_matches_eager():
    """On CUDA (inductor's CUDA graphs asked for): WhitenedAdam in the graph gives the eager
    run's parameters up to rounding, with its whitened coordinates on the device."""
    from pyro_elbo.conjugate import LinearRegression

    oracle = LinearRegression.simulate(100, 3, seed=0, dtype=torch.float64).to("cuda")
    runs = []
    for compile_ in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(oracle.model)
        guide()
        optim = WhitenedAdam(guide, 0.05)
        result = fit(oracle.model, guide, loss=ELBO(2), optim=optim, seed=0, progress=False,
                     init=None, num_steps=60, compile=compile_)
        runs.append((result, snapshot()))
    assert runs[0][0].compiled and "the optimizer update" in runs[0][0].compiled.reason
    assert all(leaf.is_cuda for leaf in runs[0][0].optim._psi)
    assert_same_run(runs[0], runs[1], 1e-8)
