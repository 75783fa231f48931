"""Fault injection on fit's checkpoints: concurrent writers, SIGKILL/SIGINT/SIGTERM during steps
and during writes, a full disk, a read-only directory, and every resume that must be refused.

Each test asserts what the checkpoint machinery promises: no torn or mixed checkpoint, a resume
equal bit for bit to the uninterrupted run where resuming is allowed, a named error otherwise,
and the fitted parameters never lost.  Faulty runs are forked children of this process (no
second import of torch); kill points are drawn from a seeded generator.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import signal
import subprocess
import time
import traceback

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo.fit import NonFiniteError, fit, location
from pyro_elbo.fit import checkpoint as ck
from pyro_elbo.fit.checkpoint import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointPathError,
    CheckpointWriteError,
    ResumeNotice,
)
from pyro_elbo.fit.identity import ZeroLearningRateWarning
from pyro_elbo.objectives.elbo import ELBO

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and signals"
)

STEPS, EVERY = 30, 5
X = torch.linspace(-1.0, 2.0, 12).reshape(6, 2)
CALLS = {"armed": False, "count": 0, "at": None, "signal": None, "times": 1}


def model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
    if CALLS["armed"]:  # fault injection inside a step (the model runs mid-step)
        CALLS["count"] += 1
        if CALLS["count"] == CALLS["at"]:
            for _ in range(CALLS["times"]):
                os.kill(os.getpid(), CALLS["signal"])


def guide(x):
    m = pyro.param("m", torch.zeros(2))
    s = pyro.param("s", torch.ones(2), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(m, s).to_event(1))


def arm(state):
    CALLS["armed"] = True


def run(path, *, x=X, steps=STEPS, lr=0.05, callbacks=(), **kwargs):
    pyro.clear_param_store()
    options = dict(
        loss=ELBO(num_particles=2),
        optim=functools.partial(torch.optim.Adam, lr=lr),
        num_steps=steps,
        seed=0,
        init=None,
        progress=False,
        checkpoint=None if path is None else str(path),
        checkpoint_every=EVERY,
    )
    options.update(kwargs)
    result = fit(model, guide, x, callbacks=callbacks, **options)
    store = pyro.get_param_store()
    return result, {n: store[n].unconstrained().detach().clone() for n in ("m", "s")}


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run: losses and parameters after every step."""
    trail = []

    def record(state):
        trail.append({n: pyro.param(n).unconstrained().detach().clone() for n in ("m", "s")})

    result, params = run(None, callbacks=(record,))
    return result, params, trail


def in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child; return its wait status as an exit code (negative:
    killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def assert_consistent(path, reference):
    """The checkpoint is whole, its step matches its losses, and they are the reference's."""
    state = ck.load(path, required=ck.REQUIRED_KEYS)
    step = int(state["step"])
    losses = state["losses"].numpy()
    assert len(losses) == step
    assert np.array_equal(losses, reference[0].losses[:step])
    for name, value in reference[2][step - 1].items():
        assert torch.equal(state["params"][name], value), name
    return step


def assert_resumes_exactly(path, reference):
    result, params = run(path)
    assert result.num_steps == STEPS and np.array_equal(result.losses, reference[0].losses)
    for name in params:
        assert torch.equal(params[name], reference[1][name]), name
    assert not list(path.parent.glob(path.name + ".*.tmp"))  # cleaned by the lock's next holder
    assert not (path.parent / (path.name + ".lock")).exists()
    return result


# ------------------------------------------------------------------ signals


def _fault(path, sig, where, at):
    CALLS.update(armed=False, count=0, at=at, signal=sig, times=1)
    if where == "write":
        calls = []

        def hook(tmp, final):
            calls.append(tmp)
            if len(calls) == at:
                with open(tmp, "r+b") as handle:  # a torn temporary file
                    handle.truncate(os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), sig)

        ck._before_commit = hook
        run(path)
    else:
        run(path, callbacks=(arm,))


FAULTS = [
    (sig, where, trial)
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
    for where in ("step", "write")
    for trial in range(2)
]


