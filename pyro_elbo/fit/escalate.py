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
2b. **non-centering** (``reparam="auto"``, the default), at two points.  Before stage 1, the
   mode check (:func:`~pyro_elbo.fit.noncentering.funnel_without_mode`): latent location-scale
   sites whose scale is itself latent, and an L-BFGS that finds no mode (it runs down the
   funnel) -> the model is rewritten by :func:`noncentered` and stage 1 runs on it.  After stage
   1, when the Gaussian's k-hat is high and its draws show a funnel
   (:func:`pyro_elbo.diagnostics.trust.funnel_sites`), the model is rewritten and the Gaussian
   stage runs again on it, and the rewrite is kept when its k-hat is lower.  A Gaussian stage on
   a rewritten model runs at most :data:`NONCENTERED_MAX_STEPS` steps.  The rewritten model is
   then ``result.model`` (the original sites are deterministic sites of it, so
   ``to_inference_data`` still gives them).  ``reparam=None`` never rewrites.
   **Fallbacks**: a Gaussian stage that raises is rerun as SGD from the prior's median (no
   Laplace stage, no BaM); a flow stage that raises (non-finite) is rerun once with its step
   :data:`FLOW_RETRY_FACTOR` times smaller; every attempt is a stage with its reason.
3. **flow**: otherwise :class:`~pyro_elbo.guides.flow.AutoRealNVP` built on the Gaussian answer
   (it starts exactly there), trained with STL, :data:`~pyro_elbo.guides.flow.FLOW_PARTICLES`
   particles and a fixed Adam step (Agrawal, Sheldon & Domke 2020), at most
   :data:`FLOW_MAX_STEPS` steps, stopped by :class:`~pyro_elbo.fit.plateau.LossPlateau` when
   the loss has stopped falling at the resolution its noise allows and the flow's k-hat is below
   :data:`FLOW_ACCEPT_KHAT`; a plateau refused for its k-hat halves the step (a fixed step
   leaves the flow jittering around its optimum; measured on the banana and the latent GP, the
   loss falls again after each halving and k-hat comes down); the user's ``compile`` setting
   applies to its steps.  Its k-hat is
   measured as the Gaussian's and the guide with the lower k-hat is returned.
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

import pyro
import torch

from pyro_elbo.fit.noncentering import (
    REPARAM_CHOICES,
    check_reparam,
    funnel_without_mode,
    noncentered,
)

