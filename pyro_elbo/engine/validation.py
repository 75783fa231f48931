"""Structural checks of a (model, guide) pair, run once on the first traces an objective sees.

Pyro only warns about most of these (``check_model_guide_match``); a plugin whose estimators
depend on the structure raises instead, with a message that names the site and says what to do.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match

__all__ = [
    "ModelGuideMismatchError",
    "check_traces",
    "explain_replay_failure",
    "replay_until_failure",
    "require_reparameterized",
    "sample_sites",
]


class ModelGuideMismatchError(ValueError):
    """The guide does not match the model (missing, extra or mis-shaped sites)."""


def sample_sites(trace) -> dict:
    """``{name: site}`` of the sample sites of ``trace``, its subsample sites left out."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _strip_ones(shape):
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def check_traces(
    model_trace,
    guide_trace,
    *,
    allow_enumeration: bool = False,
    max_plate_nesting=math.inf,
    strict: bool = False,
) -> None:
    """Raise :class:`ModelGuideMismatchError` (or ``NotImplementedError``) on a bad pair.

    First Pyro's own rules, as ``Trace_ELBO`` applies them when validation is on
    (``pyro.util.check_model_guide_match``: the same warnings, and its errors as
    :class:`ModelGuideMismatchError`), then ours, which refuse what Pyro only warns about where
    the estimate would be silently wrong.  Call it on the raw (unpruned) traces, before log
    densities are computed.  A guide site that is not in the model (nor marked auxiliary) gets
    Pyro's warning and keeps its log q, as in Trace_ELBO; ``strict=True`` (``fit``) refuses it.
    """
    if is_validation_enabled():
        try:
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
        except ValueError as error:
            try:
                _check_traces(model_trace, guide_trace, allow_enumeration, strict)
            except ModelGuideMismatchError as ours:  # Pyro's words, then ours (what to do)
                raise ModelGuideMismatchError(f"{error}. {ours}") from error
            raise ModelGuideMismatchError(
                f"{error}. Make the guide's distribution at that site match the model's (the "
                "same shape, .to_event() for event dims, the same pyro.plate for batch dims)."
            ) from error
    _check_traces(model_trace, guide_trace, allow_enumeration, strict)


def _check_traces(model_trace, guide_trace, allow_enumeration, strict):
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    for name, site in guide_sites.items():
        if site["is_observed"] and (
            site["infer"].get("is_auxiliary") or site["infer"].get("_deterministic")
        ):
            continue  # pyro.factor (part of log q, as in Trace_ELBO) or pyro.deterministic
        if site["is_observed"]:
            raise ModelGuideMismatchError(
                f"guide site {name!r} is observed (obs=...) in the guide; a guide only samples "
                "latent variables. Remove obs= from the guide."
            )
        if name in model_sites and model_sites[name]["infer"].get("_deterministic"):
            raise ModelGuideMismatchError(
                f"the guide samples {name!r}, which is a pyro.deterministic site of the model "
                "(a function of other sites). Remove it from the guide."
            )
        if name in model_sites and model_sites[name]["is_observed"]:
            raise ModelGuideMismatchError(
                f"the guide samples {name!r}, which is an observed site of the model. "
                "Remove it from the guide: observed data are not latent variables."
            )
        if name not in model_sites and not site["infer"].get("is_auxiliary"):
            message = (
                f"guide site {name!r} does not appear in the model. Rename it to match a model "
                "site, or mark it infer={'is_auxiliary': True} if it is a helper variable."
            )
            if strict:
                raise ModelGuideMismatchError(message)
            if not is_validation_enabled():  # else Pyro's check has just warned
                warnings.warn(message + " Its log q is kept, as Trace_ELBO does.", stacklevel=5)
        if not allow_enumeration and site["infer"].get("enumerate"):
            warnings.warn(  # as Trace_ELBO does (pyro.util.check_if_enumerated); it samples it
                f"Found sample sites configured for enumeration: {name}. If you want to "
                "enumerate sites, you need to use TraceEnum_ELBO instead. This objective draws "
                "the site as a Monte Carlo sample.",
                stacklevel=5,
            )
    for name, site in model_sites.items():
        if site["is_observed"]:
            continue
        if name not in guide_sites:
            if allow_enumeration and site["infer"].get("enumerate"):
                continue  # summed out by an enumerating objective
            if site["infer"].get("enumerate"):
                raise NotImplementedError(
                    f"model site {name!r} is enumerated; this objective cannot sum it out. "
                    "Use pyro.infer.TraceEnum_ELBO, or sample the site in the guide."
                )
            extra = [
                n
                for n, s in guide_sites.items()
                if n not in model_sites and not s["infer"].get("is_auxiliary")
            ]
            hint = f" (the guide samples {extra}, which the model lacks: misspelt?)" if extra else ""
            raise ModelGuideMismatchError(
                f"latent site {name!r} of the model is missing from the guide{hint}, so it would "
                "be drawn from the prior and its density left out of the bound. Add a "
                f"pyro.sample({name!r}, ...) statement to the guide (or use an autoguide)."
            )
        guide_scale, model_scale = guide_sites[name]["scale"], site["scale"]
        if not bool(torch.all(torch.as_tensor(guide_scale) == torch.as_tensor(model_scale))):
            raise ModelGuideMismatchError(
                f"site {name!r} has scale {_describe(model_scale)} in the model but "
                f"{_describe(guide_scale)} in the guide (a subsampled plate of a different size, "
                "or poutine.scale on one side only), so the bound would be silently wrong. Use "
                "the same pyro.plate(size=..., subsample=...) in model and guide."
            )
        guide_value = guide_sites[name]["value"]
        expected = site["fn"].shape()
        if isinstance(guide_value, torch.Tensor) and _strip_ones(guide_value.shape) != _strip_ones(
            expected
        ):
            raise _shape_error(name, guide_value.shape, expected)


