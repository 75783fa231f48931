"""The checks ``fit`` runs before step 1, for users of ``pyro.infer.SVI(..., loss=ELBO())``.

Every pyro_elbo objective calls :func:`check_first_call` once per (model, guide) pair, on its
first ``loss``/``loss_and_grads``/``differentiable_loss`` call (cached by the pair's identity,
so later steps pay one set lookup):

* when the particle engine **succeeded**, the checks of :func:`~pyro_elbo.fit.preflight.check_pair`
  (data types, supports, plates, pathwise estimators, NaN in the data, a model with nothing
  observed) run on the first particle's traces: no extra run of model or guide, and no random
  number is consumed, so a seeded SVI run draws what it drew before;
* when the engine **failed** (torch's raw constraint error for a guide off the prior's support,
  Pyro's "value argument to log_prob must be a Tensor" for numpy data...),
  :func:`~pyro_elbo.fit.preflight.check_model_guide` runs once on a fresh draw (blocked, with
  a forked random generator) to replace the error by the one ``fit`` gives, naming the site or
  argument; if it finds nothing, the original error propagates.

``fit`` runs :func:`~pyro_elbo.fit.preflight.check_model_guide` itself and marks the pair
(:func:`mark_checked`), so its checks and warnings come once.
"""

from __future__ import annotations

import os

import torch

__all__ = ["check_first_call", "explain_first_failure", "is_first_call", "mark_checked"]


def _checked(objective) -> set:
    # kept in the instance dict so that objectives need no change to __init__
    return objective.__dict__.setdefault("_pyro_elbo_checked_pairs", set())


def is_first_call(objective, model, guide) -> bool:
    """Whether ``objective`` has not yet checked this (model, guide) pair."""
    return (id(model), id(guide)) not in _checked(objective)


def mark_checked(objective, model, guide) -> None:
    """Record the pair as checked (``fit`` calls this after its own check before step 1)."""
    _checked(objective).add((id(model), id(guide)))


def check_first_call(objective, model, guide, args, kwargs, particles) -> None:
    """The checks on the first particle's traces of a successful engine run."""
    from pyro_elbo.fit.preflight import check_pair

    mark_checked(objective, model, guide)
    check_pair(
        particles.model_traces[0],
        particles.guide_traces[0],
        objective,
        args,
        kwargs,
        check_density=False,
        engine_checks=False,
    )


def explain_first_failure(objective, model, guide, args, kwargs, error) -> None:
    """Raise ``fit``'s error for the pair (from ``error``) if its check finds one; else return."""
    from pyro_elbo.engine.validation import ModelGuideMismatchError
    from pyro_elbo.fit.preflight import check_model_guide

    if _raised_by_pyro_elbo(error):
        return  # already an error of ours, naming the site
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            check_model_guide(model, guide, objective, args, kwargs, check_density=False)
    except (ModelGuideMismatchError, TypeError, ValueError, NotImplementedError) as better:
        if better is error or better.__cause__ is error:
            return
        raise better from error
    except Exception:  # the check hit the same failure: the original error says it best
        return


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raised_by_pyro_elbo(error) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in pyro_elbo's own code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)