__all__ = [
    "ESCALATE_KHAT",
    "FLOW_ACCEPT_KHAT",
    "FLOW_MAX_STEPS",
    "FLOW_RETRY_FACTOR",
    "GAUSSIAN_MAX_STEPS",
    "KHAT_DRAWS",
    "REPARAM_CHOICES",
    "Stage",
    "check_reparam",
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
#: the most steps of the Gaussian stage on a model the escalation non-centered (its answer is the
#: flow's base when k-hat is still high; the flow corrects what these steps leave; measured on
#: hier_logistic: 3000 steps (19 s) gave the same PSIS-draw scores as 1000 (5 s))
NONCENTERED_MAX_STEPS = 1000
#: the most steps of the flow stage (a fixed small step, Agrawal et al. 2020), stopped sooner by
#: :class:`~pyro_elbo.fit.plateau.LossPlateau` when the loss stops falling
FLOW_MAX_STEPS = 2000
#: a plateau of the flow's loss ends the flow stage only when its k-hat is below this: PSIS
#: estimates then have finite variance (Vehtari et al. 2024); between 0.5 and 0.7 the
#: resampled draws still under-represent the tails (measured: a banana's sd at 0.85-0.91 of
#: the truth with k-hat 0.68, its IQR right)
FLOW_ACCEPT_KHAT = 0.5
#: a flow stage that goes non-finite is run once more with its step divided by this
FLOW_RETRY_FACTOR = 5
#: the flow stage is skipped above this many latent dimensions (its cost grows as D^2)
FLOW_MAX_DIM = 200


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


def stage_khat(model, guide, args, kwargs, num_samples: int = KHAT_DRAWS) -> float:
    """PSIS k-hat of ``guide`` from ``num_samples`` draws (no global random numbers used)."""
    from pyro_elbo.diagnostics.psis import psis_khat
    from pyro_elbo.diagnostics.trust import log_weights
    from pyro_elbo.engine.traces import forked_rng

    with forked_rng(), warnings.catch_warnings():
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
    # stopping tests pass (near-Gaussian posteriors), else by the SGD loop
    # (pyro_elbo.vi.methods)
    return fit(model, None, *args, escalate=False, **settings, **kwargs)


def _fallback_gaussian(fit, model, args, kwargs, options):
    """The Gaussian stage when the first one raised: the SGD loop from the prior's median (no
    Laplace stage, no BaM), the plain default optimizer."""
    settings = {"max_steps": GAUSSIAN_MAX_STEPS, **options, "init": None, "method": "svi"}
    return fit(model, None, *args, escalate=False, **settings, **kwargs)


def _flow_stage(fit, model, base_guide, args, kwargs, options, lr=None):
    from pyro_elbo.fit.plateau import LossPlateau
    from pyro_elbo.guides.flow import AutoRealNVP, flow_objective, flow_optimizer

    flow = AutoRealNVP(model, base=base_guide)
    settings = {k: v for k, v in options.items() if k in ("progress", "callbacks", "compile")}
    steps = options.get("flow_steps")

    refused = []  # set when a plateau was refused for its k-hat: the next step is halved

    def good_enough():  # a plateau ends the stage only when the flow's k-hat is good
        k = stage_khat(model, flow, args, kwargs)
        if k < FLOW_ACCEPT_KHAT:
            return True, f"the flow's k-hat {k:.2f} < {FLOW_ACCEPT_KHAT}"
        refused.append(True)
        return False, (f"the flow's k-hat {_k(k)} >= {FLOW_ACCEPT_KHAT}: continuing with the "
                       "step halved")

    def halve_step(state):  # after a refused plateau: less jitter, a finer fit of the tails
        if refused:
            refused.clear()
            for group in state.optimizer.param_groups:
                group["lr"] *= 0.5

    length = ({"num_steps": steps} if steps is not None else
              {"max_steps": FLOW_MAX_STEPS, "convergence": LossPlateau(accept=good_enough)})
    callbacks = (*(settings.pop("callbacks", None) or ()), halve_step)
    return fit(model, flow, *args, loss=flow_objective(), optim=flow_optimizer(lr), init=None,
               escalate=False, skip_nonfinite=FLOW_MAX_STEPS // 10, callbacks=callbacks,
               **length, **settings, **kwargs)


def _set_aside(guide, prefix: str | None):
    """Move ``guide``'s parameters in Pyro's param store under the name ``prefix`` (its module
    name then follows), or drop them (``prefix=None``, a guide that is discarded; ``guide`` may
    then be its module name), so that the next stage's autoguide of the same class, which takes
    the same names, starts afresh and leaves this one's values alone."""
    store = pyro.get_param_store()
    old = guide if isinstance(guide, str) else guide._pyro_name
    for name in [n for n in store.keys() if n == old or n.startswith(old + ".")]:
        if prefix is None:
            del store[name]
            continue
        # (ParamStoreDict has no rename: move the unconstrained tensor itself, so the module,
        # which holds the same tensor, stays in sync)
        value, constraint = store._params.pop(name), store._constraints.pop(name)
        new = prefix + name[len(old):]
        store._params[new], store._constraints[new] = value, constraint
        store._param_to_name[value] = new
    if prefix is not None:
        guide._pyro_set_supermodule(prefix, guide._pyro_context)


def _lower(k_new, k_old):
    """Whether k-hat ``k_new`` is better than ``k_old`` (nan: no finite weights, the worst)."""
    return not math.isnan(k_new) and (math.isnan(k_old) or k_new < k_old)


def _first_line(error):
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first[:200]}"


