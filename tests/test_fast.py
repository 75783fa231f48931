"""The compiled step (issue 14): one FX graph of (parameters, data) per step, compiled by inductor.

Most tests check the *capture* (the FX graph run as it is, ``backend="eager"``): it is where the
estimator could go wrong, and it costs no compile.  A few tests compile with inductor; they share
one small model, so inductor's graph cache makes every compile after the first cheap.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from logistic_data import X, Y, model  # the shared model
from pyro.infer import SVI
from pyro.infer.autoguide import (
    AutoDelta,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints, kl_divergence

from pyro_elbo import CUBO, ELBO, IWELBO, InclusiveKL, fast, posterior_of
from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.fast import CompiledLossAndGrads, CompiledStep, compile_step, compiled
from pyro_elbo.fit import NonFiniteError, compiling, fit
from pyro_elbo.fit.convergence import RelativeTolerance


def hand_written_guide(X, y):
    loc = pyro.param("w_loc", torch.zeros(3))
    scale = pyro.param("w_scale", torch.full((3,), 0.5), constraint=constraints.positive)
    pyro.sample("w", dist.Normal(loc, scale).to_event(1))
    s_loc = pyro.param("s_loc", torch.tensor(0.0))
    pyro.sample("s", dist.LogNormal(s_loc, 0.3))


class ModuleGuide(PyroModule):
    """A PyroModule guide with an nn.Linear inside (its weights are the param store's)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 6)
        self.log_s_scale = PyroParam(torch.tensor(0.3), constraint=constraints.positive)

    def forward(self, X, y):
        out = self.net(torch.ones(1))
        pyro.sample("w", dist.Normal(out[:3], out[3:].exp()).to_event(1))
        pyro.sample("s", dist.LogNormal(0.0, self.log_s_scale))


GUIDES = {
    "AutoNormal": lambda: AutoNormal(model, init_scale=0.5),
    "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_scale=0.5),
    "AutoLowRank": lambda: AutoLowRankMultivariateNormal(model, init_scale=0.5),
    "AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[4]),
    "AutoDelta": lambda: AutoDelta(model),
    "hand-written": lambda: hand_written_guide,
    "PyroModule": ModuleGuide,
}

OBJECTIVES = [
    ELBO(),
    ELBO(3, estimator="stl"),
    ELBO(3, estimator="score"),
    ELBO(2, analytic_kl=True),
    ELBO(2, beta=0.5),
    IWELBO(3),
    IWELBO(3, estimator="dreg"),
    IWELBO(3, estimator="stl"),
    CUBO(3),
    InclusiveKL(3),
]
CASES = [(o, "AutoNormal") for o in OBJECTIVES] + [
    (ELBO(2), name) for name in GUIDES if name != "AutoNormal"
] + [(IWELBO(3, estimator="dreg"), "AutoMultivariateNormal"), (ELBO(2, estimator="stl"), "PyroModule")]


def build(objective, guide_name, backend="eager", args=(X, Y)):
    pyro.clear_param_store()
    guide = GUIDES[guide_name]()
    names, leaves = fast._leaves_of(objective, model, guide, args, {})
    step = CompiledLossAndGrads(model, guide, objective, names, leaves, args, {}, backend=backend)
    return guide, step, leaves


def grads_of(run, leaves, seed):
    torch.manual_seed(seed)
    for leaf in leaves:
        leaf.grad = None
    value = run()
    flat = torch.cat([(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1)
                      for leaf in leaves])
    for leaf in leaves:
        leaf.grad = None
    return torch.cat([torch.tensor([float(value)], dtype=flat.dtype), flat])


def assert_means_agree(eager, compiled, z=4.5):
    se = (eager.var(0) / len(eager) + compiled.var(0) / len(compiled)).sqrt()
    gap = (eager.mean(0) - compiled.mean(0)).abs()
    assert torch.all(gap <= z * se + 1e-6 * (1 + eager.mean(0).abs())), (gap / se).max()


@pytest.mark.parametrize(("objective", "guide_name"), CASES,
                         ids=[f"{o!r}-{g}" for o, g in CASES])
def test_captured_step_is_the_eager_step(objective, guide_name):
    """Same seed: the captured graph draws the eager objective's random numbers, so loss and
    gradients agree draw for draw; over many draws from different seeds the gradient means
    agree within 4.5 SE (the captured step is the same estimator)."""
    guide, step, leaves = build(objective, guide_name)
    eager = lambda: objective.loss_and_grads(model, guide, X, Y)  # noqa: E731
    captured = lambda: step(model, guide, X, Y)  # noqa: E731
    same_a, same_b = grads_of(eager, leaves, 7), grads_of(captured, leaves, 7)
    assert torch.allclose(same_a, same_b, rtol=1e-5, atol=1e-5)
    n = 120
    eager_draws = torch.stack([grads_of(eager, leaves, 1000 + i) for i in range(n)])
    captured_draws = torch.stack([grads_of(captured, leaves, 5000 + i) for i in range(n)])
    if guide_name != "AutoDelta":
        assert captured_draws.std(0).max() > 0  # the draws are random
    assert_means_agree(eager_draws, captured_draws)


@pytest.mark.parametrize("estimator", ["score", "stl"])
def test_flows_score_function_falls_back_with_its_reason(estimator):
    """AutoIAFNormal's log-density of a detached draw (the score function's, and STL's log q
    with the parameters held constant) inverts the flow one coordinate at a time, indexing with
    tensor values: the capture refuses and says why."""
    pyro.clear_param_store()
    guide = GUIDES["AutoIAFNormal"]()
    objective = ELBO(2, estimator=estimator)
    names, leaves = fast._leaves_of(objective, model, guide, (X, Y), {})
    with pytest.raises(fast.CaptureError, match="reads a tensor's value in Python"):
        CompiledLossAndGrads(model, guide, objective, names, leaves, (X, Y), {}, backend="eager")


# ------------------------------------------------------------------ inductor


@pytest.fixture(scope="module")
def inductor_step():
    objective = ELBO(2)
    guide, step, leaves = build(objective, "AutoNormal", backend="inductor")
    return objective, guide, step, leaves


def test_inductor_step_draws_the_eager_numbers_and_fresh_ones_each_call(inductor_step):
    objective, guide, step, leaves = inductor_step
    for seed in (3, 4):
        eager = grads_of(lambda: objective.loss_and_grads(model, guide, X, Y), leaves, seed)
        compiled_ = grads_of(lambda: step(model, guide, X, Y), leaves, seed)
        assert torch.allclose(eager, compiled_, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    losses = [step(model, guide, X, Y) for _ in range(3)]
    assert len(set(losses)) == 3 and step.num_graphs == 1


def test_inductor_gradient_mean_matches_eager(inductor_step):
    objective, guide, step, leaves = inductor_step
    n = 300
    eager = torch.stack([grads_of(lambda: objective.loss_and_grads(model, guide, X, Y), leaves, i)
                         for i in range(n)])
    compiled_ = torch.stack([grads_of(lambda: step(model, guide, X, Y), leaves, 10_000 + i)
                             for i in range(n)])
    assert_means_agree(eager, compiled_)


def test_svi_with_compiled_objective_gives_the_eager_losses():
    """``SVI(..., loss=compiled(ELBO(2)))``: the first step eager, then one graph per step;
    the same losses and parameters as plain SVI at the same seed (float rounding aside)."""
    runs = []
    for objective in (ELBO(2), compiled(ELBO(2))):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(model, init_scale=0.5)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=objective)
        losses = [svi.step(X, Y) for _ in range(30)]
        runs.append((torch.tensor(losses), guide.locs.w.detach().clone()))
    assert isinstance(objective._steps[(id(model), id(guide))], CompiledLossAndGrads)
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-4)
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