@pytest.mark.parametrize(
    ("sig", "where", "trial"), FAULTS, ids=[f"{s.name}-{w}-{t}" for s, w, t in FAULTS]
)
def test_signal_during_a_step_or_a_write_then_resume_is_bit_identical(
    sig, where, trial, reference, tmp_path
):
    rng = random.Random(f"{sig.name}-{where}-{trial}")
    # mid-step: the model's k-th call after step 1 (2 particles: ~1 call per step, vectorized);
    # mid-write: the k-th periodic checkpoint, its temporary file torn first
    at = rng.randint(2, STEPS - 4) if where == "step" else rng.randint(2, STEPS // EVERY - 1)
    path = tmp_path / "run.ckpt"
    code = in_child(_fault, path, sig, where, at)
    if sig == signal.SIGINT:
        assert code == 0  # fit returned its result after checkpointing the step reached
    else:
        assert code == -sig
    step = assert_consistent(path, reference)
    if sig != signal.SIGKILL and where == "step":
        assert step == at + 1  # the step under way (step at + 1) was finished, then written
    if where == "write" and sig == signal.SIGKILL:
        assert step == (at - 1) * EVERY  # the torn write never replaced the previous one
    assert_resumes_exactly(path, reference)


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_from_outside_at_a_random_moment_then_resume_is_bit_identical(
    trial, reference, tmp_path
):
    # a checkpoint every step: much of the run is spent writing, so the kill lands anywhere
    # (in a step, in torch.save, between fsync and rename); whatever it hits, the file on disk
    # is a whole checkpoint of some step, and the resume is the uninterrupted run
    path = tmp_path / "run.ckpt"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            run(path, checkpoint_every=1)
        finally:
            os._exit(0)
    time.sleep(random.Random(trial).uniform(0.05, 0.6))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if path.exists():
        assert_consistent(path, reference)
    assert_resumes_exactly(path, reference)


def test_second_ctrl_c_mid_step_keeps_the_last_checkpoint(reference, tmp_path):
    path = tmp_path / "run.ckpt"

    def twice(path):  # Ctrl-C, Ctrl-C within the same step
        CALLS.update(armed=False, count=0, at=14, signal=signal.SIGINT, times=2)
        result, _ = run(path, callbacks=(arm,))
        assert "mid-step" in result.reason and result.num_steps == len(result.losses)

    assert in_child(twice, path) == 0
    step = assert_consistent(path, reference)
    assert step % EVERY == 0  # the periodic one, not a torn state
    assert_resumes_exactly(path, reference)


# ------------------------------------------------------------------ one writer per path


def _contender(path, gate, out, hold):
    os.read(gate, 1)  # all start together
    try:
        result, _ = run(path, callbacks=(lambda state: time.sleep(hold),))
        outcome = {"kind": "ran", "reason": result.reason, "pid": os.getpid()}
    except CheckpointLockedError as error:
        outcome = {"kind": "locked", "holder": error.pid, "message": str(error)}
    out.write_text(json.dumps(outcome))


def test_concurrent_writers_one_runs_the_others_are_refused_naming_its_pid(reference, tmp_path):
    path = tmp_path / "run.ckpt"
    gate_read, gate_write = os.pipe()
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                _contender(path, gate_read, tmp_path / f"out{i}.json", 0.05)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    os.write(gate_write, b"xxx")
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in pids)
    outcomes = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(3)]
    ran = [o for o in outcomes if o["kind"] == "ran" and not o["reason"].startswith("restored")]
    assert len(ran) == 1  # exactly one run stepped; the others did not mix into its file
    locked = [o for o in outcomes if o["kind"] == "locked"]
    assert locked  # at least one collided (the run holds the path for ~1 s)
    for o in locked:
        assert o["holder"] == ran[0]["pid"] and str(path) in o["message"]
        assert f"process {ran[0]['pid']}" in o["message"]
    assert assert_consistent(path, reference) == STEPS
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run.ckpt"]


def test_stale_lock_of_a_killed_run_is_recovered(reference, tmp_path):
    path = tmp_path / "run.ckpt"
    lock = path.parent / "run.ckpt.lock"

    def killed(path):
        run(path, callbacks=(lambda s: s.step == 12 and os.kill(os.getpid(), signal.SIGKILL),))

    assert in_child(killed, path) == -signal.SIGKILL
    assert lock.exists() and int(lock.read_text()) > 0  # left behind, naming a dead pid
    assert_resumes_exactly(path, reference)


