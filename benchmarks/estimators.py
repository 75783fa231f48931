"""Gradient-estimator benchmark: ``python -m benchmarks.estimators [--steps N] [--quick]``.

Problem: ``LinearRegression.simulate(500, 20)`` (N=500, D=20) with ``AutoMultivariateNormal``; the
exact posterior is a MultivariateNormal, so KL(q || p) is closed form at every step.

1. **Convergence.**  The same Adam settings and step budget for ``ELBO`` (reparam), ``ELBO``
   (STL), ``ELBO(analytic_kl=True)``, ``IWELBO`` (reparam, i.e. IWAE, for reference) and ``IWELBO``
   (DReG), all with K particles and the same seed: the final KL(q || p) and the number of steps
   until KL < 0.01 (checked every ``--every`` steps).  ``analytic_kl`` has no site to replace with
   a joint guide such as AutoMultivariateNormal (its KL is not per site), so it falls back to
   Monte Carlo and matches reparam exactly.
2. **SNR as K grows.**  At one guide state (a short ELBO fit, short of the optimum), the
   signal-to-noise ratio ``|E g| / sd(g)`` of the guide-parameter gradients of ``IWELBO``
   (reparam) and ``IWELBO`` (DReG) for K in {1, 10, 100}, from ``gradient_variance``.  Rainforth
   et al. 2018 ("Tighter variational bounds are not necessarily better") predict that the IWAE
   guide gradient's SNR decays like 1/sqrt(K) while DReG's does not (Tucker et al. 2019).

Writes ``benchmarks/results/estimators.{json,md}`` and prints the markdown table.
"""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoMultivariateNormal
from torch.distributions import kl_divergence

from pyro_elbo.conjugate import LinearRegression
from pyro_elbo.diagnostics.gradient_variance import gradient_variance
from pyro_elbo.guides.posterior import posterior_of
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.iwelbo import IWELBO

RESULTS = Path(__file__).parent / "results"
TARGET_KL = 0.01


def problem(seed: int = 0) -> LinearRegression:
    return LinearRegression.simulate(500, 20, seed=seed)


def kl_to_posterior(guide, oracle) -> float:
    return float(kl_divergence(posterior_of(guide), oracle.posterior()))


def converge(oracle, objective, steps: int, lr: float, every: int, seed: int) -> dict:
    """Fit AutoMultivariateNormal with ``objective``; KL(q || p) every ``every`` steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(oracle.model)
    svi = SVI(oracle.model, guide, pyro.optim.Adam({"lr": lr}), loss=objective)
    curve, reached = [], None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        svi.step()
        if step % every == 0 or step == steps:
            kl = kl_to_posterior(guide, oracle)
            curve.append((step, kl))
            if reached is None and kl < TARGET_KL:
                reached = step
    seconds = time.perf_counter() - start
    tail = [kl for s, kl in curve if s > 0.9 * steps]
    return {
        "final_kl": curve[-1][1],
        "mean_kl_last_10pct": sum(tail) / len(tail),
        "steps_to_target": reached,
        "ms_per_step": 1e3 * seconds / steps,
        "curve": curve,
    }


def snr_table(oracle, particles, draws: int, warmup: int, lr: float, seed: int) -> dict:
    """Median SNR over the guide's gradient elements, per parameter and overall."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(oracle.model)
    svi = SVI(oracle.model, guide, pyro.optim.Adam({"lr": lr}), loss=ELBO(1))
    for _ in range(warmup):
        svi.step()
    state = {"kl_at_state": kl_to_posterior(guide, oracle), "rows": []}
    for estimator in ("reparam", "dreg"):
        for k in particles:
            pyro.set_rng_seed(seed + k)
            result = gradient_variance(
                IWELBO(k, estimator=estimator), oracle.model, guide, num_draws=draws
            )
            per_param = {}
            pooled = []
            for name, snr in result.snr.items():
                live = result.var[name] > 0  # the strict upper triangle of scale_tril is fixed
                values = snr[live]
                per_param[name.split(".")[-1]] = float(values.median())
                pooled.append(values)
            state["rows"].append(
                {
                    "estimator": estimator,
                    "K": k,
                    "median_snr": float(torch.cat(pooled).median()),
                    "median_snr_by_param": per_param,
                    "total_variance": result.total_variance,
                }
            )
    return state


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}"
    )