def _run_gaussian(fit, model, args, kwargs, options, stages, name):
    """The Gaussian stage, and its fallback when it raises; appends the stage(s), returns
    ``(result, k-hat)`` (``(None, nan)`` when both raised)."""
    attempts = (("", gaussian_stage),
                (" (fallback: SGD from the prior median, no Laplace stage)", _fallback_gaussian))
    for label, run in attempts:
        start = time.perf_counter()
        try:
            result = run(fit, model, args, kwargs, options)
        except Exception as error:  # noqa: BLE001 - fall back, say why
            stages.append(Stage(name + label, "AutoMultivariateNormal",
                                f"failed ({_first_line(error)})", math.nan,
                                time.perf_counter() - start))
            continue
        k = stage_khat(model, result.guide, args, kwargs)
        stages.append(Stage(name + label, type(result.guide).__name__, "", k,
                            time.perf_counter() - start, result.num_steps, result.converged))
        return result, k
    return None, math.nan


def _run_flow(fit, model, base, args, kwargs, options, stages):
    """The flow stage from the Gaussian ``base``; when it goes non-finite, once more with a
    step :data:`FLOW_RETRY_FACTOR` times smaller.  Returns ``(result, k-hat)`` or
    ``(None, nan)``."""
    from pyro_elbo.guides.flow import FLOW_LR, AutoRealNVP

    for lr in (None, FLOW_LR / FLOW_RETRY_FACTOR):
        start = time.perf_counter()
        name = "flow" if lr is None else f"flow (retry, step {lr:g})"
        try:
            flow = _flow_stage(fit, model, base.guide, args, kwargs, options, lr=lr)
        except Exception as error:  # noqa: BLE001 - keep the Gaussian answer, say why
            stages.append(Stage(name, "AutoRealNVP", f"failed ({_first_line(error)})", math.nan,
                                time.perf_counter() - start))
            _set_aside(AutoRealNVP.__name__, None)  # the failed flow's parameters
            continue
        k = stage_khat(model, flow.guide, args, kwargs)
        stages.append(Stage(name, "AutoRealNVP", flow.reason, k, time.perf_counter() - start,
                            flow.num_steps, flow.converged))
        return flow, k
    return None, math.nan


