r"""The escalating default: ``fit(model, None, *args)`` fits a Gaussian, checks it, and goes on to
a flow only when the check says the Gaussian is not good enough.

Stages (each recorded in ``result.stages`` as a :class:`Stage`: what ran, why, k-hat, seconds):

1. **gaussian**: :func:`gaussian_stage`, the one place that says how the Gaussian is fitted
   (today: :func:`pyro_elbo.init.recommended_guide`, the Laplace stage and whitened Adam with
   the STL ELBO, stopped by ``fit``'s convergence rule; at most :data:`GAUSSIAN_MAX_STEPS`).
2. **check**: PSIS k-hat of the fitted guide from :data:`KHAT_DRAWS` draws (Yao et al. 2018,
   :func:`pyro_elbo.diagnostics.trust.diagnose`).  ``k-hat <`` :data:`ESCALATE_KHAT` (0.7):
   the Gaussian is close enough that its PSIS-resampled draws are reliable (Yao et al. 2018;
   Vehtari et al. 2024, sec. 3), and the run stops here.
3. **flow**: otherwise :class:`~pyro_elbo.guides.flow.AutoRealNVP` built on the Gaussian answer
   (it starts exactly there), trained with STL, :data:`~pyro_elbo.guides.flow.FLOW_PARTICLES`
   particles and a fixed Adam step for :data:`FLOW_STEPS` steps (Agrawal, Sheldon & Domke 2020);
   its k-hat is measured the same way and the guide with the lower k-hat is returned.
4. **draws**: ``result.resample`` is ``"psis"`` when the returned guide's k-hat is below
   ``min(1 - 1/log10 S, 0.7)``, and ``result.to_inference_data(*args)`` then importance-resamples
   the guide's draws by their Pareto-smoothed weights (Vehtari et al. 2024), which removes most
   of the remaining bias of a slightly-off guide.

A guide passed by the user is never replaced: the escalation runs only for ``guide=None`` (and
without ``loss``, ``optim``, ``data``, ``checkpoint`` or ``num_steps``, which name a single run).

``reparam="noncentered"`` (:func:`noncentered`) rewrites the model first with
:class:`pyro.infer.reparam.LocScaleReparam` (``centered=0``) on every latent location-scale site
(Normal, StudentT, Cauchy, Laplace): ``theta ~ N(mu, tau)`` becomes ``theta_decentered ~ N(0, 1)``,
``theta = mu + tau * theta_decentered``, which turns a funnel into a near-Gaussian posterior
(Papaspiliopoulos, Roberts & Skold 2007; Gorinova, Moore & Hoffman 2020).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.poutine as poutine
import torch

__all__ = [
    "ESCALATE_KHAT",
    "FLOW_STEPS",
    "GAUSSIAN_MAX_STEPS",
    "KHAT_DRAWS",
    "REPARAM_CHOICES",
    "Stage",
    "escalating_fit",
    "gaussian_stage",
    "noncentered",
    "stage_khat",
]

#: k-hat below which the Gaussian is kept: PSIS-corrected estimates from it are reliable
#: (Yao et al. 2018; Vehtari et al. 2024)
ESCALATE_KHAT = 0.7
#: draws for each stage's k-hat (the threshold for reliable PSIS is min(1 - 1/log10 S, 0.7))
KHAT_DRAWS = 2000
#: the most steps of the Gaussian stage (its convergence rule usually stops it sooner)
GAUSSIAN_MAX_STEPS = 3000
#: steps of the flow stage (a fixed small step, no stopping rule: Agrawal et al. 2020)
FLOW_STEPS = 1500
#: the flow stage is skipped above this many latent dimensions (its cost grows as D^2)
FLOW_MAX_DIM = 200
REPARAM_CHOICES = (None, "noncentered")


@dataclass
class Stage:
    """One stage of an escalating fit: ``name`` ("gaussian", "flow"), ``guide`` (its class
    name), ``reason`` (why it ran, or why the run stopped after it), ``khat`` (PSIS k-hat of its
    guide, ``nan`` when not measured), ``seconds``, ``num_steps`` and ``converged``."""

    name: str
    guide: str
    reason: str
    khat: float = math.nan
    seconds: float = 0.0
    num_steps: int = 0
    converged: bool = False

    def __repr__(self):
        return (f"Stage({self.name}: {self.guide}, k-hat {self.khat:.2f}, {self.num_steps} "
                f"steps, {self.seconds:.1f} s; {self.reason})")


def check_reparam(reparam):
    if reparam not in REPARAM_CHOICES:
        raise ValueError(
            f"fit: reparam must be None or 'noncentered' (LocScaleReparam on every latent "
            f"location-scale site), got {reparam!r}"
        )
    return reparam


_LOC_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)


def _loc_scale_config(msg):
    from pyro.infer.reparam import LocScaleReparam

    if msg["type"] != "sample" or msg["is_observed"] or msg["name"].endswith("_decentered"):
        return None  # (the site LocScaleReparam itself draws passes through here too)
    fn = msg["fn"]
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, _LOC_SCALE):
        return LocScaleReparam(centered=0.0)
    return None


def noncentered(model):
    """``model`` with every latent Normal/StudentT/Cauchy/Laplace site non-centered by
    :class:`pyro.infer.reparam.LocScaleReparam` (``centered=0``): site ``x`` becomes
    ``x_decentered`` (standard), and ``x`` a deterministic function of it."""
    return poutine.reparam(model, config=_loc_scale_config)


def stage_khat(model, guide, args, kwargs, num_samples: int = KHAT_DRAWS) -> float:
    """PSIS k-hat of ``guide`` from ``num_samples`` draws (no global random numbers used)."""
    from pyro_elbo.diagnostics.psis import psis_khat
    from pyro_elbo.diagnostics.trust import log_weights

    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(20161)
        try:
            lw = log_weights(model, guide, *args, num_samples=num_samples, **kwargs)
        except Exception:  # noqa: BLE001 - an unscorable guide is "not good enough"
            return math.nan
    if bool(torch.isnan(lw).any() | (lw == math.inf).any()):
        return math.nan  # a draw the guide cannot score: not good enough
    lw = lw[torch.isfinite(lw)]  # -inf: a draw outside the model's support, weight 0
    if lw.numel() < num_samples // 2:
        return math.nan
    return psis_khat(lw.numpy())


def gaussian_stage(fit, model, args, kwargs, options):
    """The Gaussian fit the escalation starts from (the one place to change how it is done)."""
    settings = {"max_steps": GAUSSIAN_MAX_STEPS, **options}
    # guide=None with method="auto": the recommended guide, fitted by Batch-and-Match when its
    # fixed-point test passes (near-Gaussian posteriors), else by the SGD loop
    # (pyro_elbo.vi.methods)
    return fit(model, None, *args, escalate=False, **settings, **kwargs)


def _flow_stage(fit, model, base_guide, args, kwargs, options):
    from pyro_elbo.guides.flow import AutoRealNVP, flow_objective, flow_optimizer

    flow = AutoRealNVP(model, base=base_guide)
    settings = {k: v for k, v in options.items() if k in ("progress", "callbacks", "compile")}
    return fit(model, flow, *args, loss=flow_objective(), optim=flow_optimizer(),
               num_steps=options.get("flow_steps", FLOW_STEPS), init=None, escalate=False,
               skip_nonfinite=FLOW_STEPS // 10, **settings, **kwargs)


def escalating_fit(fit, model, args, kwargs, options):
    """``fit(model, None, *args)`` with escalation (see the module docstring).  ``fit`` is
    :func:`pyro_elbo.fit.fit` (passed in to keep the import one-way); ``options`` are its
    keyword settings other than model arguments."""
    from pyro_elbo.diagnostics.psis import khat_threshold
    from pyro_elbo.init.defaults import latent_dim

    started = time.perf_counter()
    options = dict(options)
    flow_steps = options.pop("flow_steps", FLOW_STEPS)
    gaussian = gaussian_stage(fit, model, args, kwargs, options)
    k = stage_khat(model, gaussian.guide, args, kwargs)
    stages = [Stage("gaussian", type(gaussian.guide).__name__, "", k, gaussian.seconds,
                    gaussian.num_steps, gaussian.converged)]
    best, best_k = gaussian, k
    dim = latent_dim(model, *args, **kwargs)
    run_flow = False
    if k < ESCALATE_KHAT:
        stages[0].reason = (f"k-hat {k:.2f} < {ESCALATE_KHAT}: the Gaussian holds the posterior "
                            "(PSIS-resampled draws are reliable)")
    elif dim < 2 or dim > FLOW_MAX_DIM:
        stages[0].reason = (f"k-hat {_k(k)} >= {ESCALATE_KHAT}, but the flow stage needs 2 to "
                            f"{FLOW_MAX_DIM} latent dimensions (the model has {dim})")
    else:
        stages[0].reason = f"k-hat {_k(k)} >= {ESCALATE_KHAT}: continuing with a flow"
        run_flow = True
    if not k < ESCALATE_KHAT:  # (nan included)
        stages[0].reason += _funnel_note(model, gaussian.guide, args, kwargs)
    if run_flow:
        start = time.perf_counter()
        try:
            flow = _flow_stage(fit, model, gaussian.guide, args, kwargs,
                               {**options, "flow_steps": flow_steps})
        except Exception as error:  # noqa: BLE001 - keep the Gaussian answer, say why
            first = str(error).splitlines()[0] if str(error) else ""
            stages.append(Stage("flow", "AutoRealNVP", f"failed ({type(error).__name__}: "
                                f"{first}); the Gaussian is returned", math.nan,
                                time.perf_counter() - start))
        else:
            k_flow = stage_khat(model, flow.guide, args, kwargs)
            better = math.isnan(k) or (not math.isnan(k_flow) and k_flow < k)
            stages.append(Stage(
                "flow", "AutoRealNVP",
                "returned: lower k-hat than the Gaussian" if better
                else "not returned: k-hat no lower than the Gaussian's",
                k_flow, time.perf_counter() - start, flow.num_steps, flow.converged))
            if better:
                best, best_k = flow, k_flow
    resample = "psis" if best_k <= khat_threshold(KHAT_DRAWS) else None
    # init: the Laplace stage the pipeline started from (the flow stage starts from the Gaussian)
    return dataclasses.replace(best, seconds=time.perf_counter() - started, stages=stages,
                               resample=resample, khat=best_k, init=gaussian.init)


def _funnel_note(model, guide, args, kwargs):
    """``"; a funnel at ..."`` when the Gaussian's draws show a scale set by other latents."""
    from pyro_elbo.diagnostics.trust import funnel_sites

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sites = funnel_sites(model, guide, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a note, not a requirement
            return ""
    if not sites:
        return ""
    return (f"; a funnel at {sites} (their scale moves with other latents): "
            "fit(..., reparam='noncentered') is the cure")


def _k(k):
    return "nan (no finite weights)" if math.isnan(k) else f"{k:.2f}"


def to_inference_data(result, *args, num_samples: int = 1000, **kwargs):
    """``FitResult.to_inference_data``: the fitted guide's draws for ``result.model``, PSIS-
    resampled when ``result.resample`` says so (override with ``resample=``)."""
    from pyro_elbo.diagnostics.arviz import to_inference_data as convert

    kwargs.setdefault("resample", result.resample)
    kwargs.setdefault("losses", result.losses)
    return convert(result.model, result.guide, *args, num_samples=num_samples, **kwargs)