def markdown(config, convergence, snr) -> str:
    k = config["num_particles"]
    lines = [
        "# Gradient estimators on LinearRegression (N=500, D=20), AutoMultivariateNormal",
        "",
        f"Machine: {machine()}. dtype {config['dtype']}, Adam(lr={config['lr']}), "
        f"{config['steps']} steps, K={k} particles, seed {config['seed']}; KL(q || p) checked "
        f"every {config['every']} steps.",
        "",
        "| estimator | final KL(q‖p) | mean KL, last 10 % | steps to KL < 0.01 | ms / step |",
        "|---|---|---|---|---|",
    ]
    for name, row in convergence.items():
        reached = row["steps_to_target"] if row["steps_to_target"] is not None else "not reached"
        lines.append(
            f"| {name} | {row['final_kl']:.2e} | {row['mean_kl_last_10pct']:.2e} | {reached} | "
            f"{row['ms_per_step']:.2f} |"
        )
    lines += [
        "",
        f"SNR |E g| / sd(g) of the guide gradients (median over elements), {config['draws']} "
        f"draws each, at the guide after {config['snr_warmup']} ELBO steps "
        f"(KL(q‖p) = {snr['kl_at_state']:.3g}):",
        "",
        "| estimator | K | median SNR | loc | scale | scale_tril | total variance |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in snr["rows"]:
        by = row["median_snr_by_param"]
        lines.append(
            f"| IWELBO {row['estimator']} | {row['K']} | {row['median_snr']:.3f} | "
            f"{by.get('loc', math.nan):.3f} | {by.get('scale', math.nan):.3f} | "
            f"{by.get('scale_tril', math.nan):.3f} | {row['total_variance']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    from pyro_elbo.cli import parser as cli_parser

    parser = cli_parser("python -m benchmarks.estimators", __doc__)
    parser.add_argument("--steps", type=int, default=5000, help="SVI steps per estimator")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--particles", type=int, default=8, help="K for the convergence runs")
    parser.add_argument("--every", type=int, default=10, help="steps between KL checks")
    parser.add_argument("--draws", type=int, default=200, help="gradient draws per SNR entry")
    parser.add_argument("--snr-warmup", type=int, default=1500, help="ELBO steps before SNR")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every run")
    parser.add_argument("--float32", action="store_true", help="run in float32 (default 64)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.draws, args.snr_warmup = 300, 20, 50
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32 if args.float32 else torch.float64)
    pyro.enable_validation(False)
    warnings.filterwarnings("ignore", category=UserWarning)
    oracle = problem(args.seed)
    k = args.particles
    objectives = {
        "ELBO reparam": lambda: ELBO(k),
        "ELBO STL": lambda: ELBO(k, estimator="stl"),
        "ELBO analytic KL": lambda: ELBO(k, analytic_kl=True),
        "IWELBO reparam (IWAE)": lambda: IWELBO(k),
        "IWELBO DReG": lambda: IWELBO(k, estimator="dreg"),
    }
    convergence = {}
    for name, make in objectives.items():
        convergence[name] = converge(oracle, make(), args.steps, args.lr, args.every, args.seed)
        row = convergence[name]
        print(
            f"{name}: final KL {row['final_kl']:.3e}, steps to KL<{TARGET_KL} "
            f"{row['steps_to_target']}, {row['ms_per_step']:.2f} ms/step",
            flush=True,
        )
    snr = snr_table(oracle, (1, 10, 100), args.draws, args.snr_warmup, args.lr, args.seed)
    config = {
        "num_particles": k,
        "steps": args.steps,
        "lr": args.lr,
        "every": args.every,
        "draws": args.draws,
        "snr_warmup": args.snr_warmup,
        "seed": args.seed,
        "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
    }
    table = markdown(config, convergence, snr)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimators.md").write_text(table)
    payload = {"machine": machine(), "config": config, "convergence": convergence, "snr": snr}
    (RESULTS / "estimators.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'estimators.md'} and {RESULTS / 'estimators.json'}")


if __name__ == "__main__":
    main()