def escalating_fit(fit, model, args, kwargs, options):
    """``fit(model, None, *args)`` with escalation (see the module docstring).  ``fit`` is
    :func:`pyro_elbo.fit.fit` (passed in to keep the import one-way); ``options`` are its
    keyword settings other than model arguments (``reparam``: ``"auto"`` or ``None``)."""
    from pyro_elbo.diagnostics.psis import khat_threshold
    from pyro_elbo.init.defaults import latent_dim

    started = time.perf_counter()
    options = dict(options)
    reparam = options.pop("reparam", "auto")
    flow_options = {**options, "flow_steps": options.pop("flow_steps", None)}
    stages: list[Stage] = []
    name = "gaussian"
    if reparam == "auto":  # no mode and a latent scale: a funnel before any Gaussian is fitted
        start = time.perf_counter()
        found = funnel_without_mode(model, args, kwargs)
        if found is not None:
            sites, laplace = found
            stages.append(Stage(
                "mode check", "Laplace", f"no mode (L-BFGS ran down the funnel for "
                f"{laplace.num_iterations} iterations) and a latent scale at {sites}: "
                "non-centering them before the Gaussian stage (reparam='auto'; reparam=None "
                "keeps the model)", math.nan, time.perf_counter() - start))
            model, reparam, name = noncentered(model), None, "gaussian (non-centered)"
    shorter = {**options, "max_steps": min(options.get("max_steps", GAUSSIAN_MAX_STEPS),
                                           NONCENTERED_MAX_STEPS)}
    gaussian, k = _run_gaussian(fit, model, args, kwargs,
                                options if name == "gaussian" else shorter, stages, name)
    if gaussian is None:
        raise RuntimeError("fit: every Gaussian stage failed: " + "; ".join(
            f"{st.name}: {st.reason}" for st in stages))
    first, note = gaussian, ""
    best, best_k = gaussian, k
    if not k < ESCALATE_KHAT:  # (nan included)
        sites = _funnel_sites(model, gaussian.guide, args, kwargs)
        if sites and reparam == "auto":
            stages[-1].reason = (f"k-hat {_k(k)} >= {ESCALATE_KHAT} and a funnel at {sites} "
                                 "(their scale moves with other latents): non-centering them "
                                 "(reparam='auto'; reparam=None keeps the model)")
            _set_aside(gaussian.guide, f"{gaussian.guide._pyro_name}_centered")
            rewritten = noncentered(model)
            again, k_again = _run_gaussian(fit, rewritten, args, kwargs, shorter, stages,
                                           "gaussian (non-centered)")
            if again is not None and _lower(k_again, k):
                best, best_k, model, first = again, k_again, rewritten, again
                _set_aside(gaussian.guide, None)  # the param store keeps the returned guide's
            elif again is not None:
                stages[-1].reason = "not kept: k-hat no lower than the centered model's"
                _set_aside(again.guide, None)
        elif sites and name == "gaussian":
            note = (f"; a funnel at {sites} (their scale moves with other latents): "
                    "fit(..., reparam='noncentered') is the cure")
    dim = latent_dim(model, *args, **kwargs)
    if best_k < ESCALATE_KHAT:
        _say(stages[-1], f"k-hat {best_k:.2f} < {ESCALATE_KHAT}: the Gaussian holds the "
             "posterior (PSIS-resampled draws are reliable)")
    elif dim < 2 or dim > FLOW_MAX_DIM:
        _say(stages[-1], f"k-hat {_k(best_k)} >= {ESCALATE_KHAT}, but the flow stage needs 2 "
             f"to {FLOW_MAX_DIM} latent dimensions (the model has {dim}){note}")
    else:
        _say(stages[-1], f"k-hat {_k(best_k)} >= {ESCALATE_KHAT}: continuing with a flow{note}")
        flow, k_flow = _run_flow(fit, model, best, args, kwargs, flow_options, stages)
        if flow is not None:
            better = _lower(k_flow, best_k)
            stages[-1].reason = ("returned: lower k-hat than the Gaussian" if better else
                                 "not returned: k-hat no lower than the Gaussian's") + \
                f"; {flow.reason}"
            if better:
                best, best_k = flow, k_flow
        else:
            _say(stages[-1], "the Gaussian is returned")
    resample = "psis" if best_k <= khat_threshold(KHAT_DRAWS) else None
    # init: the Laplace stage of the Gaussian kept (the flow stage starts from that Gaussian)
    # model: the one the returned guide was fitted to (non-centered when the escalation did so;
    # set here as well, since not every Gaussian method fills it in)
    return dataclasses.replace(best, seconds=time.perf_counter() - started, stages=stages,
                               resample=resample, khat=best_k, init=first.init, model=model)


def _funnel_sites(model, guide, args, kwargs) -> list:
    """Latent sites whose scale moves with other latents in the guide's draws (a funnel)."""
    from pyro_elbo.diagnostics.trust import funnel_sites

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return funnel_sites(model, guide, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a note, not a requirement
            return []


def _say(stage, text):
    stage.reason = f"{stage.reason}; {text}" if stage.reason else text


def _k(k):
    return "nan (no finite weights)" if math.isnan(k) else f"{k:.2f}"


def to_inference_data(result, *args, num_samples: int = 1000, **kwargs):
    """``FitResult.to_inference_data``: the fitted guide's draws for ``result.model``, PSIS-
    resampled when ``result.resample`` says so (override with ``resample=``)."""
    from pyro_elbo.diagnostics.arviz import to_inference_data as convert

    kwargs.setdefault("resample", result.resample)
    kwargs.setdefault("losses", result.losses)
    return convert(result.model, result.guide, *args, num_samples=num_samples, **kwargs)
