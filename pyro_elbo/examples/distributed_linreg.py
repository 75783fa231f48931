"""Data-parallel SVI with ``torchrun``: Bayesian linear regression, checked against its exact
posterior.

Run on one machine with 2 processes::

    torchrun --nproc_per_node=2 -m pyro_elbo.examples.distributed_linreg

or as a single process (plain minibatch SVI, the same global batch)::

    python -m pyro_elbo.examples.distributed_linreg

Every rank builds the same data set (same seed) and fits an ``AutoMultivariateNormal`` guide
with :func:`pyro_elbo.distributed.fit_distributed`: each rank takes its shard of the rows, draws
its own particles, and the gradients are averaged across ranks every step.  Rank 0 then prints
KL(q || exact posterior) from the :class:`pyro_elbo.conjugate.LinearRegression` oracle.

The model takes the minibatch and gives its data plate the full data size, so that every rank's
minibatch term is scaled by N / n to the full data::

    with pyro.plate("data", N, subsample_size=len(y)):
        pyro.sample("obs", ..., obs=y)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.distributed import fit_distributed, init_distributed, is_main_process
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO


def make_model(prior_scale, noise_scale, num_data):
    """``model(X, y)``: the oracle's model, fed a minibatch of its ``num_data`` rows."""

    def model(X, y):
        prior = dist.Normal(torch.zeros_like(prior_scale), prior_scale).to_event(1)
        w = pyro.sample("weights", prior)
        with pyro.plate("data", num_data, subsample_size=len(y)):
            # (X * w).sum(-1) broadcasts over the particle plate; X @ w would not
            pyro.sample("obs", dist.Normal((X * w).sum(-1), noise_scale), obs=y)

    return model


def main(argv=None):
    from pyro_elbo.cli import parser as cli_parser

    parser = cli_parser("python -m pyro_elbo.examples.distributed_linreg", __doc__)
    parser.add_argument("--num-data", type=int, default=5000, help="rows N of the data set")
    parser.add_argument("--dim", type=int, default=5, help="regression coefficients D")
    parser.add_argument("--batch-size", type=int, default=500, help="global, over all ranks")
    parser.add_argument("--num-particles", type=int, default=32, help="over all ranks")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.2, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the fit")
    parser.add_argument("--checkpoint", default=None, help="rank 0 writes (and resumes) here")
    parser.add_argument("--log-every", type=int, default=250, help="steps between log lines")
    args = parser.parse_args(argv)

    ctx = init_distributed()
    if ctx.world_size > 1:
        torch.set_num_threads(1)  # one core per rank (torchrun also sets OMP_NUM_THREADS=1)
    if args.num_particles % ctx.world_size:
        parser.error(f"--num-particles must be divisible by the {ctx.world_size} ranks")
    oracle = LinearRegression.simulate(args.num_data, args.dim, seed=args.seed, noise_scale=0.5)
    model = make_model(oracle.prior_scale, oracle.noise_scale, args.num_data)
    guide = AutoMultivariateNormal(model)
    result = fit_distributed(
        model,
        guide,
        (oracle.X, oracle.y),
        loss=ELBO(args.num_particles // ctx.world_size),
        num_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps),
        seed=args.seed,
        checkpoint=args.checkpoint,
        log_every=args.log_every,
    )
    if is_main_process():
        q, exact = posterior_of(guide), oracle.posterior()
        kl = torch.distributions.kl_divergence(q, exact).item()
        step_ms = 1000 * sorted(result.step_seconds)[len(result.step_seconds) // 2]
        print(
            f"{ctx.world_size} rank(s) [{ctx.backend or 'no process group'}], "
            f"{result.num_steps} steps of {result.batch_size} rows "
            f"({result.epochs:.1f} epochs) in {result.seconds:.1f} s, median step {step_ms:.2f} ms"
        )
        # over whole epochs the minibatch terms add up to the full data: a precise -ELBO
        per_epoch = round(result.num_steps / result.epochs)
        late = result.losses[-10 * per_epoch :]
        print(
            f"mean loss over the last {len(late)} steps (-ELBO estimate) "
            f"{sum(late) / len(late):.2f}; exact -log p(y) {-oracle.log_evidence().item():.2f}"
        )
        print(f"posterior mean  q: {q.mean.numpy().round(3)}")
        print(f"            exact: {exact.mean.numpy().round(3)}")
        print(f"KL(q || exact posterior) = {kl:.5f}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
