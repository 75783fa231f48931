"""Up-front validation of ``fit(model, guide, ..., loss=..., optim=...)``, before step 1.

Everything ``fit`` can find out about a bad pairing before it spends compute is checked here, and
each problem is an exception that names the site (or argument) and says what to do:

* settings: ``num_steps``/``max_steps``/``checkpoint_every`` must be positive integers, ``optim``
  a Pyro or torch optimizer, ``loss`` an objective *instance* with valid arguments;
* structure (:func:`pyro_elbo.engine.validation.check_traces`, called on one unvectorized trace of
  guide and model): a latent site missing from the guide, a guide site absent from the model (not
  marked auxiliary), a guide sampling an observed site, a batch or event shape mismatch, an
  enumerated site under an objective that cannot sum it out;
* a **support mismatch**: the guide's support must lie inside the prior's, or q puts mass where
  ``log p = -inf``.  Checked by mapping a few points of the unconstrained space through
  ``biject_to(guide support)`` and testing them against the prior's support (``Delta`` guide sites,
  as in autoguides, have their *value* tested instead);
* a **discrete** (or otherwise non-reparameterizable) guide site under a pathwise-only estimator
  (STL, DReG, CUBO);
* a **plate** with a different name, size or dim in model and guide;
* **data that is not a tensor** (a numpy array or a list used as an observed value, or making
  model or guide fail): a ``TypeError`` naming the argument and the site;
* NaN or inf in **observed data** (entries masked out are allowed);
* a model that **observes nothing** (no ``obs=``, no ``pyro.factor``: a forgotten ``obs=``): one
  warning;
* a non-finite log-density at the initial draw;
* a guide with **no parameters**.

The traces run under ``poutine.block`` and create the guide's parameters (autoguides build theirs
on first call); nothing is optimized.  :func:`check_pair` is the part that works on traces
already run: pyro_elbo's objectives call it on their first call (:mod:`.first_call`), so
``SVI(..., loss=pyro_elbo.ELBO())`` gets the same errors.  When the model fails on the guide's
draw, a guide site off the prior's support is looked for first (the model may have failed by
building ``Normal(0, scale < 0)`` from it) and reported as a :class:`SupportMismatchError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pyro.poutine.trace_messenger import TraceMessenger

from pyro_elbo.engine.traces import is_messenger, side_trace_pair
from pyro_elbo.engine.validation import (
    ModelGuideMismatchError,
    check_traces,
    replay_until_failure,
    sample_sites,
)
from pyro_elbo.fit.data_checks import check_data, raise_for_data, warn_if_nothing_observed
from pyro_elbo.fit.first_call import mark_checked
from pyro_elbo.fit.settings_checks import (
    check_objective,
    check_optim,
    check_steps,
    handles_enumeration,
)
from pyro_elbo.fit.site_checks import (
    PlateMismatchError,
    check_observed,
    check_pathwise,
    check_plates,
)
from pyro_elbo.fit.support_checks import SupportMismatchError, check_supports

__all__ = [
    "PlateMismatchError",
    "Preflight",
    "SupportMismatchError",
    "check_model_guide",
    "check_pair",
    "check_objective",
    "check_optim",
    "check_steps",
    "handles_enumeration",
]


# ------------------------------------------------------------------ model and guide


@dataclass
class Preflight:
    """What the up-front run found: the traces and the parameters by owner."""

    guide_trace: object = field(repr=False)
    model_trace: object = field(repr=False)
    guide_params: list
    model_params: list


def check_model_guide(model, guide, objective, args, kwargs, check_density=True) -> Preflight:
    """Run guide and model once (unvectorized, blocked) and check the pair; see the module doc.
    ``check_density=False`` leaves the finite-log-density check of the draw to the caller
    (``fit`` runs it after its Laplace stage, which may move the guide to where it is finite)."""
    model_trace, guide_trace = _trace_checked_pair(model, guide, args, kwargs)
    check_data(sample_sites(model_trace), args, kwargs)
    enumerating = handles_enumeration(objective)
    check_traces(
        _without_enumerated(model_trace, guide_trace, enumerating),
        guide_trace,
        allow_enumeration=enumerating,
        strict=True,  # fit refuses a guide site the model lacks (Trace_ELBO only warns)
    )
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    check_pathwise(guide_sites, objective)
    check_plates(model_sites, guide_sites)
    check_supports(model_sites, guide_sites)
    check_observed(model_sites)
    warn_if_nothing_observed(model_sites)
    if check_density:
        _check_initial_density(model_trace, guide_trace)
    mark_checked(objective, model, guide)  # the objective's first call need not repeat them
    guide_params = _param_names(guide_trace)
    model_params = [n for n in _param_names(model_trace) if n not in guide_params]
    return Preflight(guide_trace, model_trace, guide_params, model_params)


def check_pair(model_trace, guide_trace, args, kwargs) -> None:
    """The checks of :func:`check_model_guide` that pyro_elbo's objectives do not make
    themselves (data types, plates, supports, NaN data, a model that observes nothing), on
    traces already run: what an objective's first call runs (:mod:`.first_call`)."""
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    check_data(model_sites, args, kwargs)
    check_plates(model_sites, guide_sites)
    check_supports(model_sites, guide_sites)
    check_observed(model_sites)
    warn_if_nothing_observed(model_sites)