def _describe(scale):
    scale = torch.as_tensor(scale)
    return f"{scale.item():g}" if scale.numel() == 1 else f"a tensor of shape {tuple(scale.shape)}"


def _shape_error(name, guide_shape, model_shape, cause=None):
    because = f"; replaying the model failed with: {cause}" if cause is not None else ""
    return ModelGuideMismatchError(
        f"site {name!r}: the guide samples a value of shape {tuple(guide_shape)} but the model's "
        f"distribution has shape {tuple(model_shape)} (batch + event){because}. Make the guide's "
        "distribution match, using .to_event() for event dims and the same pyro.plate for batch "
        "dims."
    )


def explain_replay_failure(model, guide, args, kwargs, error: Exception):
    """Turn an exception raised while replaying the model into a site-naming error, if we can.

    Runs the guide once, unvectorized and hidden from SVI, and replays the model on it (as the
    objective does), recording the sites the model reached before it failed; a latent site whose
    guide value does not have the shape of the *replayed* model's distribution there is the one
    to blame.  Comparing like with like matters: a plate the guide subsamples is subsampled the
    same way in the replayed model, so it is not blamed.  Returns an exception to raise, or
    ``None`` if no mismatch was found (e.g. the model fails only under the particle plate).
    """
    import pyro.poutine as poutine

    from pyro_elbo.engine.traces import quietly

    try:
        with quietly(grad=True, fork=False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    except Exception:  # the guide fails on its own: let the original error speak
        return None
    replayed = replay_until_failure(model, guide_trace, args, kwargs)
    for name, site in replayed.items():
        if site["is_observed"] or name not in guide_trace.nodes:
            continue
        guide_value = guide_trace.nodes[name]["value"]
        try:
            expected = site["fn"].shape()
        except Exception:
            continue
        if isinstance(guide_value, torch.Tensor) and _strip_ones(guide_value.shape) != _strip_ones(
            expected
        ):
            return _shape_error(name, guide_value.shape, expected, cause=error)
    return None


def replay_until_failure(model, guide_trace, args, kwargs) -> dict:
    """``{name: site}``: the sample sites (subsample sites left out) that ``model``, replayed on
    ``guide_trace`` in a side run (blocked, with autograd, on the caller's random stream),
    reached before it failed, or all of them when it did not fail."""
    import pyro.poutine as poutine

    from pyro_elbo.engine.traces import quietly

    recorder = poutine.trace(poutine.replay(model, trace=guide_trace))
    try:
        with quietly(grad=True, fork=False):
            recorder(*args, **kwargs)
    except Exception:
        pass  # the sites before the failure are recorded
    return sample_sites(recorder.msngr.trace)


def require_reparameterized(particles, objective: str, alternative: str) -> None:
    """Raise, naming the first guide site without ``rsample``; ``alternative`` says what to do."""
    for name, site in particles.guide_sites.items():
        if not site.reparameterized:
            raise ValueError(
                f"{objective} needs reparameterized guide sites, but guide site {name!r} has no "
                f"rsample (a discrete or non-reparameterizable distribution). {alternative}"
            )