def test_lock_is_exclusive_within_one_process(tmp_path):
    path = tmp_path / "run.ckpt"
    with location.acquire_lock(path):
        with pytest.raises(CheckpointLockedError, match=rf"in use by process {os.getpid()}"):
            run(path, steps=2)
    run(path, steps=2)  # released


# ------------------------------------------------------------------ full and read-only disks


@contextlib.contextmanager
def small_disk(directory, size_kb, read_only=False):
    """A tmpfs of ``size_kb`` at ``directory`` (as root, where ``mount`` works), else ``None``."""
    directory.mkdir()
    mounted = False
    if os.geteuid() == 0:
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                capture_output=True,
            ).returncode
            == 0
        )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory):
    """Write until the file system is full."""
    with contextlib.suppress(OSError), open(directory / "filler", "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)


def test_full_disk_before_step_1_is_refused_before_any_compute(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    steps = []
    with small_disk(disk, 256) as mounted:
        if mounted:
            fill(disk)
        else:  # simulated: the probe write fails with ENOSPC
            monkeypatch.setattr(
                location.os,
                "fsync",
                lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
            )
        with pytest.raises(CheckpointPathError, match=r"disk is full \(ENOSPC\).*before step 1"):
            run(disk / "run.ckpt", callbacks=(lambda s: steps.append(s.step),))
        assert steps == [] and not list(disk.glob("run.ckpt*"))


def test_no_space_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(location.shutil, "disk_usage", lambda d: type("U", (), {"free": 1000})())
    with pytest.raises(CheckpointPathError, match=r"not enough space.*run\.ckpt.*1000 B free"):
        run(tmp_path / "run.ckpt")


def test_disk_full_mid_run_keeps_the_previous_checkpoint_and_the_result(
    reference, tmp_path, monkeypatch
):
    disk = tmp_path / "disk"
    path = disk / "run.ckpt"
    with small_disk(disk, 200) as mounted:

        def exhaust(state):
            if state.step == 12:
                if mounted:
                    fill(disk)
                else:
                    monkeypatch.setattr(
                        ck,
                        "_before_commit",
                        lambda tmp, p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
                    )

        with pytest.warns(RuntimeWarning, match=r"could not write the checkpoint .*disk is full"):
            result, params = run(path, callbacks=(exhaust,))
        # the run went on in memory: the same result as the uninterrupted run
        assert isinstance(result.checkpoint_error, CheckpointWriteError)
        assert result.checkpoint_error.errno == errno.ENOSPC
        assert str(path) in str(result.checkpoint_error)
        assert np.array_equal(result.losses, reference[0].losses)
        assert all(torch.equal(params[n], reference[1][n]) for n in params)
        assert assert_consistent(path, reference) == 10  # the last write that fitted
        assert not list(disk.glob("run.ckpt.*.tmp"))  # no 0-byte or torn temporary left
        (disk / "filler").unlink(missing_ok=True)
        monkeypatch.setattr(ck, "_before_commit", None)
        assert_resumes_exactly(path, reference)


def test_read_only_directory_is_refused_before_step_1(tmp_path):
    disk = tmp_path / "ro"
    with small_disk(disk, 64, read_only=True) as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root ignores permissions and mount is not available")
            disk.chmod(0o555)
        steps = []
        with pytest.raises(
            CheckpointPathError, match=r"cannot write the checkpoint.*before step 1"
        ):
            run(disk / "run.ckpt", callbacks=(lambda s: steps.append(s.step),))
        assert steps == []


def test_bad_locations_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointPathError, match=r"under '.*file': that is a file"):
        run(tmp_path / "file" / "run.ckpt")
    with pytest.raises(CheckpointPathError, match=r"is a directory; pass a file path"):
        run(tmp_path)


# ------------------------------------------------------------------ resume: refuse or apply


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "run.ckpt"
    run(path, steps=10)
    return path


def test_new_learning_rate_is_applied_and_said_in_one_line(written):
    with pytest.warns(ResumeNotice) as notes:
        resumed, params = run(written, steps=20, lr=0.5)
    (note,) = [str(n.message) for n in notes if n.category is ResumeNotice]
    assert "\n" not in note
    assert "learning rate 0.05 -> 0.5 (applied)" in note and "up to 20 steps" in note

    def switch(state):  # the same thing by hand: lr 0.5 from step 11 on
        if state.step == 10:
            for group in state.optimizer.param_groups:
                group["lr"] = 0.5

    straight, straight_params = run(None, steps=20, callbacks=(switch,))
    assert np.array_equal(resumed.losses, straight.losses)
    assert all(torch.equal(params[n], straight_params[n]) for n in params)


def test_same_run_resumes_without_a_word(tmp_path, recwarn):
    path = tmp_path / "run.ckpt"
    run(path, steps=10, loss=pyro.infer.Trace_ELBO())
    result, _ = run(path, steps=10, loss=pyro.infer.Trace_ELBO())
    assert result.resumed_from == 10 and not recwarn.list


def studentt_model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.StudentT(3.0, loc, 1.0).to_event(1), obs=x)


