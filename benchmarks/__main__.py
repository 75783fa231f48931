"""Benchmark runner: ``python -m benchmarks [--problems ...] [--steps N] [--rounds R]``.

For each problem in :mod:`benchmarks.models` it builds every contender (Pyro's ``Trace_ELBO``,
pyro_elbo's objectives, the hand-written torch step, the compiled fast path when available,
NumPyro's jitted SVI step when the ``bench`` extra is installed, :mod:`benchmarks.numpyro_models`;
skipped otherwise, and the table says so), then measures them **in one run, interleaved**: R rounds, and in every
round each contender runs a block of N timed steps after its warm-up.  Parameter stores are kept
apart with ``ParamStoreDict.scope``.  It reports the median milliseconds per step and the ratios
to ``Trace_ELBO`` (same particles) and to the hand-written step, prints a markdown table and saves
``benchmarks/results/speed.{json,md}``.  Peak RSS of the VAE step at K = 1, 16, 128 is measured in
fresh subprocesses (``--memory``).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from benchmarks.models import PROBLEMS
from pyro_elbo.cli import parser as cli_parser

RESULTS = Path(__file__).parent / "results"


def _svi_step(problem, objective, lr):
    guide = problem.make_guide(problem.model)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": lr}), loss=objective)
    return lambda: svi.step(*problem.args)


def contenders(problem, num_particles):
    """``{name: factory}``; each factory builds a step function inside its own param scope."""
    from pyro_elbo import ELBO

    lr = 1e-3 if "VAE" in problem.name else 0.01
    k = num_particles
    out = {
        f"Trace_ELBO({k})": lambda: _svi_step(
            problem, Trace_ELBO(k, vectorize_particles=k > 1), lr
        ),
        f"ELBO({k})": lambda: _svi_step(problem, ELBO(k), lr),
        f"ELBO({k}, stl)": lambda: _svi_step(problem, ELBO(k, estimator="stl"), lr),
    }
    try:
        from pyro_elbo.objectives.iwelbo import IWELBO

        if k > 1:
            out[f"IWELBO({k})"] = lambda: _svi_step(problem, IWELBO(k), lr)
            out[f"IWELBO({k}, dreg)"] = lambda: _svi_step(problem, IWELBO(k, estimator="dreg"), lr)
    except ImportError:
        pass
    try:
        from pyro_elbo.fast import compile_step

        if k == 1:
            out["fast path (compile)"] = lambda: _compiled_step(problem, compile_step, lr)
    except ImportError:
        pass
    if k == 1:
        out["hand-written torch"] = lambda: _raw_step(problem, lr)
    from benchmarks import numpyro_models

    if problem.make_numpyro_step is not None and numpyro_models.available():
        out[f"NumPyro jit Trace_ELBO({k})"] = lambda: problem.make_numpyro_step(k, lr)
    return out


def _compiled_step(problem, compile_step, lr):
    guide = problem.make_guide(problem.model)
    step = compile_step(problem.model, guide, *problem.args, lr=lr)
    return lambda: step(*problem.args)


def _raw_step(problem, lr):
    step = problem.make_raw_step(lr)
    return lambda: step(*problem.args)


def measure(problem, num_particles, steps, rounds, warmup):
    store = pyro.get_param_store()
    steps_by_name, scopes = {}, {}
    for name, factory in contenders(problem, num_particles).items():
        with store.scope() as scope, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyro.set_rng_seed(0)
            step = factory()
            for _ in range(warmup):
                step()
        steps_by_name[name], scopes[name] = step, scope
    times = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            with store.scope(scopes[name]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb(num_particles: int) -> dict:
    """Peak RSS of 50 VAE steps with ``ELBO(num_particles)`` in a fresh process: the process's
    RSS before the steps (torch, pyro and the model loaded, 5 warm-up steps) and the peak during
    them (Linux's ``VmHWM``, reset by ``/proc/self/clear_refs`` after the warm-up, so the import's
    own peak does not hide the steps')."""
    code = (
        "import torch, pyro, warnings; warnings.simplefilter('ignore');"
        "torch.set_num_threads(1); pyro.enable_validation(False);"
        "from benchmarks.models import vae; from pyro_elbo import ELBO;"
        "from pyro.infer import SVI;"
        "p = vae(); g = p.make_guide(p.model);"
        f"svi = SVI(p.model, g, pyro.optim.Adam({{'lr': 1e-3}}), loss=ELBO({num_particles}));"
        "[svi.step(*p.args) for _ in range(5)];"
        "status = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)]"
        "[0].split()[1]);"
        "before = status('VmRSS'); open('/proc/self/clear_refs', 'w').write('5');"
        "[svi.step(*p.args) for _ in range(50)];"
        "print(before, status('VmHWM'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent.parent,
    )
    before, peak = map(int, out.stdout.strip().splitlines()[-1].split())
    return {"before_steps": before / 1024, "peak": peak / 1024}


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}"
    )


def format_markdown(results, memory) -> str:
    from benchmarks import numpyro_models

    lines = [f"Machine: {machine()}", ""]
    if not numpyro_models.available():
        lines += ["NumPyro rows skipped: jax/numpyro not installed (`pip install -e \".[bench]\"`).", ""]
    for problem, by_k in results.items():
        for k, timings in by_k.items():
            base = timings.get(f"Trace_ELBO({k})")
            raw = timings.get("hand-written torch")
            lines += [f"**{problem}**, K={k}", "", "| contender | ms/step | × Trace_ELBO | × hand-written |", "|---|---|---|---|"]
            for name, ms in timings.items():
                r1 = f"{ms / base:.2f}" if base else "–"
                r2 = f"{ms / raw:.2f}" if raw else "–"
                lines.append(f"| {name} | {ms:.3f} | {r1} | {r2} |")
            lines.append("")
    if memory:
        lines += [
            "**Peak RSS, VAE step (ELBO(K), 50 steps)**",
            "",
            "| K | RSS before the steps, MB | peak during the steps, MB | added by the steps, MB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {m['before_steps']:.0f} | {m['peak']:.0f} | "
            f"{m['peak'] - m['before_steps']:.1f} |"
            for k, m in memory.items()
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = cli_parser("python -m benchmarks", __doc__)
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS),
                        help="the problems to time")
    parser.add_argument("--particles", nargs="*", type=int, default=[1, 16],
                        help="particle counts K to time each problem at")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps before each contender's first block")
    parser.add_argument("--memory", action="store_true", help="also measure VAE peak RSS")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    results = {}
    for key in args.problems:
        problem = PROBLEMS[key]()
        for k in args.particles:
            timings = measure(problem, k, args.steps, args.rounds, args.warmup)
            results.setdefault(problem.name, {})[k] = timings
            print(problem.name, f"K={k}", {n: round(t, 3) for n, t in timings.items()}, flush=True)
    memory = {k: peak_rss_mb(k) for k in (1, 16, 128)} if args.memory else {}
    table = format_markdown(results, memory)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(table + "\n")
    payload = {"machine": machine(), "ms_per_step": results, "peak_rss_mb": memory}
    (RESULTS / "speed.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {RESULTS / 'speed.md'} and {RESULTS / 'speed.json'}")


if __name__ == "__main__":
    main()