def _trace_checked_pair(model, guide, args, kwargs):
    """``(model_trace, guide_trace)`` of one side run (blocked, with autograd, on the caller's
    random stream: a seeded ``fit`` draws after it what it drew before); a failure is
    explained, naming the argument or site, and says whether the guide or the model raised it."""
    # the guide's sites recorded as it runs (a context, not a second trace handler, which would
    # annotate a failure twice), so that a model failure can be explained from the draw it
    # failed on; the model marks that the guide has finished
    recorder = TraceMessenger()
    reached = []

    def recorded_guide(*args, **kwargs):
        with recorder:
            return guide(*args, **kwargs)

    def replayed_model(*args, **kwargs):
        reached.append(True)
        return model(*args, **kwargs)

    traced_guide = guide if is_messenger(guide) else recorded_guide
    try:
        return side_trace_pair(
            replayed_model, traced_guide, args, kwargs, grad=True, fork=False, user=(model, guide)
        )
    except Exception as error:
        if reached and isinstance(error, ModelGuideMismatchError) and error.__cause__ is not None:
            raise  # explained by the trace service, naming the site
        raise_for_data(error, args, kwargs)
        if not reached:  # an AutoMessenger guide runs the model itself: it is the guide's run
            _note(error, "raised by the guide in fit's check before step 1")
            raise
        _raise_for_supports(model, recorder.trace, args, kwargs, error)
        _note(error, "raised by the model (replayed on the guide) in fit's check before step 1")
        raise


def _raise_for_supports(model, guide_trace, args, kwargs, error):
    """The model failed on the guide's draw: if a guide site lies off its prior's support
    (a Normal guide for a positive site makes the model build Normal(0, scale < 0)), raise
    the :class:`SupportMismatchError` that explains it."""
    reached = replay_until_failure(model, guide_trace, args, kwargs)
    try:
        check_supports(reached, sample_sites(guide_trace))
    except SupportMismatchError as mismatch:
        raise mismatch from error


def check_has_params(preflight: Preflight, guide) -> None:
    """A guide with no parameters has nothing to fit (a warning when the model has some)."""
    if preflight.guide_params:
        return
    name = getattr(guide, "__name__", type(guide).__name__)
    if preflight.model_params:
        import warnings

        warnings.warn(
            f"fit: the guide {name!r} has no parameters; only the model's parameters "
            f"({', '.join(preflight.model_params[:4])}) are fitted.",
            stacklevel=3,
        )
        return
    raise ValueError(
        f"fit: the guide {name!r} has no parameters (no pyro.param, pyro.module or PyroModule "
        "parameter is read when it runs), so there is nothing to optimize. Give the guide "
        "learnable parameters, e.g. pyro.param('loc', torch.tensor(0.)), or use an autoguide "
        "such as pyro.infer.autoguide.AutoNormal(model)."
    )


def _note(error, text):
    if hasattr(error, "add_note"):
        error.add_note(f"({text})")


def _param_names(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def _without_enumerated(model_trace, guide_trace, enumerating):
    """Under an enumerating objective, model sites it sums out are not missing from the guide."""
    if not enumerating:
        return model_trace
    trace = model_trace.copy()
    for name, site in list(model_trace.nodes.items()):
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and site["infer"].get("enumerate")
            and name not in guide_trace.nodes
        ):
            trace.remove_node(name)
    return trace


def check_initial_density(model, guide, args, kwargs, preflight=None, when="initial"):
    """The log-densities of one draw of the pair are finite: the draw of ``preflight`` when
    given, else a new one (blocked, from a forked generator: the run's random numbers are not
    consumed)."""
    if preflight is not None:
        return _check_initial_density(preflight.model_trace, preflight.guide_trace, when)
    model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs, grad=True)
    _check_initial_density(model_trace, guide_trace, when)


def _check_initial_density(model_trace, guide_trace, when="initial"):
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        try:
            trace.compute_log_prob()
        except Exception as error:
            _note(
                error, f"raised computing the {role}'s log-densities in fit's check before step 1"
            )
            raise
        for name, site in sample_sites(trace).items():
            log_prob = site.get("log_prob")
            if not isinstance(log_prob, torch.Tensor) or bool(torch.isfinite(log_prob).all()):
                continue
            raise ValueError(
                f"before step 1: the log-density of {role} site {name!r} is "
                f"{_nonfinite_text(log_prob)} at the guide's {when} draw, so the objective "
                "would be non-finite from the start. Check the data against the distribution's "
                "support, the distribution's parameters (a scale of 0, a log of a negative "
                "number) and the guide's initialization."
            )


def _nonfinite_text(tensor):
    if bool(torch.isnan(tensor).any()):
        return "NaN"
    return "-inf" if bool((tensor == float("-inf")).any()) else "+inf"