@pytest.fixture
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def test_float64_graph_matches_eager(float64):
    X64, Y64 = X.double(), Y.double()
    objective = IWELBO(3)
    guide, step, leaves = build(objective, "AutoNormal", "inductor", (X64, Y64))
    assert all(leaf.dtype == torch.float64 for leaf in leaves)
    eager = grads_of(lambda: objective.loss_and_grads(model, guide, X64, Y64), leaves, 5)
    compiled_ = grads_of(lambda: step(model, guide, X64, Y64), leaves, 5)
    assert torch.allclose(eager, compiled_, rtol=1e-10, atol=1e-10)


def test_compile_step_reaches_the_exact_posterior():
    """The stand-alone step (one graph + a compiled Adam) on an exact oracle."""
    oracle = LinearRegression.simulate(100, 3, seed=1, dtype=torch.float32)
    guide = AutoMultivariateNormal(oracle.model)
    step = compile_step(oracle.model, guide, loss=ELBO(8, estimator="stl"), lr=0.05)
    assert isinstance(step, CompiledStep)
    for _ in range(1500):
        step()
    assert float(kl_divergence(posterior_of(guide), oracle.posterior())) < 0.01


def test_a_failing_inductor_falls_back_with_its_reason(monkeypatch):
    """No C++ compiler (or any inductor failure): the run goes on eagerly, saying why."""
    import torch._inductor.compile_fx as inductor_entry

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(inductor_entry, "compile_fx", no_compiler)
    results = []
    for setting in (True, False):
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(fit(model, AutoNormal(model), X, Y, loss=ELBO(2), num_steps=10,
                               seed=0, progress=False, init=None, compile=setting))
    status = results[0].compiled
    assert not status and "inductor could not compile" in status.reason
    assert "cc is not found" in status.reason
    assert (results[0].losses == results[1].losses).all()


