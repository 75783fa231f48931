"""Reference posteriors of the stress suite: exact (conjugate) ones, and NUTS draws summarized
and cached in ``benchmarks/results/stress_reference.json``."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS

from benchmarks.stress.cases import NORMAL_IQR, Case

RESULTS = Path(__file__).parent.parent / "results"

NUTS_WARMUP, NUTS_SAMPLES = 1000, 4000
REFERENCE_FILE = RESULTS / "stress_reference.json"


def _summaries(draws: dict) -> dict:
    """site -> {"mean": flat list, "sd": flat list} over the leading draw dim."""
    out = {}
    for name, value in draws.items():
        flat = value.detach().double().reshape(value.shape[0], -1)
        out[name] = {"mean": flat.mean(0).tolist(), "sd": flat.std(0).tolist()}
    return out


def nuts_reference(case: Case, seed: int = 0) -> None:
    """Fill ``case.reference`` from NUTS on ``case.reference_model``, run in the whitened
    coordinates of its Laplace approximation: ``u = m0 + L0 z`` (a linear reparameterization
    with a constant Jacobian, so the target is unchanged), where plain NUTS on raw-scale
    predictors spends its warm-up at tree depth 10.  Diagonal mass-matrix adaptation on top."""
    from pyro.ops.stats import effective_sample_size

    from pyro_elbo.init.laplace import laplace_init

    model = case.reference_model or case.model
    laplace = laplace_init(model, None, *case.args)
    m0, L0 = laplace.loc, laplace.scale_tril

    def potential(params):
        return laplace.potential(m0 + L0 @ params["z"])

    warmup, samples = case.nuts or (NUTS_WARMUP, NUTS_SAMPLES)
    pyro.set_rng_seed(seed)
    kernel = NUTS(potential_fn=potential, target_accept_prob=0.9)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup,
                initial_params={"z": torch.zeros_like(m0)}, disable_progbar=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run()
    seconds = time.perf_counter() - start
    z = mcmc.get_samples()["z"]
    ess = float(effective_sample_size(z[None].double()).min())
    u = m0 + z @ L0.T
    draws = {
        name: laplace.transforms[name](u[:, laplace.slices[name]].reshape((-1,) + shape))
        for name, shape in laplace.sites
    }
    if case.derive is not None:
        draws = case.derive(draws)
    case.reference = _summaries(draws)
    divergences = sum(len(d) for d in mcmc.diagnostics()["divergences"].values())
    case.reference_info = {
        "method": f"NUTS in Laplace-whitened coordinates, {warmup} warm-up + "
        f"{samples} draws, seed {seed}",
        "min_ess": round(ess, 1),
        "divergences": divergences,
        "seconds": round(seconds, 1),
    }


def exact_reference(case: Case) -> None:
    post = case.oracle.posterior()
    case.reference = {
        case.oracle.latent: {"mean": post.mean.tolist(), "sd": post.stddev.tolist(),
                             "iqr": (NORMAL_IQR * post.stddev).tolist()}
    }
    cov = post.covariance_matrix
    sd = cov.diagonal().sqrt()
    corr = cov / sd[:, None] / sd[None, :]
    case.reference_info = {
        "method": "exact (conjugate)",
        "max_abs_correlation": float((corr - torch.eye(len(sd), dtype=sd.dtype)).abs().max()),
        "sd_ratio": float(sd.max() / sd.min()),
        "condition_number": float(torch.linalg.cond(post.precision_matrix)),
    }


def load_references(cases, refresh=False) -> None:
    cached = {} if refresh or not REFERENCE_FILE.exists() else json.loads(REFERENCE_FILE.read_text())
    changed = False
    for case in cases:
        if case.oracle is not None:
            exact_reference(case)
        elif case.reference:  # exact moments given by the case
            continue
        elif case.name in cached:
            case.reference = cached[case.name]["reference"]
            case.reference_info = cached[case.name]["info"]
        else:
            print(f"  NUTS reference for {case.name} ...", flush=True)
            nuts_reference(case)
            cached[case.name] = {"reference": case.reference, "info": case.reference_info}
            changed = True
    if changed:
        RESULTS.mkdir(exist_ok=True)
        REFERENCE_FILE.write_text(json.dumps(cached, indent=1))
