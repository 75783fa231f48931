"""``fit``'s NaN/inf guard: the error it raises (:class:`NonFiniteError`) and the diagnosis that
names the site.

A step whose loss or gradient is non-finite is re-run from the random state it started from, as a
side run of the trace service (:mod:`pyro_elbo.engine.traces`: handlers blocked, random stream
forked), with Pyro's validation on and then off; the first sample site whose value, log-density or
log-density gradient is non-finite is named, and the error says what to do (observed data with
NaN/inf are named as such: the learning rate is then not the cause).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyro
import torch

from pyro_elbo.engine.traces import forked_rng, quietly, trace_pair

__all__ = ["DATA_NONFINITE", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/inf.  Attributes: ``step`` (1-based; 0 = before step 1),
    ``sites`` (``(role, site, what)`` triples found by re-running the step's traces), ``params``
    (parameters with a non-finite gradient), ``losses`` (the losses so far)."""

    def __init__(self, message, *, step, sites=(), params=(), losses=()):
        super().__init__(message)
        self.step = step
        self.sites = list(sites)
        self.params = list(params)
        self.losses = np.asarray(losses, dtype=np.float64)


def _objective_traces(objective, model, guide, args, kwargs):
    """(model_trace, guide_trace) pairs as the objective draws them, with log-densities."""
    from pyro_elbo.objectives.base import ParticleObjective

    if isinstance(objective, ParticleObjective):
        particles = objective.run_particles(
            model, guide, args, kwargs, **objective._engine_options(True)
        )
        return list(zip(particles.model_traces, particles.guide_traces))
    if hasattr(objective, "_get_traces"):
        return list(objective._get_traces(model, guide, args, kwargs))
    return [trace_pair(model, guide, args, kwargs)]


def _site_log_prob(site):
    log_prob = site.get("log_prob")
    if log_prob is None:
        try:
            log_prob = site["fn"].log_prob(site["value"])
        except Exception:
            return None
    return log_prob if isinstance(log_prob, torch.Tensor) else None


def _find_nonfinite(objective, model, guide, args, kwargs, rng_state, leaves):
    """Re-run the step's traces from ``rng_state``; return ``(sites, note)``: the sites whose
    sample, log-density or log-density gradient is non-finite, as ``(role, name, what)``."""
    note = ""
    with forked_rng():  # one fork around every re-run (each restarts from rng_state)
        traces = None
        for validate in (True, False):
            torch.set_rng_state(rng_state)
            try:
                with quietly(grad=True, fork=False,
                             validate=validate and pyro.infer.util.is_validation_enabled()):
                    traces = _objective_traces(objective, model, guide, args, kwargs)
                break
            except Exception as error:  # e.g. a distribution refusing a NaN parameter
                note = f"{type(error).__name__}: {error}".splitlines()[0]
        if traces is None:
            return [], note
        found = []
        for model_trace, guide_trace in traces:
            for role, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or name in {f[1] for f in found}:
                        continue
                    value = site["value"]
                    if site["is_observed"] and _has_nonfinite(value):
                        found.append((role, name, DATA_NONFINITE))
                        continue
                    if (
                        not site["is_observed"]
                        and isinstance(value, torch.Tensor)
                        and value.is_floating_point()
                        and not bool(torch.isfinite(value).all())
                    ):
                        found.append((role, name, "sample value is non-finite"))
                        continue
                    log_prob = _site_log_prob(site)
                    if log_prob is not None and not bool(torch.isfinite(log_prob).all()):
                        found.append((role, name, f"log-density is {_kind(log_prob)}"))
        if found:
            return found, note
        # every log-density is finite: look for one whose gradient is not
        live = [leaf for leaf in leaves if leaf.requires_grad]
        for model_trace, guide_trace in traces:
            for role, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample":
                        continue
                    log_prob = _site_log_prob(site)
                    if log_prob is None or not log_prob.requires_grad:
                        continue
                    grads = torch.autograd.grad(
                        log_prob.sum(), live, retain_graph=True, allow_unused=True
                    )
                    if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
                        found.append((role, name, "log-density has a non-finite gradient"))
    return found, note


#: what :func:`_find_nonfinite` says of an observed site whose data hold NaN/inf
DATA_NONFINITE = "the observed data hold NaN/inf"


