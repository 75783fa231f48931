"""A warning for a guide handed to a diagnostic before it was ever fitted.

``to_inference_data``, ``diagnose``/``evidence_bounds`` and ``posterior_of`` read q off the
guide's current parameters.  A guide that was never run has none yet: the call would create them
at their initial values and report on that initial q without a word.  Two signs tell it:

* an autoguide (``pyro.infer.autoguide.AutoGuide``) whose ``prototype_trace`` is still ``None``
  (it builds its parameters on its first call);
* any other guide (hand-written ``pyro.param`` guides, ``AutoMessenger`` guides) whose parameters
  are all absent from the param store before the call (:func:`param_names` before,
  :func:`warn_if_created` after the first trace).
"""

from __future__ import annotations

import warnings

import pyro

__all__ = ["UnfittedGuideWarning", "is_unrun_autoguide", "param_names", "warn_if_created",
           "warn_unfitted"]


class UnfittedGuideWarning(UserWarning):
    """The guide's parameters are at their initial values: it was never fitted."""


def _name(guide) -> str:
    return getattr(guide, "__name__", None) or type(guide).__name__


def is_unrun_autoguide(guide) -> bool:
    """An autoguide that has never been called (its parameters do not exist yet)."""
    from pyro.infer.autoguide import AutoGuide

    return isinstance(guide, AutoGuide) and getattr(guide, "prototype_trace", None) is None


def warn_unfitted(guide, where: str, stacklevel: int = 3) -> None:
    """The warning; ``stacklevel`` as for ``warnings.warn`` (counted from this function)."""
    warnings.warn(
        f"{where}: the guide {_name(guide)} has never been fitted (its parameters are created "
        "by this call, at their initial values), so this describes the initial guide, not a "
        "posterior approximation. Fit it first, e.g. pyro_elbo.fit(model, guide, data), or "
        "run SVI steps with it.",
        UnfittedGuideWarning,
        stacklevel=stacklevel,
    )


def param_names(guide, where: str, stacklevel: int = 3):
    """Call before the guide's first trace: warns for an autoguide never run, and returns the
    param store's names for :func:`warn_if_created` (``None`` for autoguides)."""
    from pyro.infer.autoguide import AutoGuide

    if isinstance(guide, AutoGuide):
        if is_unrun_autoguide(guide):
            warn_unfitted(guide, where, stacklevel)
        return None
    return set(pyro.get_param_store().keys())


def warn_if_created(guide, before, guide_trace, where: str, stacklevel: int = 3) -> None:
    """Warn when every parameter the guide read in ``guide_trace`` is new since ``before``."""
    if before is None:
        return
    params = [name for name, site in guide_trace.nodes.items() if site["type"] == "param"]
    if params and not any(name in before for name in params):
        warn_unfitted(guide, where, stacklevel)
