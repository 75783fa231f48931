"""The stress suite's experiments (``--experiments``): which conditioning after the Laplace
stage, which default guide by latent dimension, and what a finite sample shows of the funnel's
x_i scale."""

from __future__ import annotations

import math
import time
import warnings

import pyro
import torch
from pyro.infer import MCMC, NUTS

from benchmarks.stress.cases import CASES, FUNNEL_DIM, funnel, funnel_model, raw_design
from benchmarks.stress.references import load_references
from benchmarks.stress.scoring import _gaussian_of, psis_score, score
from pyro_elbo.conjugate import LinearRegression

# ------------------------------------------------------------ experiment: the conditioning

CHECKPOINTS = (50, 100, 200, 500, 1000)


def _perturb(guide, laplace, shift: float = 3.0, widen: float = 2.0) -> None:
    """Move an AutoMultivariateNormal off the Laplace answer: loc by ``shift`` sds along every
    whitened direction, L by a factor ``widen``."""
    with guide._pyro_context:
        guide.loc.data = laplace.loc.to(guide.loc.dtype) + laplace.scale_tril.to(
            guide.loc.dtype) @ torch.full_like(guide.loc, shift)
        guide.scale = widen * guide.scale.detach()


def _optimizers(guide, num_steps):
    from pyro_elbo.init.conditioning import WhitenedAdam, cosine_decay

    return {
        "Adam lr=0.01 (raw parameters)": lambda: pyro.optim.Adam({"lr": 0.01}),
        "per-parameter sds (diagonal), lr=0.05": lambda: WhitenedAdam(guide, 0.05, diagonal=True),
        "whitened, lr=0.05, eps=1e-8": lambda: WhitenedAdam(guide, 0.05, eps=1e-8),
        "whitened, lr=0.05 (eps=0.1)": lambda: WhitenedAdam(guide, 0.05),
        "whitened, lr=0.05, cosine decay": lambda: WhitenedAdam(
            guide, 0.05, schedule=cosine_decay(num_steps)),
        "whitened, lr=0.05, average last half": lambda: WhitenedAdam(
            guide, 0.05, average_from=num_steps // 2),
    }


def _coordinate_errors(case, guide):
    from pyro_elbo.guides.posterior import posterior_of

    q = posterior_of(guide, *case.args)
    ref = case.reference[case.oracle.latent]
    mean = torch.tensor(ref["mean"], dtype=torch.float64)
    sd = torch.tensor(ref["sd"], dtype=torch.float64)
    return ((q.mean.double() - mean).abs() / sd).tolist()


def conditioning_experiment(case_names=("linreg_intercept", "logistic", "schools_noncentered"),
                            num_steps: int = CHECKPOINTS[-1], seed: int = 0) -> dict:
    """Which conditioning: KL (exact) or the NUTS scores at checkpoints, and for the exact case
    the step at which each coordinate's mean comes (and stays) within 0.1 sd."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    from pyro_elbo.init.laplace import laplace_init
    from pyro_elbo.objectives.elbo import ELBO

    out = {}
    for name in case_names:
        case = CASES[name]()
        load_references([case])
        rows = {}
        probe = AutoMultivariateNormal(case.model)
        for label in list(_optimizers(probe, num_steps)) + ["whitened, lr=0.05, Trace_ELBO"]:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            guide = AutoMultivariateNormal(case.model)
            laplace = laplace_init(case.model, guide, *case.args)
            if case.oracle is not None:
                _perturb(guide, laplace)
            makers = _optimizers(guide, num_steps)
            if label in makers:
                optim, loss = makers[label](), ELBO(4, estimator="stl")
            else:
                from pyro_elbo.init.conditioning import WhitenedAdam

                optim, loss = WhitenedAdam(guide, 0.05), ELBO(1)
            svi = pyro.infer.SVI(case.model, guide, optim, loss)
            row, within, start = {}, None, time.perf_counter()
            for step in range(1, num_steps + 1):
                svi.step(*case.args)
                if case.oracle is not None:
                    errs = _coordinate_errors(case, guide)
                    if within is None:
                        within = [None] * len(errs)
                    within = [(w or step) if e < 0.1 else None for w, e in zip(within, errs)]
                if step in CHECKPOINTS:
                    if step == num_steps and hasattr(optim, "finalize"):
                        optim.finalize()
                    row[step] = score(case, guide, num_draws=4000, with_khat=False)
            row["seconds"] = round(time.perf_counter() - start, 1)
            if within is not None:
                row["steps_to_0.1sd"] = within
            rows[label] = row
            print(f"  {name:20s} {label:42s} " + " ".join(
                f"{s}:{_headline(row[s])}" for s in CHECKPOINTS if s in row), flush=True)
        out[name] = {"reference": case.reference_info, "rows": rows}
    return out


def _headline(s: dict) -> str:
    if "kl" in s:
        return f"KL={s['kl']:.3g}"
    return f"err={s['max_mean_error']:.2f}/sd={s['median_sd_ratio']:.2f}"


# ---------------------------------------------------------- experiment: the default guide


def wide_design(dim: int, seed: int = 0) -> LinearRegression:
    """An intercept and ``dim - 1`` raw columns, means log-uniform in [100, 4000], sds
    5-50% of the means, N = 1000 (condition numbers 1e10 to 2e13 for D = 10 to 400: sds
    down to 1 would pass float64's 1e16 at D = 100)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(2, dim - 1, generator=gen, dtype=torch.float64)
    means = (math.log(100) + u[0] * math.log(40)).exp()
    sds = means * (0.05 + 0.45 * u[1])
    return raw_design(means.tolist(), sds.tolist(), seed=seed)


def guide_experiment(dims=(10, 50, 100, 200, 400), num_steps: int = 100) -> dict:
    """For each latent dimension: seconds of the Laplace stage and per whitened STL step, and
    KL(q || p) after the Laplace stage and after ``num_steps`` steps, for the three guides."""
    from pyro.infer.autoguide import (
        AutoLowRankMultivariateNormal,
        AutoMultivariateNormal,
        AutoNormal,
    )

    from pyro_elbo.init.conditioning import WhitenedAdam
    from pyro_elbo.init.laplace import laplace_init
    from pyro_elbo.objectives.elbo import ELBO

    makers = {
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoLowRankMultivariateNormal(rank=10)": lambda m: AutoLowRankMultivariateNormal(
            m, rank=10),
        "AutoNormal": AutoNormal,
    }
    out = {}
    for dim in dims:
        oracle = wide_design(dim)
        post = oracle.posterior()
        sd = post.stddev
        corr = post.covariance_matrix / sd[:, None] / sd[None, :]
        info = {"max_abs_correlation": float((corr - torch.eye(dim, dtype=sd.dtype)).abs().max()),
                "sd_ratio": float(sd.max() / sd.min())}
        rows = {}
        for label, make in makers.items():
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = make(oracle.model)
            start = time.perf_counter()
            laplace_init(oracle.model, guide)
            laplace_seconds = time.perf_counter() - start
            kl0 = float(torch.distributions.kl_divergence(_gaussian_of(guide), post))
            svi = pyro.infer.SVI(oracle.model, guide, WhitenedAdam(guide),
                                 ELBO(4, estimator="stl"))
            svi.step()
            start = time.perf_counter()
            for _ in range(num_steps):
                svi.step()
            step_ms = 1000 * (time.perf_counter() - start) / num_steps
            kl = float(torch.distributions.kl_divergence(_gaussian_of(guide), post))
            rows[label] = {"laplace_seconds": round(laplace_seconds, 2),
                           "step_ms": round(step_ms, 1), "kl_laplace": kl0, "kl_after": kl}
            info["cond"] = float(torch.linalg.cond(post.precision_matrix))
            print(f"  D={dim:4d} {label:40s} laplace {laplace_seconds:6.2f}s  step "
                  f"{step_ms:7.1f}ms  KL {kl0:.3g} -> {kl:.3g}", flush=True)
        out[str(dim)] = {"design": info, "rows": rows}
    return out


# ------------------------------------------------------- experiment: the funnel's x_i scale


def funnel_experiment(num_draws: int = 4000, repeats: int = 200, seed: int = 0) -> dict:
    """Can any finite sample show the funnel's sd(x_i) = e^(9/4)?  Three answers, with the IQR
    ratio (exact IQR by quadrature) beside each sd ratio:

    * **exact draws**: ``repeats`` sets of ``num_draws`` i.i.d. draws from the funnel itself
      (v ~ N(0, 3), x | v ~ N(0, e^(v/2))): the spread of their sd ratios;
    * **NUTS** on the funnel as written (centered; Pyro's NUTS, 1000 warm-up, ``num_draws``
      draws, target acceptance 0.9): its sd and IQR ratios, divergences, seconds;
    * **fit** (the escalating default, which non-centers the funnel) and **fit_flow**
      (``reparam=None``: the flow on the funnel as written), raw and PSIS-resampled from 4000
      and from 40,000 draws."""
    import numpy as np

    case = funnel()
    ref = case.reference
    rng = np.random.default_rng(seed)
    out = {}
    ratios, iqr_ratios = [], []
    for _ in range(repeats):
        v = 3.0 * rng.standard_normal(num_draws)
        x = np.exp(v / 2)[:, None] * rng.standard_normal((num_draws, FUNNEL_DIM - 1))
        ratios.append(np.median(x.std(0) / ref["x"]["sd"][0]))
        q75, q25 = np.percentile(x, [75, 25], axis=0)
        iqr_ratios.append(np.median((q75 - q25) / ref["x"]["iqr"][0]))

    def spread(values):
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        return {"median": float(p50), "p5": float(p5), "p95": float(p95)}

    out["exact_draws"] = {"num_draws": num_draws, "repeats": repeats,
                          "median_sd_ratio": spread(ratios),
                          "median_iqr_ratio": spread(iqr_ratios)}
    print(f"  exact draws: sd ratio {out['exact_draws']['median_sd_ratio']}, IQR ratio "
          f"{out['exact_draws']['median_iqr_ratio']}", flush=True)
    pyro.set_rng_seed(seed)
    kernel = NUTS(funnel_model, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=num_draws, warmup_steps=1000, disable_progbar=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run()
    draws = mcmc.get_samples()
    x = draws["x"].double().numpy()
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    out["nuts"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "divergences": sum(len(d) for d in mcmc.diagnostics()["divergences"].values()),
        "v_mean_error": float(draws["v"].double().mean()) / 3.0,
        "v_sd_ratio": float(draws["v"].double().std()) / 3.0,
        "x_sd_ratio": spread(x.std(0) / ref["x"]["sd"][0]),
        "x_iqr_ratio": spread((q75 - q25) / ref["x"]["iqr"][0]),
    }
    print(f"  NUTS: {out['nuts']}", flush=True)
    from pyro_elbo.fit import fit

    for label, reparam in (("fit", "auto"), ("fit_flow", None)):  # the default; the flow path
        pyro.clear_param_store()
        start = time.perf_counter()
        result = fit(case.model, None, seed=0, progress=False, reparam=reparam)
        model = result.model if result.model is not case.model else None
        out[label] = {"seconds": round(time.perf_counter() - start, 1),
                      "stages": [f"{st.name} (k-hat {st.khat:.2f}, {st.num_steps} steps)"
                                 for st in result.stages],
                      "raw": score(case, result.guide, model=model)}
        for n in (4000, 40000):
            out[label][f"psis_{n}"] = psis_score(case, result.guide, num_draws=n, model=model)
        for key in ("raw", "psis_4000", "psis_40000"):
            r = out[label][key]
            print(f"  {label} {key}: err {r['max_mean_error']:.3f} sd {r['min_sd_ratio']:.2f}-"
                  f"{r['max_sd_ratio']:.2f} (median {r['median_sd_ratio']:.2f}) IQR "
                  f"{r['min_iqr_ratio']:.2f}-{r['max_iqr_ratio']:.2f} k-hat "
                  f"{r.get('khat', float('nan')):.2f}", flush=True)
    return out
