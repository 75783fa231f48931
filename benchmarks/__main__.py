"""Benchmark runner: ``python -m benchmarks [--problems ...] [--steps N] [--rounds R]``.

For each problem in :mod:`benchmarks.models` it builds every contender (Pyro's ``Trace_ELBO``,
pyro_elbo's objectives, the hand-written torch step, the compiled fast path when available,
NumPyro's jitted SVI step when the ``bench`` extra is installed, :mod:`benchmarks.numpyro_models`;
skipped otherwise, and the table says so), then measures them **in one run, interleaved**: R rounds, and in every
round each contender runs a block of N timed steps after its warm-up.  Parameter stores are kept
apart with ``ParamStoreDict.scope``.  It reports the median milliseconds per step and the ratios
to ``Trace_ELBO`` (same particles), to the hand-written step and to NumPyro's jitted step, prints a markdown table and saves
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
    out[f"compiled step ELBO({k})"] = lambda: _compiled_step(problem, ELBO(k), lr)
    if k == 1:
        out["hand-written torch"] = lambda: _raw_step(problem, lr)
    from benchmarks import numpyro_models

    if problem.make_numpyro_step is not None and numpyro_models.available():
        out[f"NumPyro jit Trace_ELBO({k})"] = lambda: problem.make_numpyro_step(k, lr)
    return out


def _compiled_step(problem, objective, lr):
    """``pyro_elbo.fast.CompiledStep``: the objective's loss, gradients and the Adam update as
    one FX graph compiled by inductor, the loss read back each step as NumPyro's row does
    (raises rather than fall back: a benchmark row must be what it says)."""
    from pyro_elbo.fast import CompiledStep

    guide = problem.make_guide(problem.model)
    step = CompiledStep(problem.model, guide, *problem.args, loss=objective, lr=lr)
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


_COMPILE_CODE = """
import time, torch, pyro, warnings; warnings.simplefilter('ignore')
torch.set_num_threads(1); pyro.enable_validation(False)
from benchmarks.models import PROBLEMS; from pyro_elbo import ELBO
from pyro_elbo.fast import CompiledStep
p = PROBLEMS[{key!r}](); g = p.make_guide(p.model)
start = time.perf_counter()
step = CompiledStep(p.model, g, *p.args, loss=ELBO(1), lr=0.01)
print(time.perf_counter() - start)
"""

_FIT_CODE = """
import time, torch, pyro, warnings; warnings.simplefilter('ignore')
torch.set_num_threads(1)
from benchmarks.models import PROBLEMS; from pyro_elbo import fit
p = PROBLEMS[{key!r}](); g = p.make_guide(p.model)
r = fit(p.model, g, *p.args, num_steps={steps}, seed=0, progress=False, compile={setting!r})
print(r.seconds, bool(r.compiled))
"""


_STRESS_CODE = """
import torch, pyro, warnings; warnings.simplefilter('ignore')
torch.set_num_threads(1)
from benchmarks.stress import CASES; from pyro_elbo import fit
case = CASES[{key!r}]()
r = fit(case.model, None, *case.args, seed=0, progress=False, compile={setting!r})
print(r.seconds, r.num_steps, bool(r.compiled))
"""


def stress_fit_times() -> dict:
    """The held-out-style wall time: ``fit(model, None, *args, seed=0)`` (every default, stopped
    by the convergence rule) on each stress-suite model, ``compile="auto"`` against
    ``compile=False``, each in a fresh process (inductor's cache warm), interleaved."""
    from benchmarks.stress import CASES

    out = {}
    for key in CASES:
        row = {}
        for setting in ("auto", False):
            seconds, steps, compiled = _run_python(_STRESS_CODE.format(key=key, setting=setting))
            row["auto" if setting == "auto" else "eager"] = float(seconds)
            row["steps_" + ("auto" if setting == "auto" else "eager")] = int(steps)
            if setting == "auto":
                row["auto_compiled"] = compiled == "True"
        out[key] = row
        print("stress fit seconds", key, row, flush=True)
    return out


def _run_python(code, env=None):
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent.parent, env={**os.environ, **(env or {})},
    )
    return out.stdout.strip().splitlines()[-1].split()