MISMATCHES = {
    "data values": (dict(x=X + 1), r"data: args\[0\]\.hash"),
    "data length": (dict(x=X[:4]), r"model\[1\]\[2\]\[0\]: checkpoint 6, this run 4"),
    "data dtype": (dict(x=X.double()), r"args\[0\]\.dtype: checkpoint 'float32'"),
    "seed": (dict(seed=1), r"seed: checkpoint 0, this run 1"),
    "objective": (dict(loss=ELBO(num_particles=3)), r"settings\.num_particles: checkpoint 2"),
    "analytic_kl": (dict(loss=ELBO(num_particles=2, analytic_kl=True)), r"analytic_kl"),
    "objective class": (dict(loss=pyro.infer.Trace_ELBO()), r"objective: checkpoint 'pyro_elbo"),
    "optimizer": (
        dict(optim=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)),
        r"optimizer: checkpoint torch\.optim\.adam\.Adam, this run torch\.optim\.sgd\.SGD",
    ),
    "optimizer setting": (
        dict(optim=functools.partial(torch.optim.Adam, lr=0.05, betas=(0.5, 0.9))),
        r"optimizer \[0\]\.betas",
    ),
    "likelihood": (dict(model=studentt_model), r"'Normal'.*'StudentT'"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_resume_that_cannot_be_mixed_is_refused_naming_the_difference(case, written):
    change, match = MISMATCHES[case]
    change = dict(change)
    other_model = change.pop("model", None)
    with pytest.raises(CheckpointMismatchError, match=match) as error:
        if other_model is None:
            run(written, steps=20, **change)
        else:
            pyro.clear_param_store()
            fit(
                other_model,
                guide,
                X,
                loss=ELBO(num_particles=2),
                num_steps=20,
                seed=0,
                init=None,
                progress=False,
                checkpoint=str(written),
                optim=functools.partial(torch.optim.Adam, lr=0.05),
            )
    assert "resume=False" in str(error.value) and str(written) in str(error.value)
    assert ck.load(written)["step"] == 10  # untouched


class Batches:
    """A re-iterable of batches with no length: only its type identifies it."""

    def __init__(self, num_batches):
        self.num_batches = num_batches

    def __iter__(self):
        return iter(X[: 2 * self.num_batches].split(2))


def test_other_batches_are_refused(tmp_path):
    path = tmp_path / "run.ckpt"

    def batched_run(data, stop=None):
        pyro.clear_param_store()
        return fit(
            model,
            guide,
            data=data,
            num_steps=10,
            seed=0,
            init=None,
            progress=False,
            checkpoint=str(path),
            loss=ELBO(),
            callbacks=(lambda s: s.step == stop,),
        )

    loader = functools.partial(torch.utils.data.DataLoader, torch.utils.data.TensorDataset(X))
    batched_run(loader(batch_size=2), stop=4)
    with pytest.raises(CheckpointMismatchError, match=r"batches\.batch_size: checkpoint 2"):
        batched_run(loader(batch_size=3))
    with pytest.raises(CheckpointMismatchError, match=r"batches\.type"):
        batched_run(Batches(3))
    path.unlink()
    batched_run(Batches(3), stop=2)  # stopped at batch 2 of an epoch of 3
    with pytest.raises(CheckpointMismatchError, match=r"at batch 2 .* fewer batches per epoch"):
        batched_run(Batches(1))


def test_damaged_or_unsafe_checkpoints_are_named(written):
    state = ck.load(written)
    del state["optim"], state["rng"]
    torch.save(state, written)
    with pytest.raises(CheckpointError, match=r"lacks \['optim', 'rng'\].*resume=False"):
        run(written)
    torch.save({"format": ck.FORMAT, "payload": OSError("code")}, written)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(.*OSError\)") as error:
        run(written)
    assert "will likely succeed" not in str(error.value)  # torch's advice is not repeated
    assert error.value.__cause__ is None


def test_inputs_that_raised_raw_errors_are_named(tmp_path):
    with pytest.warns(ZeroLearningRateWarning, match=r"learning rate is 0 .*Pass a positive lr"):
        run(None, lr=0.0, steps=1)
    with pytest.raises(ValueError, match=r"the data are empty: args\[0\] \(shape \(0, 2\)\)"):
        run(None, x=torch.zeros(0, 2))
    bad = X.clone()
    bad[4, 1] = float("nan")

    def batch_model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 2.0).to_event(1))
        with pyro.plate("data", 6, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    with pytest.raises(FloatingPointError, match=r"data observed at 'x'.*not the cause") as error:
        fit(batch_model, guide, data=list(bad.split(2)), num_steps=6, init=None, progress=False)
    assert error.value.step == 3 and "smaller learning rate" not in str(error.value)


# ------------------------------------------------------------------ fit_distributed


def linreg_model(x, full_size, subsample):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", full_size, subsample=subsample):
        pyro.sample("obs", dist.Normal(w * x, 1.0), obs=x)


def linreg_guide(x, full_size, subsample):
    pyro.sample("w", dist.Normal(pyro.param("wm", torch.tensor(0.0)), 0.5))


def test_fit_distributed_resume_applies_lr_and_refuses_dtype_casts(tmp_path):
    from pyro_elbo.distributed import fit_distributed

    path = str(tmp_path / "dist.ckpt")
    x = torch.linspace(0.0, 1.0, 8)

    def go(num_steps, lr, data=x, **kw):
        pyro.clear_param_store()
        return fit_distributed(
            linreg_model,
            linreg_guide,
            data,
            num_steps=num_steps,
            batch_size=4,
            lr=lr,
            checkpoint=path,
            checkpoint_every=3,
            **kw,
        )

    go(6, 0.01)
    with pytest.warns(ResumeNotice, match=r"learning rate 0\.01 -> 0\.5 \(applied\)"):
        resumed = go(9, 0.5)
    assert resumed.start_step == 6
    torch.set_default_dtype(torch.float64)  # a float64 model: the float32 state is not cast
    try:
        with pytest.raises(CheckpointMismatchError, match=r"different shapes or dtypes: wm \(che"):
            go(12, 0.5, data=x.double())
    finally:
        torch.set_default_dtype(torch.float32)
    with pytest.raises(CheckpointMismatchError, match=r"seed: checkpoint 0, this run 1"):
        go(12, 0.5, seed=1)
    with pytest.raises(ValueError, match=r"lr must be a positive number, got 0"):
        go(12, 0)
    with pytest.raises(ValueError, match=r"data have no rows"):
        go(12, 0.5, data=torch.zeros(0))
    bad = x.clone()
    bad[6] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"data observed at 'obs'.*not the cause"
    ):
        pyro.clear_param_store()
        fit_distributed(linreg_model, linreg_guide, bad, num_steps=4, batch_size=4, shuffle=False)