def _has_nonfinite(value) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _kind(tensor):
    if bool(torch.isnan(tensor).any()):
        return "NaN"
    return "-inf" if bool((tensor == float("-inf")).any()) else "+inf"


def _nonfinite_grads(names, leaves):
    return [
        name
        for name, leaf in zip(names, leaves)
        if leaf.grad is not None and not bool(torch.isfinite(leaf.grad).all())
    ]


def _nonfinite_error(step, loss, sites, note, bad_params, losses, skipped, cause=None):
    where = "before step 1" if step == 0 else f"at step {step}"
    if cause is not None:
        first = str(cause).splitlines()[0].rstrip(":")
        what = f"a distribution refused a non-finite value ({type(cause).__name__}: {first})"
        note = ""
    elif not math.isfinite(loss):
        what = f"the loss is {loss}"
    else:
        what = f"the loss is finite but the gradient of {', '.join(bad_params[:4]) or 'a parameter'} is not"
    lines = [f"fit: non-finite values {where}: {what}."]
    if sites:
        listed = "; ".join(f"{role} site {name!r}: {text}" for role, name, text in sites[:6])
        lines.append(f"Re-running the step's traces with the same random numbers: {listed}.")
    else:
        lines.append(
            "Re-running the step's traces with the same random numbers found no site with a "
            "non-finite sample or log-density: the problem is in the objective's arithmetic "
            "(e.g. all importance weights -inf) or in randomness outside torch's generator."
        )
    if note:
        lines.append(f"(The re-run raised {note}.)")
    if bad_params and not math.isfinite(loss):
        lines.append(f"Parameters with a non-finite gradient: {', '.join(bad_params[:6])}.")
    if step > 0:
        lines.append(
            f"The parameters and optimizer state are left as they were after step {step - 1}, "
            "the last finite step."
        )
    if skipped:
        lines.append(f"Steps already skipped: {len(skipped)} ({list(skipped[:8])}).")
    data_sites = [name for _, name, text in sites if text == DATA_NONFINITE]
    if data_sites:
        lines.append(
            f"What to do: the data observed at {', '.join(map(repr, data_sites[:4]))} in this "
            "step's batch hold NaN/inf; the learning rate is not the cause. Remove or impute "
            "those rows (e.g. x[torch.isfinite(x)]), or mask them with poutine.mask / "
            "obs_mask."
        )
    else:
        lines.append(
            "What to try: a smaller learning rate; check the model for operations that fail "
            "for some latent values (log or sqrt of a value that can be negative, a scale that "
            "can reach 0, exp overflow) and constrain those latents' support; a guide "
            "initialized closer to the data (init_scale, init_loc_fn); or "
            "fit(..., skip_nonfinite=N) to skip up to N such steps."
        )
    return NonFiniteError(
        "\n".join(lines), step=step, sites=sites, params=bad_params, losses=losses
    )


def _grads_finite(leaves) -> bool:
    """Whether every gradient entry is finite: one reduction and one host sync per step (a sum
    is non-finite iff an entry is, short of overflow).  Small parameter sets are concatenated
    (fewest dispatches); large ones are reduced per tensor (no copy)."""
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    if not grads:
        return True
    if sum(g.numel() for g in grads) <= 65536:
        total = torch.cat([g.reshape(-1) for g in grads]).sum()
    else:
        total = torch.stack(torch._foreach_norm(grads)).sum()
    return math.isfinite(total.item())


def _note(error, text):
    if hasattr(error, "add_note"):
        error.add_note(f"({text})")


def _annotate(error, step):
    """Add the step to an error raised inside a step."""
    if hasattr(error, "add_note"):
        error.add_note(
            f"(raised by pyro_elbo.fit at step {step}; the parameters are left as they were "
            f"after step {step - 1})"
        )


def _refused_nonfinite(error, objective, model, guide, args, kwargs, rng_state, leaves):
    """A distribution that refused a non-finite parameter or value (Pyro's validation) is a
    non-finite step: return ``(error, sites, note)`` naming the sites, or ``None``."""
    if not isinstance(error, ValueError) or "invalid values" not in str(error):
        return None
    try:
        sites, note = _find_nonfinite(objective, model, guide, args, kwargs, rng_state, leaves)
    except Exception:
        sites, note = [], ""
    if sites or re.search(r"\b(nan|inf)\b", str(error)):
        return error, sites, note
    return None  # a finite value outside a support: not a NaN problem