# ------------------------------------------------------------------ batches


def test_one_graph_per_batch_shape(monkeypatch):
    """A smaller last batch is captured once, not every epoch."""
    data = torch.linspace(-2, 3, 20)

    def sub_model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 20, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    captures = []
    from pyro_elbo.compile import graphs

    real_capture = graphs.capture
    monkeypatch.setattr(graphs, "capture", lambda *a, **k: captures.append(1) or real_capture(*a, **k))
    pyro.clear_param_store()
    guide = AutoNormal(sub_model)
    objective = ELBO(2)
    names, leaves = fast._leaves_of(objective, sub_model, guide, (data[:8],), {})
    step = CompiledLossAndGrads(sub_model, guide, objective, names, leaves, (data[:8],), {},
                                backend="eager")
    for _ in range(3):  # three epochs of batches of 8, 8, 4
        for seed, batch in enumerate((data[:8], data[8:16], data[16:])):
            torch.manual_seed(seed)
            value = step(sub_model, guide, batch)
            torch.manual_seed(seed)
            eager = objective.loss_and_grads(sub_model, guide, batch)
            assert math.isclose(value, eager, rel_tol=1e-6)
    assert step.num_graphs == 2 and len(captures) == 2


# ------------------------------------------------------------------ fallbacks


def branch_model():
    def m():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if z > 0:  # a Python branch on a sampled value
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
        else:
            pyro.sample("x", dist.Normal(-z, 2.0), obs=torch.tensor(0.5))
    return m


def item_model():
    def m():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0 + abs(z.item())), obs=torch.tensor(0.5))
    return m


def changing_plate_model():
    calls = {"n": 0}

    def m():
        calls["n"] += 1
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3 + calls["n"] % 2):  # the plate's size changes run to run
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
    return m


def mask_model():
    def m():
        z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        kept = z[z > 0]  # a boolean mask: the shape depends on the draw
        pyro.factor("f", -(kept**2).sum())
    return m


@pytest.mark.parametrize(("make_model", "why"), [
    (branch_model, "reads a tensor's value in Python"),
    (item_model, "reads a tensor's value in Python"),
    (changing_plate_model, "structure changes between runs"),
    (mask_model, "output shape depends on values"),
], ids=["branch", "item", "plate size", "mask"])
def test_fallback_says_why_and_gives_the_eager_result(make_model, why):
    runs = []
    for setting in (True, False):
        m = make_model()
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(m, AutoNormal(m), loss=ELBO(1), num_steps=20, seed=0, progress=False,
                         init=None, compile=setting)
        runs.append(result.losses)
        if setting:
            assert not result.compiled and why in result.compiled.reason
            notes = [str(w.message) for w in caught if "running eagerly" in str(w.message)]
            assert len(notes) == 1 and why in notes[0] and "\n" not in notes[0]
    assert (runs[0] == runs[1]).all()


# ------------------------------------------------------------------ fit(compile="auto")


def test_auto_keeps_short_fits_eager():
    pyro.clear_param_store()
    result = fit(model, AutoNormal(model), X, Y, num_steps=50, progress=False, init=None)
    assert not result.compiled and "compiling pays from 2000" in result.compiled.reason


def test_auto_compiles_a_long_fit_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """compile="auto" switches a run under a convergence rule at step AUTO_AFTER (here 500,
    for a short test); a run stopped at step 1100 and resumed from its checkpoint ends where the
    uninterrupted run does, bit for bit."""
    monkeypatch.setattr(compiling, "AUTO_AFTER", 500)
    monkeypatch.setattr(compiling, "AUTO_REMAINING", 1000)
    def run(checkpoint=None, stop_at=None):
        pyro.clear_param_store()
        guide = AutoNormal(model, init_scale=0.5)
        stop = (lambda state: state.step == stop_at) if stop_at else (lambda state: False)
        never = RelativeTolerance(tol=1e-12)  # a rule that does not stop it before max_steps
        result = fit(model, guide, X, Y, loss=ELBO(2), max_steps=1600, convergence=never,
                     seed=3, progress=False, init=None, checkpoint=checkpoint,
                     checkpoint_every=400, callbacks=[stop])
        return result, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}

    full, full_params = run()
    assert full.compiled and full.compiled.from_step == 501, full.compiled
    path = tmp_path / "run.pt"
    first, _ = run(path, stop_at=1100)
    assert first.num_steps == 1100 and first.compiled
    resumed, resumed_params = run(path)
    assert resumed.resumed_from == 1100 and resumed.compiled.from_step == 1101
    assert (resumed.losses == full.losses).all()
    for name, value in full_params.items():
        assert torch.equal(value, resumed_params[name]), name


