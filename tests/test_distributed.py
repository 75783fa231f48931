"""Data-parallel SVI (pyro_elbo.distributed): 2 gloo processes against 1 process.

One launch of 2 processes (``launch``, i.e. ``torch.multiprocessing.spawn`` with a free port)
runs two fits on every rank and saves what each rank saw; the 1-process runs happen here, with
the same seed and the same global batch.

* MAP (AutoDelta): the ELBO gradient is deterministic given the batch, and the 2 ranks' shards
  of a step are exactly the 1-process batch of that step, so the trajectories must agree to
  rounding error.  This checks the sharding, the N/n plate scaling on each rank, the gradient
  average and the broadcast of rank 0's initial values (AutoDelta starts at a random draw from
  the prior, and the ranks have different seeds).
* AutoMultivariateNormal on a LinearRegression oracle: 2 ranks x 16 particles against 1 process
  x 32 particles (the same estimator in distribution).  Both recover the exact posterior (KL < 0.01)
  and their late losses estimate the same full-data -ELBO = -log p(y) within MC error.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, init_to_mean

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.distributed import (
    fit_distributed,
    init_distributed,
    is_main_process,
    launch,
    load_checkpoint,
)
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO

DTYPE = torch.float64
MAP = {"N": 128, "D": 3, "batch": 32, "steps": 60, "lr": 0.05, "seed": 3}
MVN = {"N": 256, "D": 3, "batch": 64, "steps": 600, "lr": 0.05, "particles": 32, "seed": 11}
LATE = 200  # the last steps, whose losses estimate the converged -ELBO (q has settled by then)


def _oracle(n, d, seed):
    return LinearRegression.simulate(n, d, seed=seed, dtype=DTYPE, noise_scale=0.5)


def _make_model(oracle, draws=None):
    def model(X, y, full_size, subsample):
        prior = dist.Normal(torch.zeros_like(oracle.prior_scale), oracle.prior_scale)
        w = pyro.sample("weights", prior.to_event(1))
        if draws is not None:
            draws.append(w.detach().clone())
        with pyro.plate("data", full_size, subsample=subsample):
            pyro.sample("obs", dist.Normal((X * w).sum(-1), oracle.noise_scale), obs=y)

    return model


def _fit_map(checkpoint=None, device=None, **guide_options):
    pyro.clear_param_store()
    oracle = _oracle(MAP["N"], MAP["D"], seed=0)
    if device is not None:
        oracle.to(device)
    model = _make_model(oracle)
    guide = AutoDelta(model, **guide_options)
    result = fit_distributed(
        model,
        guide,
        (oracle.X, oracle.y),
        num_steps=MAP["steps"],
        batch_size=MAP["batch"],
        lr=MAP["lr"],
        seed=MAP["seed"],
        checkpoint=checkpoint,
        checkpoint_every=30,
    )
    params = {n: pyro.param(n).detach().cpu().clone() for n in result.param_names}
    return result, params


def _fit_mvn(num_particles):
    pyro.clear_param_store()
    oracle = _oracle(MVN["N"], MVN["D"], seed=1)
    draws = []
    model = _make_model(oracle, draws)
    guide = AutoMultivariateNormal(model)
    result = fit_distributed(
        model,
        guide,
        (oracle.X, oracle.y),
        loss=ELBO(num_particles),
        num_steps=MVN["steps"],
        batch_size=MVN["batch"],
        lr=MVN["lr"],
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, MVN["steps"]),
        seed=MVN["seed"],
    )
    q = posterior_of(guide)
    return result, oracle, q, draws[-1]


def _worker(outdir):
    """Runs on each of the 2 ranks."""
    torch.set_num_threads(1)
    ctx = init_distributed(timeout=timedelta(seconds=120))
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    map_result, map_params = _fit_map(checkpoint=os.path.join(outdir, "map.pt"))
    mvn_result, _, q, last_draw = _fit_mvn(MVN["particles"] // ctx.world_size)
    torch.save(
        {
            "rank": ctx.rank,
            "is_main": is_main_process(),
            "map_losses": map_result.losses,
            "map_params": map_params,
            "map_batch_per_rank": map_result.batch_size_per_rank,
            "mvn_losses": mvn_result.losses,
            "mvn_loc": q.loc,
            "mvn_cov": q.covariance_matrix,
            "mvn_last_draw": last_draw,
        },
        os.path.join(outdir, f"rank{ctx.rank}.pt"),
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    launch(_worker, str(outdir), nprocs=2)
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return outdir, ranks


def _late_mean_and_se(losses, blocks=10):
    """Mean of the last LATE losses, and its SE by batch means.

    Each block (20 steps) is 5 whole epochs: over an epoch the minibatch terms N/n sum_B log p
    add up to the full-data sum, so the data-subsampling noise cancels within a block and the
    block means vary only with the particles.  Batch means capture that; sd / sqrt(LATE) would
    not (it is ~20x larger here)."""
    late = torch.tensor(losses[-LATE:], dtype=torch.float64)
    means = late.reshape(blocks, -1).mean(-1)
    return late.mean().item(), (means.std() / blocks**0.5).item()


# ------------------------------------------------------------------------------ 2 ranks vs 1


def test_map_trajectory_of_two_ranks_equals_one_process(two_ranks):
    outdir, ranks = two_ranks
    assert [r["is_main"] for r in ranks] == [True, False]
    assert ranks[0]["map_batch_per_rank"] == MAP["batch"] // 2
    one, params = _fit_map()
    assert one.batch_size_per_rank == MAP["batch"]
    for rank in ranks:
        # identical on both ranks (one broadcast at the start, then the same averaged steps)
        for name, value in rank["map_params"].items():
            assert torch.equal(value, ranks[0]["map_params"][name]), name
            torch.testing.assert_close(value, params[name], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            torch.tensor(rank["map_losses"]), torch.tensor(one.losses), rtol=1e-9, atol=1e-7
        )
    # the fit moved: the test compares trajectories, not the initial point
    assert one.losses[-1] < 0.5 * one.losses[0]
    # rank 0 wrote the checkpoint, with every rank's RNG state
    saved = load_checkpoint(outdir / "map.pt")
    assert saved["step"] == MAP["steps"] and saved["world_size"] == 2
    assert len(saved["rng"]) == 2
    for name, value in saved["params"].items():
        torch.testing.assert_close(value, pyro.param(name).unconstrained().detach())
    assert [p.name for p in outdir.iterdir() if p.suffix == ".tmp"] == []


def test_two_ranks_recover_the_exact_posterior_like_one_process(two_ranks):
    _, ranks = two_ranks
    one, oracle, q_one, _ = _fit_mvn(MVN["particles"])
    assert one.epochs == MVN["steps"] / 4  # 4 batches an epoch (see _late_mean_and_se)
    exact = oracle.posterior()
    q_two = dist.MultivariateNormal(ranks[0]["mvn_loc"], ranks[0]["mvn_cov"])
    torch.testing.assert_close(ranks[1]["mvn_loc"], ranks[0]["mvn_loc"], rtol=0, atol=0)
    for q in (q_one, q_two):
        assert torch.distributions.kl_divergence(q, exact).item() < 0.01
    # the late losses estimate -ELBO(q) ~ -log p(y) (KL(q || p) < 0.01 is far below the SE):
    # this is where a wrong N/n scaling would show
    target = -oracle.log_evidence().item()
    m1, se1 = _late_mean_and_se(one.losses)
    m2, se2 = _late_mean_and_se(ranks[0]["mvn_losses"])
    assert ranks[0]["mvn_losses"] == ranks[1]["mvn_losses"]
    assert abs(m1 - target) < 5 * se1
    assert abs(m2 - target) < 5 * se2
    assert abs(m2 - m1) < 5 * (se1**2 + se2**2) ** 0.5


def test_each_rank_draws_its_own_particles(two_ranks):
    _, ranks = two_ranks
    # at the last step both ranks hold the same q, so equal draws would mean a shared RNG stream
    a, b = ranks[0]["mvn_last_draw"], ranks[1]["mvn_last_draw"]
    assert a.shape == b.shape == (MVN["particles"] // 2, 1, MVN["D"])
    assert not torch.allclose(a, b)


def _cuda_worker(outdir):
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
    cpu, params = _fit_map(init_loc_fn=init_to_mean)  # CUDA and CPU draw different numbers
    torch.testing.assert_close(torch.tensor(cuda["losses"]), torch.tensor(cpu.losses))
    for name, value in params.items():
        torch.testing.assert_close(cuda["params"][name], value)


# ------------------------------------------------------------------------------ one process


def _small_fit(checkpoint=None, num_steps=40, **kwargs):
    pyro.clear_param_store()
    oracle = _oracle(64, 2, seed=5)
    model = _make_model(oracle)
    guide = AutoMultivariateNormal(model)
    result = fit_distributed(
        model,
        guide,
        (oracle.X, oracle.y),
        num_steps=num_steps,
        batch_size=16,
        checkpoint=checkpoint,
        **kwargs,
    )
    return result, {n: pyro.param(n).detach().clone() for n in result.param_names}


@pytest.mark.parametrize("optim", ["torch", "pyro"])
def test_resume_from_checkpoint_continues_exactly(tmp_path, optim):
    def options():
        if optim == "pyro":
            return {"optim": pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})}
        return {
            "lr": 0.05,
            "scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        }

    straight, expected = _small_fit(**options())
    path = tmp_path / "ckpt.pt"
    first, _ = _small_fit(checkpoint=str(path), num_steps=20, checkpoint_every=10, **options())
    assert load_checkpoint(path)["step"] == 20
    resumed, got = _small_fit(checkpoint=str(path), num_steps=40, checkpoint_every=10, **options())
    assert resumed.start_step == 20 and resumed.num_steps == 40
    assert resumed.losses == straight.losses
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_single_process_without_torchrun():
    assert "RANK" not in os.environ
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert is_main_process()
    result, _ = _small_fit(num_steps=3, lr=0.01)
    assert result.world_size == 1 and result.batch_size_per_rank == 16
    assert result.epochs == 3 / 4


def test_dataset_input_matches_tensor_input():
    oracle = _oracle(64, 2, seed=5)
    runs = []
    for data in ((oracle.X, oracle.y), torch.utils.data.TensorDataset(oracle.X, oracle.y)):
        pyro.clear_param_store()
        model = _make_model(oracle)
        guide = AutoDelta(model)
        fit_distributed(model, guide, data, num_steps=5, batch_size=16, lr=0.05, seed=1)
        runs.append(pyro.param("AutoDelta.weights").detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_explained():
    oracle = _oracle(64, 2, seed=5)
    model = _make_model(oracle)

    def old_style_model(X, y):
        model(X, y, len(y), torch.arange(len(y)))

    with pytest.raises(TypeError, match="full_size=N, subsample=idx"):
        fit_distributed(
            old_style_model,
            AutoDelta(old_style_model),
            (oracle.X, oracle.y),
            num_steps=1,
            batch_size=8,
        )
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="first .data. dimension"):
        fit_distributed(
            model, AutoDelta(model), (oracle.X, oracle.y[:10]), num_steps=1, batch_size=8
        )
    with pytest.raises(ValueError, match="batch_size=100 is too large"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y), num_steps=1, batch_size=100)
    with pytest.raises(ValueError, match="num_steps"):
        fit_distributed(model, AutoDelta(model), (oracle.X, oracle.y), num_steps=0, batch_size=8)
    with pytest.raises(TypeError, match="optim"):
        fit_distributed(
            model, AutoDelta(model), (oracle.X, oracle.y), num_steps=1, batch_size=8, optim=0.1
        )
    with pytest.raises(TypeError, match="data must be"):
        fit_distributed(model, AutoDelta(model), 3.0, num_steps=1, batch_size=8)
