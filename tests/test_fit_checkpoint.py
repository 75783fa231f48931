"""Checkpoints of ``pyro_elbo.fit``: crash, resume bit for bit, atomic writes, safe loads.

The crash tests run the fit in a subprocess that kills itself with SIGKILL (no clean-up, no
``finally``), then resume in this process and compare with an uninterrupted run of the same
script: the losses and the parameters must be equal exactly (CPU).
"""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo.fit import CheckpointError, CheckpointMismatchError, fit
from pyro_elbo.fit import checkpoint as ck

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# One source for the subprocess and for this process: a NormalNormal oracle (D=3) fitted with an
# AutoNormal guide until the "auto" rule stops it (stationary from step 180, detected at step
# 800, averaged until step 1149), checkpointed every 100 steps.
SCRIPT = textwrap.dedent(
    """
    import functools, os, signal, sys
    import pyro, torch
    torch.set_num_threads(1)
    from pyro.infer.autoguide import AutoNormal
    from pyro_elbo.conjugate import NormalNormal
    from pyro_elbo.fit import fit
    from pyro_elbo.fit import checkpoint as ck
    from pyro_elbo.objectives.elbo import ELBO

    def optimizer(kind):
        if kind == "pyro":
            return pyro.optim.Adam({"lr": 0.05})
        if kind == "default":  # the Laplace stage, then WhitenedAdam
            return None
        return functools.partial(torch.optim.Adam, lr=0.05)

    def run(path, kind="torch", callbacks=(), resume=True):
        pyro.clear_param_store()
        oracle = NormalNormal(torch.linspace(-1, 2, 30).reshape(10, 3))
        # torch/pyro: from the guide's own start (a long run); default: fit's whole pipeline
        init = "auto" if kind == "default" else None
        loss = None if kind == "default" else ELBO()
        result = fit(oracle.model, AutoNormal(oracle.model), optim=optimizer(kind), loss=loss,
                     max_steps=5000, seed=0, progress=False, checkpoint=path,
                     checkpoint_every=100, resume=resume, callbacks=callbacks, init=init)
        store = pyro.get_param_store()
        params = {n: store[n].unconstrained().detach().clone() for n in store.keys()}
        return result, params

    def kill_at(step):
        def callback(state):
            if state.step == step:
                os.kill(os.getpid(), signal.SIGKILL)
        return callback

    def kill_during_write(which):
        calls = []
        def hook(tmp, path):
            calls.append(tmp)
            if len(calls) == which:  # a torn temporary file, then death before the rename
                with open(tmp, "r+b") as handle:
                    handle.truncate(os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        ck._before_commit = hook

    if __name__ == "__main__":
        mode, path, kind = sys.argv[1:4]
        if mode == "kill":
            run(path, kind, callbacks=(kill_at(int(sys.argv[4])),))
        else:
            kill_during_write(int(sys.argv[4]))
            run(path, kind)
        print("not killed")
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "fit_script.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("fit_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.file = str(path)
    return module


def run_killed(script, *args):
    process = subprocess.run(
        [sys.executable, script.file, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == -signal.SIGKILL, process.stdout + process.stderr
    return process


def assert_same_run(a, b):
    (result_a, params_a), (result_b, params_b) = a, b
    assert np.array_equal(result_a.losses, result_b.losses)
    assert result_a.num_steps == result_b.num_steps
    assert result_a.converged == result_b.converged
    assert result_a.reason == result_b.reason
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


# ------------------------------------------------------------------ crash and resume


def test_sigkill_mid_run_then_resume_is_bit_identical(script, tmp_path):
    path = tmp_path / "run.ckpt"
    run_killed(script, "kill", path, "torch", 930)
    saved = ck.load(path)
    assert saved["step"] == 900 and not saved["done"]
    assert saved["rule"]["state"]["avg_start"] is not None  # killed while averaging
    resumed = script.run(str(path))
    assert resumed[0].resumed_from == 900
    uninterrupted = script.run(str(tmp_path / "other.ckpt"))
    assert uninterrupted[0].converged and uninterrupted[0].num_steps > 930
    assert_same_run(resumed, uninterrupted)


def test_sigkill_then_resume_with_the_default_pipeline_is_bit_identical(script, tmp_path):
    # Laplace stage, WhitenedAdam and the STL ELBO: the optimizer's whitened coordinates and
    # the Laplace reference must come back exactly
    path = tmp_path / "run.ckpt"
    uninterrupted = script.run(str(tmp_path / "other.ckpt"), "default")
    assert uninterrupted[0].init.ran and type(uninterrupted[0].optim).__name__ == "WhitenedAdam"
    assert uninterrupted[0].converged and uninterrupted[0].num_steps > 330
    run_killed(script, "kill", path, "default", 330)
    assert ck.load(path)["step"] == 300
    resumed = script.run(str(path), "default")
    assert resumed[0].resumed_from == 300
    assert_same_run(resumed, uninterrupted)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(script, tmp_path):
    path = tmp_path / "run.ckpt"
    run_killed(script, "kill-write", path, "pyro", 3)  # dies writing the step-300 checkpoint
    (torn,) = tmp_path.glob("run.ckpt.*.tmp")  # the dead writer's own temporary file
    with pytest.raises(Exception):  # noqa: B017 - the torn file is unreadable
        torch.load(torn, weights_only=True)
    saved = ck.load(path)
    assert saved["step"] == 200
    resumed = script.run(str(path), "pyro")
    assert resumed[0].resumed_from == 200
    assert not torn.exists()  # removed by the next run to take the lock
    uninterrupted = script.run(str(tmp_path / "other.ckpt"), "pyro")
    assert_same_run(resumed, uninterrupted)


def test_stop_and_resume_with_a_shuffling_dataloader(tmp_path):
    # minibatches from a DataLoader with shuffle=True; stopped by a callback mid-epoch, resumed
    data = torch.utils.data.TensorDataset(torch.linspace(-2, 3, 40))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 40, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("loc", dist.Normal(m, s))

    def run(path, stop_at=None):
        pyro.clear_param_store()
        callbacks = (lambda state: state.step == stop_at,) if stop_at else ()
        result = fit(
            model,
            guide,
            data=loader,
            num_steps=60,
            seed=0,
            progress=False,
            checkpoint=path,
            checkpoint_every=25,
            callbacks=callbacks,
        )
        return result, {n: pyro.param(n).detach().clone() for n in ("m", "s")}

    path = tmp_path / "run.ckpt"
    stopped, _ = run(path, stop_at=33)  # epoch 5 has 5 batches: step 33 is mid-epoch
    assert stopped.num_steps == 33 and "callback" in stopped.reason
    assert ck.load(path)["data"]["index"] == 3
    resumed = run(path)
    assert resumed[0].resumed_from == 33
    assert_same_run(resumed, run(tmp_path / "other.ckpt"))


# ------------------------------------------------------------------ refusing and reusing


def two_param_model(width):
    def model():
        pyro.sample("w", dist.Normal(torch.zeros(width), 1.0).to_event(1))

    def guide():
        loc = pyro.param("loc", torch.zeros(width))
        pyro.sample("w", dist.Normal(loc, 1.0).to_event(1))

    return model, guide


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    fit(*two_param_model(2), num_steps=5, progress=False, checkpoint=path)
    pyro.clear_param_store()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"different shapes or dtypes: loc \(checkpoint \(2,\) float32, this run \(3,\)",
    ):
        fit(*two_param_model(3), num_steps=5, progress=False, checkpoint=path)

    def renamed_guide():
        pyro.sample("w", dist.Normal(pyro.param("mu", torch.zeros(2)), 1.0).to_event(1))

    pyro.clear_param_store()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"only in the checkpoint: 'loc'; parameters only in this run: 'mu'",
    ):
        fit(two_param_model(2)[0], renamed_guide, num_steps=5, progress=False, checkpoint=path)
    # resume=False starts over and overwrites it
    pyro.clear_param_store()
    result = fit(*two_param_model(3), num_steps=5, progress=False, checkpoint=path, resume=False)
    assert result.resumed_from is None and ck.load(path)["params"]["loc"].shape == (3,)


def test_optimizer_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    fit(*two_param_model(2), num_steps=5, progress=False, checkpoint=path)
    pyro.clear_param_store()
    with pytest.raises(CheckpointMismatchError, match="torch optimizer but this run uses a pyro"):
        fit(
            *two_param_model(2),
            optim=pyro.optim.Adam({"lr": 0.1}),
            num_steps=5,
            progress=False,
            checkpoint=path,
        )


def test_finished_run_is_restored_without_stepping(script, tmp_path):
    path = tmp_path / "run.ckpt"
    first, params = script.run(str(path))
    assert first.converged and ck.load(path)["done"]
    again, params_again = script.run(str(path))
    assert again.resumed_from == first.num_steps and again.num_steps == first.num_steps
    assert again.reason.startswith("restored from the finished checkpoint")
    assert np.array_equal(again.losses, first.losses)
    for name in params:  # the averaged parameters again
        assert torch.equal(params[name], params_again[name])


def test_longer_budget_continues_a_finished_run(tmp_path):
    path = tmp_path / "run.ckpt"
    short = fit(*two_param_model(2), num_steps=20, seed=1, progress=False, checkpoint=path)
    assert short.num_steps == 20
    pyro.clear_param_store()
    longer = fit(*two_param_model(2), num_steps=50, seed=1, progress=False, checkpoint=path)
    pyro.clear_param_store()
    straight = fit(*two_param_model(2), num_steps=50, seed=1, progress=False)
    assert longer.resumed_from == 20 and np.array_equal(longer.losses, straight.losses)


def test_checkpoints_are_loaded_weights_only(tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"format": ck.FORMAT, "payload": OSError("arbitrary object")}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ck.load(unsafe)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="is not a pyro_elbo.fit checkpoint"):
        fit(*two_param_model(2), num_steps=2, progress=False, checkpoint=other)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.ckpt"
    ck.save_atomic({"format": ck.FORMAT, "x": torch.arange(3)}, path)
    ck.save_atomic({"format": ck.FORMAT, "x": torch.arange(4)}, path)
    assert torch.equal(ck.load(path)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.ckpt"]


def test_random_states_round_trip():
    import random

    state = ck.get_rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]