def compile_times(keys) -> dict:
    """Seconds to capture and compile ``CompiledStep`` (ELBO(1)) in a fresh process: cold (an
    empty inductor cache) and warm (the cache the cold run filled).  Both include importing
    inductor (several seconds), which any first compile in a process pays."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": cache}
        for key in keys:
            cold = float(_run_python(_COMPILE_CODE.format(key=key), env)[0])
            warm = float(_run_python(_COMPILE_CODE.format(key=key), env)[0])
            out[key] = {"cold": cold, "warm": warm}
            print("compile seconds", key, out[key], flush=True)
    return out


def fit_times(keys, steps=2000, rounds=2) -> dict:
    """``fit(model, guide, *args, num_steps=steps)`` end to end (``result.seconds``: the
    Laplace stage, the checks, compiling, the steps), ``compile="auto"`` against
    ``compile=False``, each in a fresh process (inductor's cache warm), interleaved; medians."""
    out = {}
    for key in keys:
        times = {"auto": [], False: []}
        compiled = None
        for _ in range(rounds):
            for setting in ("auto", False):
                seconds, was = _run_python(
                    _FIT_CODE.format(key=key, steps=steps, setting=setting)
                )
                times[setting].append(float(seconds))
                if setting == "auto":
                    compiled = was == "True"
        out[key] = {
            "auto": statistics.median(times["auto"]),
            "eager": statistics.median(times[False]),
            "auto_compiled": compiled,
        }
        print("fit seconds", key, out[key], flush=True)
    return out


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}"
    )


def format_markdown(results, memory, compiles=None, fits=None, stress=None) -> str:
    from benchmarks import numpyro_models

    lines = [f"Machine: {machine()}", ""]
    if not numpyro_models.available():
        lines += ["NumPyro rows skipped: jax/numpyro not installed (`pip install -e \".[bench]\"`).", ""]
    for problem, by_k in results.items():
        for k, timings in by_k.items():
            base = timings.get(f"Trace_ELBO({k})")
            raw = timings.get("hand-written torch")
            jax = timings.get(f"NumPyro jit Trace_ELBO({k})")
            lines += [f"**{problem}**, K={k}", "",
                      "| contender | ms/step | × Trace_ELBO | × hand-written | × NumPyro jit |",
                      "|---|---|---|---|---|"]
            for name, ms in timings.items():
                r1 = f"{ms / base:.2f}" if base else "–"
                r2 = f"{ms / raw:.2f}" if raw else "–"
                r3 = f"{ms / jax:.2f}" if jax else "–"
                lines.append(f"| {name} | {ms:.3f} | {r1} | {r2} | {r3} |")
            lines.append("")
    if compiles:
        lines += [
            "**Compile time of the compiled step (ELBO(1)), seconds, fresh process**",
            "",
            "| problem | cold (empty inductor cache) | warm |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['cold']:.1f} | {v['warm']:.1f} |" for k, v in compiles.items()]
        lines.append("")
    if fits:
        lines += [
            "**`fit(..., num_steps=2000)` end to end, seconds (fresh process, warm cache)**",
            "",
            '| problem | compile="auto" | compile=False | ratio | auto compiled? |',
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['auto']:.1f} | {v['eager']:.1f} | {v['auto'] / v['eager']:.2f} | "
            f"{'yes' if v['auto_compiled'] else 'no'} |"
            for k, v in fits.items()
        ]
        lines.append("")
    if stress:
        lines += [
            "**`fit(model, None, *args, seed=0)` on the stress-suite models, seconds end to end**",
            "",
            '| model | compile="auto" (steps, compiled?) | compile=False (steps) | ratio |',
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['auto']:.1f} ({v['steps_auto']}, {'yes' if v['auto_compiled'] else 'no'})"
            f" | {v['eager']:.1f} ({v['steps_eager']}) | {v['auto'] / v['eager']:.2f} |"
            for k, v in stress.items()
        ]
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
    parser.add_argument(
        "--compile-times", action="store_true",
        help="also measure the compiled step's compile time, cold and warm",
    )
    parser.add_argument(
        "--fit", action="store_true",
        help='also time fit(num_steps=2000) end to end, compile="auto" against eager',
    )
    parser.add_argument(
        "--stress-fit", action="store_true",
        help='also time fit(model, None, *args) on the stress-suite models, auto against eager',
    )
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
    compiles = compile_times(args.problems) if args.compile_times else {}
    fits = fit_times([k for k in args.problems if k != "vae"]) if args.fit else {}
    stress = stress_fit_times() if args.stress_fit else {}
    table = format_markdown(results, memory, compiles, fits, stress)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(table + "\n")
    payload = {
        "machine": machine(), "ms_per_step": results, "peak_rss_mb": memory,
        "compile_seconds": compiles, "fit_seconds": fits, "stress_fit_seconds": stress,
    }
    (RESULTS / "speed.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {RESULTS / 'speed.md'} and {RESULTS / 'speed.json'}")


if __name__ == "__main__":
    main()