def test_fit_distributed_sigint_mid_step_checkpoints_that_step_and_resumes_exactly(tmp_path):
    from pyro_elbo.distributed import fit_distributed

    path = str(tmp_path / "dist.ckpt")
    x = torch.linspace(0.0, 1.0, 8)

    def noisy_model(x, full_size, subsample):
        linreg_model(x, full_size, subsample)
        if CALLS["armed"]:
            CALLS["count"] += 1
            if CALLS["count"] == CALLS["at"]:
                os.kill(os.getpid(), signal.SIGINT)

    def go(checkpoint):
        pyro.clear_param_store()
        result = fit_distributed(
            noisy_model,
            linreg_guide,
            x,
            num_steps=12,
            batch_size=4,
            lr=0.05,
            checkpoint=checkpoint,
            checkpoint_every=5,
        )
        return result, pyro.param("wm").detach().clone()

    def interrupted():
        CALLS.update(armed=True, count=0, at=10, signal=signal.SIGINT, times=1)
        result, _ = go(path)
        assert result.stopped_by == "SIGINT" and 5 < result.num_steps < 10
        (tmp_path / "steps").write_text(str(result.num_steps))

    CALLS.update(armed=False)
    assert in_child(interrupted) == 0
    state = torch.load(path, weights_only=True)
    steps = int((tmp_path / "steps").read_text())
    assert state["step"] == steps == len(state["losses"])  # the step under way, finished
    straight, wm = go(str(tmp_path / "other.ckpt"))
    resumed, wm_resumed = go(path)
    assert resumed.start_step == steps and resumed.losses == straight.losses
    assert torch.equal(wm, wm_resumed)