# ------------------------------------------------------------------ the optimizer in the graph

OPTIMIZERS = {
    "Adam": lambda: None,  # fit's default: torch.optim.Adam over every parameter
    "ClippedAdam": lambda: pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 2.0, "lrd": 0.99}),
}


def fit_params(compile_, optim, args=(X, Y), **options):
    pyro.clear_param_store()
    result = fit(model, AutoNormal(model, init_scale=0.5), *args, loss=ELBO(2), seed=0,
                 progress=False, init=None, compile=compile_, optim=optim, **options)
    if isinstance(optim, pyro.optim.PyroOptim):  # its state, named while the store holds it
        result.optim_state = optim.get_state()
    return result, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_in_the_graph_steps_as_the_eager_one(name, dtype):
    """Loss, gradients and the Adam / ClippedAdam update (gradient clipping and learning-rate
    decay engaged) as one graph: after 80 steps at the same seed the losses and parameters are
    the eager run's up to float rounding, and the optimizer's state is the eager one's."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        runs = [fit_params(c, OPTIMIZERS[name](), (X.to(dtype), Y.to(dtype)), num_steps=80)
                for c in (True, False)]
    finally:
        torch.set_default_dtype(default)
    (compiled_, compiled_params), (eager, eager_params) = runs
    assert compiled_.compiled and "the optimizer update" in compiled_.compiled.reason
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(compiled_.losses - eager.losses).max() < tol * abs(eager.losses).max()
    for n, value in eager_params.items():
        assert value.dtype == dtype and torch.allclose(compiled_params[n], value, atol=tol), n
    if name == "ClippedAdam":  # the step counts and decayed learning rates written back
        states = [r.optim_state for r in (compiled_, eager)]
        assert states[0].keys() == states[1].keys() and len(states[0]) == 4
        for state_c, state_e in zip(*(s.values() for s in states)):
            assert state_c["state"][0]["step"] == state_e["state"][0]["step"] == 80
            assert state_c["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.99**80, rel=1e-12)
            assert torch.allclose(state_c["state"][0]["exp_avg_sq"],
                                  state_e["state"][0]["exp_avg_sq"], rtol=1e-3, atol=tol)


def nan_batches(bad_step, num=120):
    """Batches of (X, Y) with a NaN in the data of step ``bad_step`` only."""
    poisoned = X.clone()
    poisoned[3, 1] = float("nan")
    return [(poisoned if step == bad_step else X, Y) for step in range(1, num + 1)]


@pytest.mark.parametrize("bad_step", [7, 63])
def test_a_nan_at_step_k_stops_there_with_the_state_of_step_k_minus_1(bad_step):
    """The compiled loop reads the device every 50 steps: a NaN at step k still raises
    NonFiniteError naming step k (as the eager loop does), with every earlier loss and the
    parameters of a run stopped after step k - 1 (the updates after step k were masked)."""
    errors = []
    for compile_ in (True, False):
        with pytest.raises(NonFiniteError) as caught:
            fit_params(compile_, None, (), data=nan_batches(bad_step), num_steps=120)
        errors.append((caught.value, {n: v.detach().clone()
                                      for n, v in pyro.get_param_store().items()}))
    (compiled_error, compiled_params), (eager_error, _) = errors
    assert compiled_error.step == eager_error.step == bad_step
    assert len(compiled_error.losses) == bad_step
    assert str(compiled_error).splitlines()[0] == str(eager_error).splitlines()[0]
    _, before = fit_params(True, None, (), data=nan_batches(bad_step)[: bad_step - 1],
                           num_steps=bad_step - 1)
    for n, value in before.items():
        assert torch.equal(compiled_params[n], value), n


def test_compiled_loop_resumes_bit_for_bit(tmp_path):
    """A compiled run (reads every 50 steps) stopped at step 70 and resumed from its checkpoint
    ends where the uninterrupted one does, bit for bit, ClippedAdam's state included."""
    def run(checkpoint=None, stop_at=None):
        optim = OPTIMIZERS["ClippedAdam"]()
        callbacks = [lambda state: state.step == stop_at] if stop_at else []
        return fit_params(True, optim, num_steps=130, checkpoint=checkpoint,
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
    assert [s["state"][0]["step"] for s in resumed.optim_state.values()] == [130] * 4


def test_an_optimizer_the_graph_cannot_hold_runs_eagerly_after_it(monkeypatch):
    """SGD (any optimizer but Adam/AdamW/ClippedAdam): the loss and gradients stay one graph,
    the optimizer steps eagerly after it, and ``result.compiled.reason`` says so."""
    import functools

    monkeypatch.setattr("pyro_elbo.fast.DEFAULT_BACKEND", "eager")  # the capture is what counts
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.5)
    (compiled_, compiled_params), (eager, eager_params) = (
        fit_params(c, sgd, num_steps=30) for c in (True, False))
    assert compiled_.compiled and "SGD" in compiled_.compiled.reason
    assert "runs eagerly after the graph" in compiled_.compiled.reason
    assert abs(compiled_.losses - eager.losses).max() < 1e-4 * abs(eager.losses).max()
    for n, value in eager_params.items():
        assert torch.allclose(compiled_params[n], value, atol=1e-5), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_step_matches_eager():
    """On CUDA (inductor's CUDA graphs asked for): the same run as eager up to rounding."""
    args = (X.cuda(), Y.cuda())
    (compiled_, compiled_params), (eager, eager_params) = (
        fit_params(c, None, args, num_steps=60) for c in (True, False))
    assert compiled_.compiled
    assert abs(compiled_.losses - eager.losses).max() < 1e-3 * abs(eager.losses).max()
    for n, value in eager_params.items():
        assert value.is_cuda and torch.allclose(compiled_params[n], value, atol=1e-4), n


