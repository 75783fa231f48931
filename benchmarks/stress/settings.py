"""The settings the suite fits each case with (Pyro's defaults, ``fit``, our pipeline by hand,
its best budget) and :func:`run_case`, which runs and scores them."""

from __future__ import annotations

import time

import pyro

from benchmarks.stress.cases import Case
from benchmarks.stress.scoring import psis_score, score

PYRO_STEPS = 5000
OURS_STEPS = 1000
OURS_LR = 0.05
BEST = {"num_particles": 16, "num_steps": 3000, "lr": 0.05, "average_last": 0.5}


def run_svi(case: Case, guide, optim, loss, num_steps: int) -> list:
    svi = pyro.infer.SVI(case.model, guide, optim, loss)
    return [svi.step(*case.args) for _ in range(num_steps)]


def pyro_defaults(case: Case, guide_cls, num_steps: int = PYRO_STEPS):
    """Pyro's defaults: the autoguide with init_scale=0.1, Adam(lr=0.01), Trace_ELBO."""
    pyro.clear_param_store()
    guide = guide_cls(case.model, init_scale=0.1)
    losses = run_svi(case, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO(),
                     num_steps)
    return guide, {"final_loss": losses[-1]}


def pipeline(case: Case, *, num_steps: int = OURS_STEPS, lr: float = OURS_LR,
             num_particles: int | None = None, average_last: float = 0.0, schedule=None,
             guide=None, optimizer: str = "whitened", eps: float | None = None,
             laplace_iterations: int = 1000):
    """Our pipeline: recommended guide, Laplace init, whitened Adam, STL ELBO."""
    from pyro_elbo.init.conditioning import WhitenedAdam
    from pyro_elbo.init.defaults import recommended_guide, recommended_objective
    from pyro_elbo.init.laplace import laplace_init

    pyro.clear_param_store()
    guide = guide if guide is not None else recommended_guide(case.model, *case.args)
    start = time.perf_counter()
    laplace = laplace_init(case.model, guide, *case.args, max_iterations=laplace_iterations)
    laplace_seconds = time.perf_counter() - start
    kwargs = {} if num_particles is None else {"num_particles": num_particles}
    loss = recommended_objective(guide, *case.args, **kwargs)
    if optimizer == "adam":
        optim = pyro.optim.Adam({"lr": lr})
    else:
        average_from = int(num_steps * (1 - average_last)) if average_last else None
        extra = {} if eps is None else {"eps": eps}
        optim = WhitenedAdam(guide, lr, schedule=schedule, average_from=average_from,
                             diagonal=optimizer == "diagonal", **extra)
    losses = run_svi(case, guide, optim, loss, num_steps)
    if hasattr(optim, "finalize"):
        optim.finalize()
    return guide, {
        "guide": type(guide).__name__,
        "laplace_converged": laplace.converged,
        "laplace_selected": laplace.selected,
        "laplace_fallback": laplace.fallback is not None,
        "laplace_seconds": round(laplace_seconds, 2),
        "final_loss": losses[-1],
    }


def fit_defaults(case: Case):
    """``pyro_elbo.fit(model, None, *args)``: every default, stopped by the convergence rule."""
    from pyro_elbo.fit import fit

    pyro.clear_param_store()
    result = fit(case.model, None, *case.args, seed=0, progress=False)
    rewritten = result.model if result.model is not case.model else None
    return result.guide, {
        "guide": type(result.guide).__name__,
        "laplace": result.init.message,
        "steps": result.num_steps,
        "converged": result.converged,
        "final_loss": float(result.losses[-1]) if len(result.losses) else None,
        "resample": result.resample,
        "stages": [{"name": st.name, "guide": st.guide, "reason": st.reason,
                    "khat": st.khat, "seconds": round(st.seconds, 1),
                    "steps": st.num_steps} for st in result.stages],
    }, rewritten


SETTINGS = ("pyro_mf", "pyro_mvn", "fit", "ours", "best")


def run_case(case: Case, settings=SETTINGS, quick: bool = False) -> dict:
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    scale = 0.2 if quick else 1.0
    rows = {}
    for setting in settings:
        model = None  # the model the guide was fitted to, when fit rewrote it
        pyro.set_rng_seed(0)
        start = time.perf_counter()
        if setting == "pyro_mf":
            guide, info = pyro_defaults(case, AutoNormal, int(PYRO_STEPS * scale))
        elif setting == "pyro_mvn":
            guide, info = pyro_defaults(case, AutoMultivariateNormal, int(PYRO_STEPS * scale))
        elif setting == "fit":
            guide, info, model = fit_defaults(case)
        elif setting == "ours":
            guide, info = pipeline(case, num_steps=int(OURS_STEPS * scale))
        else:
            guide, info = pipeline(case, num_steps=int(BEST["num_steps"] * scale),
                                   num_particles=BEST["num_particles"], lr=BEST["lr"],
                                   average_last=BEST["average_last"])
        info["seconds"] = round(time.perf_counter() - start, 1)
        try:
            row = {**info, **score(case, guide, model=model)}
        except (ValueError, RuntimeError) as error:  # e.g. a NaN guide: no Gaussian to score
            first = str(error).splitlines()[0][:120]
            row = {**info, "max_mean_error": float("nan"), "median_sd_ratio": float("nan"),
                   "min_sd_ratio": float("nan"), "max_sd_ratio": float("nan"),
                   "error": f"{type(error).__name__}: {first}"}
        if setting == "best" and row.get("khat", 1.0) < 0.7:
            row["psis"] = psis_score(case, guide)
        if setting == "fit" and info.get("resample") == "psis":
            # what fit's user gets: the draws PSIS-resampled (result.to_inference_data)
            row["raw"] = {k: row[k] for k in ("max_mean_error", "median_sd_ratio",
                                              "min_sd_ratio", "max_sd_ratio", "median_iqr_ratio",
                                              "min_iqr_ratio", "max_iqr_ratio") if k in row}
            psis = psis_score(case, guide, model=model)
            row["raw"]["sites"] = row.get("sites")
            row.update({k: psis[k] for k in (*row["raw"], "sites") if k in psis})
        rows[setting] = row
        extra = f" KL={row['kl']:.3g}" if "kl" in row else ""
        stages = " -> ".join(f"{st['name']}({st['khat']:.2f}, {st['seconds']}s)"
                             for st in info.get("stages", []))
        print(f"  {case.name:20s} {setting:9s} err={row['max_mean_error']:.3g} "
              f"sd={row['median_sd_ratio']:.3g} [{row['min_sd_ratio']:.3g}] "
              f"khat={row.get('khat', float('nan')):.2f}{extra} ({info['seconds']}s) {stages}",
              flush=True)
    return rows
