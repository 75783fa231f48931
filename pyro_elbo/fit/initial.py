"""The stage ``fit`` runs before step 1 to start at the right answer: defaults and Laplace.

``fit(model, None, ...)`` takes :func:`pyro_elbo.init.recommended_guide`, ``loss=None`` takes
:func:`pyro_elbo.init.recommended_objective`, and ``init="auto"`` runs
:func:`pyro_elbo.init.laplace_init` (L-BFGS to the posterior mode, the Hessian there) on the
autoguides it knows, then, when ``optim`` is not given, steps with
:class:`pyro_elbo.init.WhitenedAdam` (Adam in the whitened coordinates of the Laplace Gaussian).
See ``pyro_elbo/init/`` for the mathematics and the measurements behind each choice.

The stage never costs the user state: it draws no random numbers from the global generators
(so ``fit(seed=...)`` and resumes are reproducible), and when it fails or gives a non-finite
answer the guide's parameters are put back as they were and ``fit`` goes on from them with a
one-line warning (``init="laplace"`` raises instead).
"""

from __future__ import annotations

import math
import time
import warnings

import pyro
import torch

from pyro_elbo.engine.particles import GAUSSIAN_AUTOGUIDES
from pyro_elbo.engine.traces import forked_rng
from pyro_elbo.init.laplace import SUPPORTED_GUIDES as LAPLACE_GUIDES

__all__ = [
    "INIT_CHOICES",
    "LaplaceStage",
    "check_init",
    "default_optimizer",
    "run_laplace",
]

INIT_CHOICES = ("auto", "laplace", None)
#: the guides :class:`~pyro_elbo.init.WhitenedAdam` whitens
WHITENED_GUIDES = GAUSSIAN_AUTOGUIDES


class LaplaceStage:
    """What the stage did: ``ran`` (bool), ``result`` (a :class:`~pyro_elbo.init.LaplaceResult`
    or ``None``), ``message`` (what was done, or why not) and ``seconds``."""

    __slots__ = ("ran", "result", "message", "seconds")

    def __init__(self, ran=False, result=None, message="", seconds=0.0):
        self.ran, self.result, self.message, self.seconds = ran, result, message, seconds

    def __repr__(self):
        return f"LaplaceStage(ran={self.ran}, message={self.message!r}, seconds={self.seconds:.3g})"


def check_init(init):
    if init not in INIT_CHOICES:
        raise ValueError(
            f"fit: init must be 'auto' (Laplace where it applies), 'laplace' (Laplace or an "
            f"error) or None (start from the guide as it is), got {init!r}"
        )
    return init


def _refuse_or_skip(init, message):
    if init == "laplace":
        raise ValueError(f"fit(init='laplace'): {message}. Use init='auto' or init=None.")
    return LaplaceStage(False, None, message)


class _StoreSnapshot:
    """The param store's tensors and values, to put back exactly (the same tensor objects, so
    that optimizers and modules holding them see the restored values)."""

    def __init__(self, store):
        self.store = store
        self.entries = {
            name: (tensor, tensor.detach().clone(), store._constraints[name])
            for name, tensor in store._params.items()
        }

    def restore(self):
        store = self.store
        for name in [n for n in store._params if n not in self.entries]:
            del store[name]
        for name, (tensor, value, constraint) in self.entries.items():
            current = store._params.get(name)
            if current is not tensor:
                if current is not None:
                    store._param_to_name.pop(current, None)
                store._params[name] = tensor
                store._param_to_name[tensor] = name
                store._constraints[name] = constraint
            with torch.no_grad():
                tensor.copy_(value)


def _finite_params(store) -> bool:
    return all(bool(torch.isfinite(store[name].detach()).all()) for name in store.keys())


def run_laplace(init, model, guide, args, kwargs, *, batched: bool) -> LaplaceStage:
    """Run the Laplace stage on ``guide`` when ``init`` asks for it and it applies."""
    from pyro_elbo.init.laplace import LaplaceUnavailable, laplace_init

    if init is None:
        return LaplaceStage(False, None, "init=None: started from the guide as it is")
    if not isinstance(guide, LAPLACE_GUIDES):
        return _refuse_or_skip(
            init,
            f"{type(guide).__name__} is not an autoguide the Laplace stage can set "
            "(AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal, AutoLaplaceApproximation, AutoDelta)",
        )
    if batched:
        return _refuse_or_skip(
            init,
            "data= gives minibatches, and the mode of one minibatch is not the posterior mode",
        )
    store = pyro.get_param_store()
    saved = _StoreSnapshot(store)
    start = time.perf_counter()
    try:
        with forked_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = laplace_init(model, guide, *args, **kwargs)
    except LaplaceUnavailable as error:
        saved.restore()
        return _refuse_or_skip(init, str(error).rstrip("."))
    except Exception as error:  # noqa: BLE001 - the stage is an optimization, not a requirement
        saved.restore()
        if init == "laplace":
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"fit: the Laplace stage failed ({type(error).__name__}: {first}); starting from "
            "the guide's own initialization. Pass init=None to skip the stage.",
            stacklevel=4,
        )
        return LaplaceStage(False, None, f"failed: {type(error).__name__}: {first}")
    seconds = time.perf_counter() - start
    if not result.guide_initialized or not _finite_params(store) or not math.isfinite(
        result.log_joint
    ):
        saved.restore()
        message = result.message if not result.guide_initialized else "non-finite answer"
        if init == "laplace":
            raise ValueError(f"fit(init='laplace'): the Laplace stage could not set the guide: "
                             f"{message}")
        warnings.warn(
            f"fit: the Laplace stage gave no usable answer ({message}); starting from the "
            "guide's own initialization.",
            stacklevel=4,
        )
        return LaplaceStage(False, result, message, seconds)
    how = "mode" if result.selected == "mode" else f"path point {result.selected_step}"
    extra = "" if result.fallback is None else f"; Hessian repaired: {result.fallback}"
    message = (
        f"Laplace: {result.num_iterations} L-BFGS iterations, {how}"
        f"{'' if result.converged else ' (no mode found)'}; {result.message}{extra}"
    )
    return LaplaceStage(True, result, message, seconds)


def default_optimizer(stage: LaplaceStage, guide):
    """``WhitenedAdam`` after a Laplace stage on a Gaussian autoguide, else ``None`` (Adam)."""
    if not stage.ran or not isinstance(guide, WHITENED_GUIDES):
        return None
    from pyro_elbo.init.conditioning import whitened_optim

    return whitened_optim(guide)
