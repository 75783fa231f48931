"""Data-parallel training through ``fit`` (pyro_elbo.fit.data_parallel): 2 gloo processes
against 1 process.

One launch of 2 processes (``launch``: ``torch.multiprocessing.spawn`` with a free port) runs
every data-parallel scenario on both ranks and saves what each rank saw; the 1-process runs
happen here.

* Posterior: ``fit(model, guide, data=DataLoader(...))`` with the model written for one process
  (``pyro.plate("data", N, subsample_size=len(y))``) on the LinearRegression oracle, 2 ranks x 4
  particles x 32 rows against 1 process x 8 particles x 64 rows, both stopped by
  ``AutoConvergence``.  The fitted means agree with each other and with the exact posterior within
  5 Monte Carlo SE (the rule's own MCSE, in units of each coordinate's scale 1/sqrt(P_ii)); a
  model whose plate draws its own subsample (no ``data=``) likewise.  Both ranks end with the same
  guide, the same number of steps, ``converged`` and the same ``reason``.
* NaN on rank 1 only: both ranks raise NonFiniteError at the same step, naming rank 1, with the
  parameters of the last finite step (equal on both ranks) and the last checkpoint intact.
* Checkpoints: rank 0 writes one file holding both ranks' random states; a run stopped at step 20
  and resumed to 40 reproduces the uninterrupted run bit for bit on both ranks.
* A callback that stops rank 1 stops rank 0 after the same step.
* ``fit_distributed`` (the launcher-facing wrapper, old keyword contract): MAP trajectories of
  2 ranks equal 1 process to rounding (the 2 shards of a step are the 1-process batch).
"""

from __future__ import annotations

import functools
import os
import warnings
from datetime import timedelta

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal, init_to_mean
from torch.utils.data import DataLoader, TensorDataset

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.distributed import (
    DistributedResult,
    fit_distributed,
    init_distributed,
    is_main_process,
    launch,
    load_checkpoint,
)
from pyro_elbo.fit import (
    AutoConvergence,
    CheckpointMismatchError,
    FitResult,
    NonFiniteError,
    fit,
)
from pyro_elbo.fit.batches import ShardedBatches
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO

DTYPE = torch.float64
POST = {"N": 128, "D": 2, "rows": 64, "particles": 8, "lr": 0.05, "seed": 0}
MAP = {"N": 128, "D": 3, "batch": 32, "steps": 60, "lr": 0.05, "seed": 3}


def _oracle(n, d, seed):
    return LinearRegression.simulate(n, d, seed=seed, dtype=DTYPE, noise_scale=0.5)


def _prior(oracle):
    return dist.Normal(torch.zeros_like(oracle.prior_scale), oracle.prior_scale).to_event(1)


def _batch_model(oracle):
    """The model as written for one process: a minibatch (X, y) of the full data's N rows."""

    def model(X, y):
        w = pyro.sample("weights", _prior(oracle))
        with pyro.plate("data", oracle.num_data, subsample_size=len(y)):
            pyro.sample("obs", dist.Normal((X * w).sum(-1), oracle.noise_scale), obs=y)

    return model


def _subsampling_model(oracle, size):
    """A model whose plate draws its own subsample of the full data (each rank its own)."""

    def model(X, y):
        w = pyro.sample("weights", _prior(oracle))
        with pyro.plate("data", len(y), subsample_size=size) as idx:
            pyro.sample("obs", dist.Normal((X[idx] * w).sum(-1), oracle.noise_scale), obs=y[idx])

    return model