def test_an_optimizer_that_steps_its_own_way_is_not_taken_for_adam():
    """A PyroOptim subclass (fit's WhitenedAdam is one) holds Adam objects but steps its own
    way, and a scheduler changes Adam's learning rate after each step: the graph must not
    replace either by plain Adam."""
    from pyro_elbo.compile.optim import OptimizerPlan, Unsupported
    from pyro_elbo.fit.loop import _make_optimizer

    class OwnStep(pyro.optim.PyroOptim):
        pass

    leaves = [torch.zeros(2, requires_grad=True)]
    for optim, refused in ((OwnStep(torch.optim.Adam, {"lr": 0.1}), True),
                           (pyro.optim.Adam({"lr": 0.1}), False)):
        adapter = _make_optimizer(optim, leaves, ["x"])
        if refused:
            with pytest.raises(Unsupported, match="OwnStep's own step"):
                OptimizerPlan(adapter, leaves)
        else:
            assert OptimizerPlan(adapter, leaves).rules[0][0] == "adam"
    adapter = _make_optimizer(None, leaves, ["x"])  # torch Adam, then a scheduler stepped after it
    adapter.scheduler = torch.optim.lr_scheduler.StepLR(adapter.optimizer, 10)
    with pytest.raises(Unsupported, match="a learning-rate scheduler"):
        OptimizerPlan(adapter, leaves)


def test_a_batch_shape_that_cannot_be_captured_steps_eagerly_in_the_fused_step():
    """The fused step (Adam in the graph) meets a batch whose step cannot be one graph (here
    the model reads a value in Python for short batches only): that call runs the eager
    objective and Adam on the same state, with a warning, and the run equals the eager one."""
    data = torch.linspace(-2, 3, 12)

    def sub_model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        scale = 1.0 + 0.0 * loc.sum().item() if len(x) < 8 else 1.0  # on short batches only
        with pyro.plate("data", 12, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    batches = [data[:8], data[8:]] * 3
    runs = []
    for fused in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoNormal(sub_model)
        objective = ELBO(2)
        names, leaves = fast._leaves_of(objective, sub_model, guide, (data[:8],), {})
        if fused:
            step = CompiledStep(sub_model, guide, data[:8], loss=objective, lr=0.1)
            with pytest.warns(UserWarning, match="runs eagerly because the model or guide reads"):
                losses = [step(batch) for batch in batches]
            assert step._step.num_graphs == 1 and len(step._step.fallbacks) == 1
        else:
            adam = torch.optim.Adam(leaves, lr=0.1)
            losses = []
            for batch in batches:
                adam.zero_grad()
                losses.append(objective.loss_and_grads(sub_model, guide, batch))
                adam.step()
        runs.append((losses, [leaf.detach().clone() for leaf in leaves]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for compiled_leaf, eager_leaf in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(compiled_leaf, eager_leaf, atol=1e-5)
