"""Gradient evaluations to the right answer: ``fit``'s methods ``"svi"``, ``"bam"`` and
``"pathfinder"`` on exact Gaussian oracles and on the stress suite.

``python -m benchmarks.methods [--dims 5 20 100 200] [--cases ...]`` writes
``benchmarks/results/methods.json`` and ``methods.md``.

**Part A** (exact, :class:`pyro_elbo.conjugate.LinearRegression`, D = 5, 20, 100, 200;
N = 1000 standardized rows with a shared factor, so neighbouring posterior correlations are
about 0.5, prior sd 10, noise sd 1): log-joint gradient evaluations (particles included) until
KL(q || p) < 0.01, and the KL at each method's own stop:

* ``svi``: ``fit(model, guide)`` at every default (Laplace stage, then whitened Adam on the STL
  ELBO with 4 particles): the Laplace stage's evaluations when its Gaussian is already within
  0.01, else those plus 4 per step until the KL (checked after every step) is;
* ``svi (no Laplace)``: ``fit(..., init=None)``: Adam(0.01) on the STL ELBO from the guide's own
  initialization, the stochastic-gradient VI the BaM and Pathfinder papers compare against;
* ``bam``: ``fit(..., method="bam")`` (start: the Laplace stage up to D = 32, one Pathfinder
  path above; then the score match of max(D + 1, 32) draws), KL of every iterate ``q_t``
  checked (``method_options["callback"]``) before its draws are evaluated; ``bam (Pathfinder
  start)`` / ``(Laplace start)``: ``method_options={"init": "pathfinder" / "laplace"}``;
  ``bam (paper start)``: ``{"init": "prior"}``, from N(u0, I);
* ``pathfinder``: ``fit(..., method="pathfinder")`` (4 paths); its answer exists only at the
  end, so its count is the whole run's.

**Part B** (stress suite, :mod:`benchmarks.stress`, NUTS or exact references): per case and
method, max |mean error| / sd, sd ratio, KL (exact cases), PSIS k-hat of the fitted guide,
evaluations and seconds.  ``auto`` is ``fit(model, None, *args, escalate=False)``: the default
method's Gaussian (BaM for up to 30 iterations, ``svi`` when neither of BaM's stopping tests
passes), without the flow that the escalating default adds when k-hat is high.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from benchmarks.stress import CASES, RESULTS, _gaussian_of, load_references, score
from pyro_elbo.conjugate import LinearRegression

THRESHOLD = 0.01


def correlated_design(dim: int, num_data: int = 1000, seed: int = 0) -> LinearRegression:
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(num_data, dim, generator=gen, dtype=torch.float64)
    shared = torch.randn(num_data, 1, generator=gen, dtype=torch.float64)
    X = Z + shared
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    y = X @ w + torch.randn(num_data, generator=gen, dtype=torch.float64)
    return LinearRegression(X, y, 10.0, 1.0)


def _kl(guide, post) -> float:
    return float(torch.distributions.kl_divergence(_gaussian_of(guide), post))


def _svi(oracle, post, init="auto", max_steps=10_000):
    from pyro_elbo import fit
    from pyro_elbo.init.laplace import laplace_init

    pyro.clear_param_store()
    laplace_evals, at_laplace = 0, math.inf
    if init == "auto":  # the stage fit runs first, on its own: its count and KL
        guide = AutoMultivariateNormal(oracle.model)
        guide()
        stage = laplace_init(oracle.model, guide)
        laplace_evals, at_laplace = stage.num_evaluations, _kl(guide, post)
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(oracle.model)
    hit = {}

    def watch(state):
        if not hit and _kl(guide, post) < THRESHOLD:
            hit["step"] = state.step
            return init != "auto"  # the default run goes on to its own stop
        return False

    start = time.perf_counter()
    result = fit(oracle.model, guide, init=init, seed=0, progress=False, max_steps=max_steps,
                 callbacks=[watch])
    seconds = time.perf_counter() - start
    particles = result.loss.num_particles
    if at_laplace < THRESHOLD:
        to_target = laplace_evals
    elif hit:
        to_target = laplace_evals + particles * hit["step"]
    else:
        to_target = None
    return {"to_kl": to_target, "at_stop": result.num_evaluations, "kl": _kl(guide, post),
            "steps": result.num_steps, "converged": result.converged, "seconds": seconds}


def _bam(oracle, post, init="auto", max_iterations=2000):
    from pyro_elbo import fit

    hit = {}

    def watch(state, evaluations):  # each q_t, before its draws are evaluated
        if "to_kl" not in hit:
            q = torch.distributions.MultivariateNormal(state.mu, covariance_matrix=state.cov)
            if float(torch.distributions.kl_divergence(q, post)) < THRESHOLD:
                hit["to_kl"] = evaluations

    pyro.clear_param_store()
    guide = AutoMultivariateNormal(oracle.model)
    start = time.perf_counter()
    result = fit(oracle.model, guide, method="bam", seed=0, progress=False,
                 method_options={"init": init, "callback": watch}, max_steps=max_iterations)
    kl = _kl(guide, post)
    if "to_kl" not in hit and kl < THRESHOLD:
        hit["to_kl"] = result.num_evaluations
    return {"to_kl": hit.get("to_kl"), "at_stop": result.num_evaluations, "kl": kl,
            "steps": result.num_steps, "converged": result.converged,
            "stop": result.reason.split(",")[0][:60], "seconds": time.perf_counter() - start}


def _pathfinder(oracle, post):
    from pyro_elbo import fit

    pyro.clear_param_store()
    guide = AutoMultivariateNormal(oracle.model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(oracle.model, guide, method="pathfinder", seed=0, progress=False)
    kl = _kl(guide, post)
    return {"to_kl": result.num_evaluations if kl < THRESHOLD else None,
            "at_stop": result.num_evaluations,
            "density_evaluations": result.diagnostics["num_density_evaluations"],
            "kl": kl, "khat": result.diagnostics["khat"], "converged": result.converged,
            "seconds": time.perf_counter() - start}


def part_a(dims) -> dict:
    out = {}
    for dim in dims:
        oracle = correlated_design(dim)
        post = oracle.posterior()
        rows = {
            "svi": _svi(oracle, post),
            "svi (no Laplace)": _svi(oracle, post, init=None),
            "bam": _bam(oracle, post),
            "bam (Pathfinder start)": _bam(oracle, post, init="pathfinder"),
            "bam (Laplace start)": _bam(oracle, post, init="laplace"),
            "bam (paper start)": _bam(oracle, post, init="prior"),
            "pathfinder": _pathfinder(oracle, post),
        }
        for name, row in rows.items():
            print(f"  D={dim:3d} {name:18s} to KL<{THRESHOLD}: {row['to_kl']}  at stop: "
                  f"{row['at_stop']} (KL {row['kl']:.2g}, {row['seconds']:.1f}s)", flush=True)
        out[str(dim)] = rows
    return out


def part_b(case_names, methods=("svi", "bam", "pathfinder", "auto")) -> dict:
    from pyro_elbo import fit

    cases = [CASES[name]() for name in case_names]
    load_references(cases)
    out = {}
    for case in cases:
        rows = {}
        for method in methods:
            pyro.clear_param_store()
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = fit(case.model, None, *case.args, method=method, seed=0,
                                 progress=False, escalate=False)
                row = {"evaluations": result.num_evaluations, "converged": result.converged,
                       "seconds": time.perf_counter() - start}
                row.update(score(case, result.guide))
                if method == "pathfinder":
                    row["pathfinder_khat"] = result.diagnostics["khat"]
            except Exception as error:  # noqa: BLE001 - a failed method is a result too
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}",
                       "seconds": time.perf_counter() - start}
            rows[method] = row
            print(f"  {case.name:20s} {method:10s} "
                  + (row["error"] if "error" in row else
                     f"err {row['max_mean_error']:.3g} sd {row['median_sd_ratio']:.3g} "
                     f"khat {row['khat']:.2f} evals {row['evaluations']} "
                     f"({row['seconds']:.1f}s)"), flush=True)
        out[case.name] = rows
    return out


def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1e4 or (x != 0 and abs(x) < 10 ** -digits):
        return f"{x:.1g}"
    return f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    lines = ["# Gradient evaluations to the right answer", ""]
    meta = results.get("meta", {})
    lines += [f"Machine: {meta.get('machine')}; torch {meta.get('torch')}; "
              f"`python -m benchmarks.methods` ({meta.get('seconds')} s).", ""]
    if "linreg" in results:
        lines += ["## LinearRegression, exact posterior", "",
                  f"Gradient evaluations to KL(q||p) < {THRESHOLD} / at the method's own stop "
                  "(KL there).", "",
                  "| D | " + " | ".join(next(iter(results["linreg"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(results["linreg"].values())))]
        for dim, rows in results["linreg"].items():
            cells = [f"{_fmt(r['to_kl'])} / {_fmt(r['at_stop'])} ({_fmt(r['kl'])})"
                     for r in rows.values()]
            lines.append(f"| {dim} | " + " | ".join(cells) + " |")
        lines.append("")
    if "stress" in results:
        lines += ["## Stress suite", "",
                  "| case | method | max err/sd | sd ratio (min-max) | KL | k-hat | evaluations "
                  "| s |", "|---|---|---|---|---|---|---|---|"]
        for case, rows in results["stress"].items():
            for method, r in rows.items():
                if "error" in r:
                    lines.append(f"| {case} | {method} | {r['error']} | | | | | |")
                    continue
                lines.append(
                    f"| {case} | {method} | {_fmt(r['max_mean_error'])} | "
                    f"{_fmt(r['median_sd_ratio'])} ({_fmt(r['min_sd_ratio'])}-"
                    f"{_fmt(r['max_sd_ratio'])}) | {_fmt(r.get('kl'))} | {_fmt(r['khat'])} | "
                    f"{_fmt(r['evaluations'])} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[5, 20, 100, 200])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {}
    if args.dims:
        results["linreg"] = part_a(args.dims)
    if args.cases:
        results["stress"] = part_b(args.cases)
    results["meta"] = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                       "torch": torch.__version__,
                       "seconds": round(time.perf_counter() - start)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / "methods.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