def _two_rank_worker(outdir):
    """Each of 2 gloo ranks: an uninterrupted run, a run whose rank 1 alone gets SIGINT in the
    middle of a step, and its resume."""
    from datetime import timedelta

    from pyro_elbo.distributed import fit_distributed, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(timeout=timedelta(seconds=60))
    x = torch.linspace(0.0, 1.0, 16)

    def go(name, signal_at=None):
        pyro.clear_param_store()
        calls = [0]

        def model(x, full_size, subsample):
            linreg_model(x, full_size, subsample)
            calls[0] += 1
            if ctx.rank == 1 and calls[0] == signal_at:
                os.kill(os.getpid(), signal.SIGINT)

        result = fit_distributed(
            model,
            linreg_guide,
            x,
            num_steps=12,
            batch_size=4,
            lr=0.05,
            checkpoint=os.path.join(outdir, name),
            checkpoint_every=5,
        )
        return result, pyro.param("wm").detach().clone()

    straight, wm = go("a.ckpt")
    stopped, _ = go("b.ckpt", signal_at=9)
    written = torch.load(os.path.join(outdir, "b.ckpt"), weights_only=True)  # after the stop
    resumed, wm_resumed = go("b.ckpt")
    torch.save(
        {
            "straight": straight.losses,
            "wm": wm,
            "stopped": stopped.num_steps,
            "stopped_by": stopped.stopped_by,
            "resumed": resumed.losses,
            "start": resumed.start_step,
            "written": (written["step"], len(written["losses"])),
            "wm_resumed": wm_resumed,
        },
        os.path.join(outdir, f"rank{ctx.rank}.pt"),
    )


def test_sigint_on_one_of_two_ranks_stops_both_after_the_same_step(tmp_path):
    from pyro_elbo.distributed import launch

    launch(_two_rank_worker, str(tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    steps = ranks[0]["stopped"]
    assert ranks[1]["stopped"] == steps and 5 < steps < 12 and steps != 10
    assert ranks[1]["stopped_by"] == "SIGINT"
    assert ranks[0]["stopped_by"] == "a signal on another rank"
    assert ranks[0]["written"] == (steps, steps)  # the checkpoint of the agreed step
    for rank in ranks:
        assert rank["start"] == steps and rank["resumed"] == rank["straight"]
        assert torch.equal(rank["wm_resumed"], rank["wm"])


def test_fit_distributed_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from pyro_elbo.distributed import fit_distributed, load_checkpoint

    path = str(tmp_path / "dist.ckpt")
    x = torch.linspace(0.0, 1.0, 8)
    writes = []

    def full_after_first(tmp, final):
        writes.append(tmp)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_before_commit", full_after_first)
    with pytest.warns(RuntimeWarning, match=r"could not write the checkpoint .*disk is full"):
        result = fit_distributed(
            linreg_model,
            linreg_guide,
            x,
            num_steps=9,
            batch_size=4,
            checkpoint=path,
            checkpoint_every=3,
        )
    assert isinstance(result.checkpoint_error, CheckpointWriteError)
    assert result.num_steps == 9 and len(result.losses) == 9  # the run went on in memory
    assert load_checkpoint(path)["step"] == 3  # the last write that succeeded, whole
    assert not list(tmp_path.glob("dist.ckpt.*.tmp"))
