"""Tracing a (model, guide) pair as Pyro's ``Trace_ELBO`` does.

A guide is traced and the model replayed on it; an effect-based guide (Pyro's ``AutoMessenger``
guides, any ``GuideMessenger``) runs once and splits its trace.  A replay failure caused by a
guide whose site shapes differ from the model's becomes an error that names the site.

This module is the one trace service of the package.  Every side computation that traces the pair
outside the objective (preflight checks, the NaN diagnosis, the compiled path's structure check,
the convergence rule, Laplace) uses :func:`quietly` / :func:`side_trace_pair`: Pyro's handlers are
blocked (no enclosing handler or progress state sees the side run), torch's random stream is forked
(the user's seeded run draws the same numbers with or without the side run), autograd is off
unless asked for, and Pyro's validation can be set for the run.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.util import site_is_subsample

from pyro_elbo.engine.validation import explain_replay_failure

__all__ = [
    "forked_rng",
    "is_messenger",
    "messenger_guide_trace",
    "quietly",
    "side_trace_pair",
    "trace_pair",
]


def forked_rng():
    """A context in which torch's random stream (CPU, and the current CUDA device once CUDA is
    initialized) is forked: draws made inside leave the caller's stream where it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def quietly(*, grad: bool = False, validate: bool | None = None, fork: bool = True):
    """The context of a side run: Pyro's handlers blocked, torch's random stream forked (unless
    ``fork=False``), no autograd graph unless ``grad=True``, and Pyro's validation set to
    ``validate`` when it is not None."""
    with contextlib.ExitStack() as stack:
        if fork:
            stack.enter_context(forked_rng())
        stack.enter_context(poutine.block())
        if not grad:
            stack.enter_context(torch.no_grad())
        if validate is not None:
            stack.enter_context(pyro.validation_enabled(validate))
        yield


def side_trace_pair(model, guide, args, kwargs, *, grad=False, validate=None, fork=True, user=None):
    """``(model_trace, guide_trace)`` of one side run of the pair (see :func:`quietly`), made as
    :func:`trace_pair` makes them."""
    with quietly(grad=grad, validate=validate, fork=fork):
        return trace_pair(model, guide, args, kwargs, user=user)


def is_messenger(guide) -> bool:
    """Whether ``guide`` (possibly wrapped in handlers) is an effect-based guide."""
    return isinstance(poutine.unwrap(guide), GuideMessenger)


def trace_pair(model, guide, args, kwargs, user=None):
    """``(model_trace, guide_trace)``, unpruned, as Pyro's ``Trace_ELBO`` makes them: the guide
    traced, then the model replayed on it; or, for an effect-based guide (Pyro's
    ``AutoMessenger`` guides, any ``GuideMessenger``), the one run that interleaves both, split by
    the guide's ``get_traces`` (the guide trace without the model's observed sites).

    ``model`` and ``guide`` may be wrapped in handlers (the particle plate, ``beta``); ``user``
    is the pair as the user passed it (for the messenger check and the error explanations).
    A model that fails on the guide's draws because the shapes differ raises an error naming
    the site.
    """
    user = (model, guide) if user is None else user
    messenger = poutine.unwrap(user[1])
    if isinstance(messenger, GuideMessenger):
        guide(*args, **kwargs)
        pruned_model_trace, _ = messenger.get_traces()
        model_trace = poutine.Trace()  # with the plates' subsample sites, as a replayed model's
        for name, site in messenger.trace.nodes.items():
            if site_is_subsample(site):
                model_trace.add_node(name, **site)
            elif name in pruned_model_trace.nodes:
                model_trace.add_node(name, **pruned_model_trace.nodes[name])
        return model_trace, messenger_guide_trace(messenger)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return _replay_model(model, guide_trace, user, args, kwargs), guide_trace


def messenger_guide_trace(messenger):
    """The guide's part of an effect-based guide's trace: its sample sites that are not the
    model's observed ones, subsample sites kept (a replay must reuse their indices)."""
    trace = messenger.trace.copy()
    for name, site in list(trace.nodes.items()):
        if site["type"] != "sample" or (site["is_observed"] and not site_is_subsample(site)):
            trace.remove_node(name)
    return trace


def _replay_model(model, guide_trace, user, args, kwargs):
    """Trace ``model`` replayed on ``guide_trace``; a failure caused by a guide whose site shapes
    differ from the model's becomes an error that names the site."""
    try:
        return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception as error:
        explained = explain_replay_failure(*user, args, kwargs, error)
        if explained is not None:
            raise explained from error
        raise