def _fit_posterior(world_size, subsample=False):
    pyro.clear_param_store()
    oracle = _oracle(POST["N"], POST["D"], seed=1)
    options = dict(
        loss=ELBO(POST["particles"] // world_size),
        optim=functools.partial(torch.optim.Adam, lr=POST["lr"]),
        convergence=AutoConvergence(window=100),
        max_steps=4000,
        seed=POST["seed"],
        progress=False,
        init=None,
    )
    rows = POST["rows"] // world_size
    if subsample:
        model = _subsampling_model(oracle, rows)
        guide = AutoMultivariateNormal(model)
        result = fit(model, guide, oracle.X, oracle.y, **options)
    else:
        model = _batch_model(oracle)
        guide = AutoMultivariateNormal(model)
        loader = DataLoader(TensorDataset(oracle.X, oracle.y), batch_size=rows, shuffle=True)
        result = fit(model, guide, data=loader, **options)
    q = posterior_of(guide)
    return result, oracle, q


def _posterior_record(result, q):
    return {
        "loc": q.loc,
        "scale_tril": q.scale_tril,
        "converged": result.converged,
        "reason": result.reason,
        "num_steps": result.num_steps,
        "mcse": result.diagnostics["mcse"],
        "losses": torch.as_tensor(result.losses),
        "rank": result.distributed.rank,
        "world_size": result.distributed.world_size,
    }


# ------------------------------------------------------------------ the scenarios of each rank


def _nan_on_rank_one(outdir, rank):
    """Rank 1's 4th batch holds a NaN: every rank raises at step 4, with step 3's state."""
    pyro.clear_param_store()
    oracle = _oracle(96, 2, seed=2)
    model = _batch_model(oracle)
    batches = [(x, y.clone()) for x, y in zip(oracle.X.split(8), oracle.y.split(8))]
    batches[2 * 3 + 1][1][5] = float("nan")  # rank 1 takes batches 1, 3, 5, 7 (its 4th)
    snapshots = {}

    def snapshot(state):
        snapshots[state.step] = {n: v.detach().clone() for n, v in state.params.items()}

    path = os.path.join(outdir, "nan.ckpt")
    try:
        fit(model, AutoDelta(model), data=batches, num_steps=10, progress=False, init=None,
            seed=4, callbacks=[snapshot], checkpoint=path, checkpoint_every=2)
    except NonFiniteError as error:
        raised = {"type": "NonFiniteError", "step": error.step, "ranks": error.ranks,
                  "message": str(error), "sites": error.sites}
    else:
        raised = None
    now = {n: pyro.param(n).detach().clone() for n in snapshots[3]}
    return {"raised": raised, "params": now, "step3": snapshots[3],
            "checkpoint_step": load_checkpoint(path)["step"] if rank == 0 else None}


def _checkpointed(outdir, name, num_steps):
    pyro.clear_param_store()
    oracle = _oracle(64, 2, seed=5)
    model = _batch_model(oracle)
    guide = AutoNormal(model)
    loader = DataLoader(TensorDataset(oracle.X, oracle.y), batch_size=8, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ResumeNotice of the longer call
        result = fit(model, guide, data=loader, num_steps=num_steps, progress=False, seed=6,
                     checkpoint=os.path.join(outdir, name), checkpoint_every=10)
    return result, {n: pyro.param(n).detach().clone() for n in ("AutoNormal.locs.weights",
                                                                 "AutoNormal.scales.weights")}


def _stopped_by_a_callback(rank):
    pyro.clear_param_store()
    oracle = _oracle(64, 2, seed=5)
    model = _batch_model(oracle)

    def stop_rank_one(state):
        return rank == 1 and state.step == 5

    result = fit(model, AutoDelta(model), data=list(zip(oracle.X.split(8), oracle.y.split(8))),
                 num_steps=20, progress=False, init=None, callbacks=[stop_rank_one])
    return {"num_steps": result.num_steps, "reason": result.reason}


def _fails_on_rank_one(rank, when):
    """Rank 1's model raises from the start (``"before"`` step 1) or from step 3 on."""
    pyro.clear_param_store()
    oracle = _oracle(64, 2, seed=5)
    batch_model, armed = _batch_model(oracle), [when == "before"]

    def model(X, y):
        if rank == 1 and armed[0]:
            raise KeyError("the model's own bug")
        batch_model(X, y)

    def arm(state):
        armed[0] = armed[0] or state.step == 2

    try:
        fit(model, AutoDelta(model), data=list(zip(oracle.X.split(8), oracle.y.split(8))),
            num_steps=10, progress=False, init=None, callbacks=[arm])
    except Exception as error:  # noqa: BLE001 - the test records what each rank raised
        return f"{type(error).__name__}: {error}"
    return None


def _fit_map(checkpoint=None, device=None, **guide_options):
    pyro.clear_param_store()
    oracle = _oracle(MAP["N"], MAP["D"], seed=0)
    if device is not None:
        oracle.to(device)

    def model(X, y, full_size, subsample):  # the old keyword contract (deprecated)
        w = pyro.sample("weights", _prior(oracle))
        with pyro.plate("data", full_size, subsample=subsample):
            pyro.sample("obs", dist.Normal((X * w).sum(-1), oracle.noise_scale), obs=y)

    guide = AutoDelta(model, **guide_options)
    result = fit_distributed(
        model, guide, (oracle.X, oracle.y), num_steps=MAP["steps"], batch_size=MAP["batch"],
        lr=MAP["lr"], seed=MAP["seed"], checkpoint=checkpoint, checkpoint_every=30,
    )
    params = {n: pyro.param(n).detach().cpu().clone() for n in result.param_names}
    return result, params


def _worker(outdir):
    """Runs on each of the 2 ranks."""
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    ctx = init_distributed(timeout=timedelta(seconds=120))
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    record = {"rank": ctx.rank, "is_main": is_main_process()}
    result, _, q = _fit_posterior(2)
    record["loader"] = _posterior_record(result, q)
    result, _, q = _fit_posterior(2, subsample=True)
    record["plate"] = _posterior_record(result, q)
    record["nan"] = _nan_on_rank_one(outdir, ctx.rank)
    straight, expected = _checkpointed(outdir, "straight.ckpt", 40)
    _checkpointed(outdir, "resumed.ckpt", 20)
    record["half"] = load_checkpoint(os.path.join(outdir, "resumed.ckpt")) if ctx.rank == 0 else None
    resumed, got = _checkpointed(outdir, "resumed.ckpt", 40)
    record["checkpoint"] = {"straight": torch.as_tensor(straight.losses), "expected": expected,
                            "resumed": torch.as_tensor(resumed.losses), "got": got,
                            "resumed_from": resumed.resumed_from}
    record["callback"] = _stopped_by_a_callback(ctx.rank)
    record["fails"] = [_fails_on_rank_one(ctx.rank, when) for when in ("before", "step")]
    map_result, map_params = _fit_map(checkpoint=os.path.join(outdir, "map.pt"))
    record["map"] = {"losses": map_result.losses, "params": map_params,
                     "per_rank": map_result.batch_size_per_rank}
    torch.save(record, os.path.join(outdir, f"rank{ctx.rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    launch(_worker, str(outdir), nprocs=2)
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return outdir, ranks


def _scale(oracle):
    """Each coordinate's scale in AutoConvergence's MCSE: 1 / sqrt(F_ii), F_ii = P_ii for the
    location of a Gaussian guide at the exact posterior (precision P)."""
    return oracle.posterior().precision_matrix.diagonal().rsqrt()


# ------------------------------------------------------------------ 2 ranks vs 1 process


@pytest.mark.parametrize("kind", ["loader", "plate"])
def test_two_ranks_fit_the_exact_posterior_like_one_process(two_ranks, kind):
    _, ranks = two_ranks
    two = ranks[0][kind]
    for key in ("loc", "scale_tril"):  # every rank ends at the same guide
        assert torch.equal(ranks[1][kind][key], two[key])
    for key in ("converged", "reason", "num_steps"):  # and stops at the same step, agreeing why
        assert ranks[1][kind][key] == two[key]
    assert torch.equal(ranks[1][kind]["losses"], two["losses"])  # the loss averaged over ranks
    assert two["converged"] and two["reason"].startswith("converged: iterates stationary")
    assert [r[kind]["rank"] for r in ranks] == [0, 1] and two["world_size"] == 2
    one, oracle, q_one = _fit_posterior(1, subsample=(kind == "plate"))
    assert one.converged and one.distributed is None
    exact, scale = oracle.posterior(), _scale(oracle)
    se_one, se_two = one.diagnostics["mcse"] * scale, two["mcse"] * scale
    assert ((q_one.loc - exact.mean).abs() < 5 * se_one).all()
    assert ((two["loc"] - exact.mean).abs() < 5 * se_two).all()
    assert ((two["loc"] - q_one.loc).abs() < 5 * (se_one**2 + se_two**2).sqrt()).all()
    q_two = dist.MultivariateNormal(two["loc"], scale_tril=two["scale_tril"])
    for q in (q_one, q_two):  # the covariance too (the family holds the exact posterior)
        assert torch.distributions.kl_divergence(q, exact).item() < 0.02


def test_nan_on_one_rank_raises_on_both_and_keeps_the_last_finite_state(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        raised = rank["nan"]["raised"]
        assert raised is not None and raised["type"] == "NonFiniteError"
        assert raised["step"] == 4 and raised["ranks"] == [1]
        assert "non-finite loss on ranks [1]" in raised["message"]
        for name, value in rank["nan"]["params"].items():  # no step was taken at step 4
            assert torch.equal(value, rank["nan"]["step3"][name])
            assert torch.equal(value, ranks[0]["nan"]["params"][name])
    assert ("model", "obs", "the observed data hold NaN/inf") in ranks[1]["nan"]["raised"]["sites"]
    assert ranks[0]["nan"]["checkpoint_step"] == 2  # the last checkpoint is kept


def test_rank_zero_checkpoints_and_a_resume_is_bit_for_bit(two_ranks):
    outdir, ranks = two_ranks
    half = ranks[0]["half"]
    assert half["step"] == 20 and half["world_size"] == 2 and len(half["rng"]) == 2
    assert not torch.equal(half["rng"][0]["torch"], half["rng"][1]["torch"])  # own streams
    names = {p.name for p in outdir.iterdir()}
    assert {"nan.ckpt", "resumed.ckpt", "straight.ckpt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # no temporary left
    for rank in ranks:
        run = rank["checkpoint"]
        assert run["resumed_from"] == 20
        assert torch.equal(run["resumed"], run["straight"])
        for name, value in run["expected"].items():
            assert torch.equal(run["got"][name], value)
            assert torch.equal(value, ranks[0]["checkpoint"]["expected"][name])


def test_a_two_rank_checkpoint_is_not_resumed_by_one_process(two_ranks, tmp_path):
    outdir, _ = two_ranks
    path = tmp_path / "two.ckpt"
    path.write_bytes((outdir / "resumed.ckpt").read_bytes())
    with pytest.raises(CheckpointMismatchError, match=r"on 2 process\(es\) and this run has 1"):
        _checkpointed(str(tmp_path), "two.ckpt", 60)


def test_an_error_on_one_rank_is_raised_on_both(two_ranks):
    _, ranks = two_ranks
    for own in ranks[1]["fails"]:
        assert own.startswith("KeyError") and "the model's own bug" in own
    before, during = ranks[0]["fails"]
    assert before.startswith("RuntimeError: fit: rank 1 of 2 failed before step 1 (KeyError")
    assert during.startswith("RuntimeError: fit: rank 1 of 2 failed in a step (KeyError")


def test_a_callback_that_stops_one_rank_stops_both(two_ranks):
    _, ranks = two_ranks
    assert [r["callback"]["num_steps"] for r in ranks] == [5, 5]
    assert "a callback on another rank" in ranks[0]["callback"]["reason"]
    assert "stop_rank_one" in ranks[1]["callback"]["reason"]


def test_fit_distributed_map_trajectory_of_two_ranks_equals_one_process(two_ranks):
    outdir, ranks = two_ranks
    assert [r["is_main"] for r in ranks] == [True, False]
    assert ranks[0]["map"]["per_rank"] == MAP["batch"] // 2
    with pytest.warns(DeprecationWarning, match="full_size=N, subsample=idx"):
        one, params = _fit_map()
    assert isinstance(one, DistributedResult) and isinstance(one, FitResult)
    assert one.batch_size_per_rank == MAP["batch"] and one.world_size == 1
    for rank in ranks:
        for name, value in rank["map"]["params"].items():
            assert torch.equal(value, ranks[0]["map"]["params"][name]), name
            torch.testing.assert_close(value, params[name], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            torch.tensor(rank["map"]["losses"]), torch.tensor(one.losses), rtol=1e-9, atol=1e-7
        )
    assert one.losses[-1] < 0.5 * one.losses[0]  # the fit moved
    saved = load_checkpoint(outdir / "map.pt")
    assert saved["step"] == MAP["steps"] and saved["world_size"] == 2 and len(saved["rng"]) == 2
    for name, value in saved["params"].items():
        torch.testing.assert_close(value, pyro.param(name).unconstrained().detach())


def _cuda_worker(outdir):
    warnings.simplefilter("ignore", DeprecationWarning)
    ctx = init_distributed(device="cuda", timeout=timedelta(seconds=120))
    assert ctx.backend == "nccl" and ctx.device == torch.device("cuda", ctx.rank)
    result, params = _fit_map(device=ctx.device, init_loc_fn=init_to_mean)
    assert result.device == ctx.device
    if ctx.rank == 0:
        torch.save({"params": params, "losses": result.losses}, os.path.join(outdir, "cuda.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
    reason="needs CUDA and NCCL",
)
def test_nccl_on_cuda_follows_the_cpu_trajectory(tmp_path):
    launch(_cuda_worker, str(tmp_path), nprocs=min(2, torch.cuda.device_count()))
    cuda = torch.load(tmp_path / "cuda.pt", weights_only=False)
    with pytest.warns(DeprecationWarning):
        cpu, params = _fit_map(init_loc_fn=init_to_mean)  # CUDA and CPU draw different numbers
    torch.testing.assert_close(torch.tensor(cuda["losses"]), torch.tensor(cpu.losses))
    for name, value in params.items():
        torch.testing.assert_close(cuda["params"][name], value)


# ------------------------------------------------------------------ one process


def _small_fit(checkpoint=None, num_steps=40, **kwargs):
    pyro.clear_param_store()
    oracle = _oracle(64, 2, seed=5)
    model = _batch_model(oracle)
    guide = AutoMultivariateNormal(model)
    result = fit_distributed(model, guide, (oracle.X, oracle.y), num_steps=num_steps,
                             batch_size=16, checkpoint=checkpoint, **kwargs)
    return result, {n: pyro.param(n).detach().clone() for n in result.param_names}


@pytest.mark.parametrize("optim", ["torch", "pyro"])
def test_fit_distributed_resume_continues_exactly(tmp_path, optim):
    def options():
        if optim == "pyro":
            return {"optim": pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})}
        return {
            "lr": 0.05,
            "scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        }

    straight, expected = _small_fit(**options())
    path = tmp_path / "ckpt.pt"
    _small_fit(checkpoint=str(path), num_steps=20, checkpoint_every=10, **options())
    assert load_checkpoint(path)["step"] == 20
    with pytest.warns(UserWarning, match="up to 40 steps"):
        resumed, got = _small_fit(checkpoint=str(path), num_steps=40, checkpoint_every=10,
                                  **options())
    assert resumed.start_step == 20 and resumed.num_steps == 40
    assert resumed.losses == straight.losses
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_single_process_without_torchrun_is_plain_fit():
    assert "RANK" not in os.environ
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert is_main_process()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the model takes no keywords
        result, _ = _small_fit(num_steps=3, lr=0.01)
    assert result.world_size == 1 and result.batch_size_per_rank == 16
    assert result.epochs == 3 / 4 and result.distributed is None
    assert result.converged is False and "num_steps=3" in result.reason


def test_dataset_input_matches_tensor_input():
    oracle = _oracle(64, 2, seed=5)
    runs = []
    for data in ((oracle.X, oracle.y), TensorDataset(oracle.X, oracle.y)):
        pyro.clear_param_store()
        model = _batch_model(oracle)
        fit_distributed(model, AutoDelta(model), data, num_steps=5, batch_size=16, lr=0.05, seed=1)
        runs.append(pyro.param("AutoDelta.weights").detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_sharded_batches_take_every_other_batch_and_replay_their_position():
    batches = [torch.full((2,), float(i)) for i in range(7)]
    shard = ShardedBatches(batches, rank=1, world_size=2, seed=0)
    taken = [shard.next()[0].item() for _ in range(5)]
    assert taken == [1, 3, 5, 1, 3]  # 3 a rank an epoch (7 // 2), the 7th batch is left out
    state = shard.state_dict()
    again = ShardedBatches(batches, rank=1, world_size=2, seed=0)
    again.load_state_dict(state)
    assert again.next()[0].item() == shard.next()[0].item() == 5
    with pytest.raises(ValueError, match="one-shot iterator"):
        ShardedBatches(iter(batches), rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        ShardedBatches(batches, rank=0, world_size=8, seed=0)


def test_bad_input_is_explained():
    oracle = _oracle(64, 2, seed=5)
    model = _batch_model(oracle)
    with pytest.raises(ValueError, match="distributed must be 'auto', True, False"):
        fit(model, AutoDelta(model), oracle.X, oracle.y, distributed="yes")
    with pytest.raises(ValueError, match="first .data. dimension"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y[:10]), num_steps=1,
                        batch_size=8)
    with pytest.raises(ValueError, match="batch_size=100 is too large"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y), num_steps=1, batch_size=100)
    with pytest.raises(ValueError, match="num_steps"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y), num_steps=0, batch_size=8)
    with pytest.raises(TypeError, match="optim"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y), num_steps=1, batch_size=8,
                        optim=0.1)
    with pytest.raises(TypeError, match="data must be"):
        fit_distributed(model, AutoDelta(model), 3.0, num_steps=1, batch_size=8)
