"""The checks ``fit`` runs before step 1, for users of ``pyro.infer.SVI(..., loss=ELBO())``.

Every pyro_elbo objective routes its first ``loss``/``loss_and_grads``/``differentiable_loss``
call on a (model, guide) pair through :func:`run_first_call` (the pair is remembered by
identity, so later steps pay one set lookup):

* when the call **fails** (torch's raw constraint error for a guide off the prior's support,
  Pyro's "value argument to log_prob must be a Tensor" for numpy data...),
  :func:`~pyro_elbo.fit.preflight.check_model_guide` runs on a fresh draw (blocked, with a
  forked random generator) and raises the error ``fit`` gives, naming the site or argument, from
  the original; if it finds nothing, or the original error is already one of pyro_elbo's, the
  original propagates;
* when it **succeeds**, the checks of :func:`~pyro_elbo.fit.preflight.check_pair` (data types,
  supports, plates, NaN in the data, a model that observes nothing) run once on one more draw
  of guide and model, blocked and with a forked random generator: after the call, so that an
  autoguide is built by the call itself and a seeded SVI run draws exactly what it drew before.
  The checks the engine and the objectives make themselves (structure, estimators) are left to
  them.

``fit`` runs :func:`~pyro_elbo.fit.preflight.check_model_guide` itself and marks the pair
(:func:`mark_checked`), so its checks and warnings come once.
"""

from __future__ import annotations

import os

from pyro_elbo.engine.traces import forked_rng, side_trace_pair

__all__ = ["CHECKED_PAIRS", "explain_first_failure", "mark_checked", "run_first_call"]

#: the instance attribute holding the checked pairs (kept in the instance dict, so that
#: objectives need no change to ``__init__``; ``ParticleObjective`` reads it by this name)
CHECKED_PAIRS = "_pyro_elbo_checked_pairs"


def mark_checked(objective, model, guide) -> None:
    """Record the pair as checked (``fit`` calls this after its own check before step 1)."""
    objective.__dict__.setdefault(CHECKED_PAIRS, set()).add((id(model), id(guide)))


def run_first_call(objective, model, guide, args, kwargs, compute):
    """``compute()`` (the objective's first call on the pair) with fit's checks around it."""
    try:
        result = compute()
    except Exception as error:
        explain_first_failure(objective, model, guide, args, kwargs, error)
        raise
    check_after_first_call(objective, model, guide, args, kwargs)
    mark_checked(objective, model, guide)
    return result


def check_after_first_call(objective, model, guide, args, kwargs) -> None:
    """:func:`~pyro_elbo.fit.preflight.check_pair` on one blocked draw of the pair."""
    from pyro_elbo.fit.preflight import check_pair

    try:
        model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs)
    except Exception:  # the objective's call succeeded: a draw that fails here is not ours
        return
    check_pair(model_trace, guide_trace, args, kwargs)


def explain_first_failure(objective, model, guide, args, kwargs, error) -> None:
    """Raise ``fit``'s error for the pair (from ``error``) if its check finds one; else return."""
    from pyro_elbo.engine.validation import ModelGuideMismatchError
    from pyro_elbo.fit.preflight import check_model_guide

    if _raised_by_pyro_elbo(error):
        return  # already an error of ours, naming the site
    try:
        with forked_rng():
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
