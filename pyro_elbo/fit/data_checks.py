"""The data checks of ``fit``'s check before step 1 (:mod:`pyro_elbo.fit.preflight`).

* an observed value that is not a tensor (a numpy array, a list of numbers), or numpy/list
  arguments that make model or guide fail: a ``TypeError`` naming the model's argument
  (position or keyword) and the site, and saying how to convert it;
* a model that observes nothing (no ``obs=``, no ``pyro.factor``): one warning, since the
  objective then has no data and every latent is fitted to its prior (a forgotten ``obs=``).
"""

from __future__ import annotations

import numbers
import warnings

import torch

__all__ = ["NoObservationsWarning", "check_data", "raise_for_data", "warn_if_nothing_observed"]


class NoObservationsWarning(UserWarning):
    """The model observes nothing (no ``obs=``, no ``pyro.factor``): its latents are fitted to
    their prior.  Silence it with ``warnings.filterwarnings("ignore",
    category=NoObservationsWarning)`` when that is meant (sampling a prior)."""


def _argument_name(value, args, kwargs):
    """How the user passed ``value``: ``"data=..."``/``"argument 1"``, or ``None``."""
    for index, arg in enumerate(args):
        if arg is value:
            return f"the model's argument {index + 1} (positional)"
    for key, arg in kwargs.items():
        if arg is value:
            return f"the model's argument {key}="
    return None


def _non_tensor_data(args, kwargs):
    """``(description, value)`` of the first numpy array or list of numbers among the
    arguments, or ``None``."""
    import numpy as np

    for index, arg in enumerate(args):
        if _is_array_like(arg, np):
            return f"argument {index + 1} (positional)", arg
    for key, arg in kwargs.items():
        if _is_array_like(arg, np):
            return f"argument {key}=", arg
    return None


def _is_array_like(value, np):
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biufc"
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in value)
    return False


def _data_error(where, value, site=None):
    kind = f"a numpy array (dtype {value.dtype})" if hasattr(value, "dtype") else (
        f"a Python {type(value).__name__} of numbers"
    )
    used = f", used as the observed value of site {site!r}" if site is not None else ""
    return TypeError(
        f"the model's {where} is {kind}{used}; Pyro's distributions need torch tensors. "
        "Convert the data first, e.g. data = torch.as_tensor(data, "
        "dtype=torch.get_default_dtype())."
    )


def check_data(model_sites, args, kwargs):
    """An observed value that is not a tensor (numpy array, list): an error naming the argument."""
    for name, site in model_sites.items():
        if not site["is_observed"] or isinstance(site["value"], torch.Tensor):
            continue
        value = site["value"]
        if isinstance(value, numbers.Number):
            continue  # a Python scalar: Pyro accepts it
        where = _argument_name(value, args, kwargs) or "data"
        raise _data_error(where.removeprefix("the model's "), value, site=name)


def raise_for_data(error, args, kwargs):
    """A failure with numpy or list data among the arguments: raise the data error instead."""
    found = _non_tensor_data(args, kwargs)
    if found is not None:
        raise _data_error(*found) from error


def warn_if_nothing_observed(model_sites):
    """One warning when the model conditions on nothing: no obs=, no pyro.factor."""
    if any(site["is_observed"] and not site["infer"].get("_deterministic")
           for site in model_sites.values()):
        return
    latent = [n for n, s in model_sites.items() if not s["is_observed"]]
    if not latent:
        return  # nothing is fitted to anything
    warnings.warn(
        f"the model has no observed site (no pyro.sample(..., obs=...) and no pyro.factor), so "
        f"there is no data in the objective: the latent sites {latent[:6]} are fitted to their "
        "prior. Pass the data with obs= (pyro.sample('x', dist, obs=data)).",
        NoObservationsWarning,
        stacklevel=_outside_libraries(),
    )


def _outside_libraries() -> int:
    """The ``stacklevel`` of the first caller outside pyro_elbo and Pyro (the user's line)."""
    import os
    import sys

    import pyro

    roots = tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for module in (sys.modules["pyro_elbo"], pyro)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    return level
