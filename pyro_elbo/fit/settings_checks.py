"""The settings ``fit`` checks before it runs anything: step counts, the objective instance and
the optimizer, each refused with a message that says what to pass instead."""

from __future__ import annotations

import functools
import numbers

import pyro
import pyro.infer
import pyro.optim
import torch

__all__ = [
    "check_objective",
    "check_optim",
    "check_steps",
    "handles_enumeration",
    "pathwise_only",
]


def _whole(value, least: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``least``."""
    return (
        not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least
    )


def check_steps(num_steps, max_steps, checkpoint_every, skip_nonfinite) -> None:
    """Positive integers where required; ``skip_nonfinite`` a non-negative integer."""
    for name, value, optional in (
        ("num_steps", num_steps, True),
        ("max_steps", max_steps, False),
        ("checkpoint_every", checkpoint_every, True),
    ):
        if value is None and optional:
            continue
        if not _whole(value, 1):
            raise ValueError(
                f"fit: {name} must be a positive integer, got {value!r}"
                + (" (pass None to stop on convergence)" if name == "num_steps" else "")
            )
    if not _whole(skip_nonfinite, 0):
        raise ValueError(
            f"fit: skip_nonfinite must be a non-negative integer (how many non-finite steps to "
            f"skip before raising), got {skip_nonfinite!r}"
        )


def check_objective(loss):
    """The objective instance to use: ``None`` gives ``pyro_elbo.ELBO()``."""
    if loss is None:
        from pyro_elbo.objectives.elbo import ELBO

        return ELBO()
    if isinstance(loss, type):
        if issubclass(loss, pyro.infer.ELBO):
            raise TypeError(
                f"fit: loss={loss.__name__} is a class; pass an instance, e.g. "
                f"loss={loss.__name__}() or loss={loss.__name__}(num_particles=8)"
            )
        raise TypeError(f"fit: loss must be an objective instance, got the class {loss!r}")
    if not isinstance(loss, pyro.infer.ELBO) and not callable(
        getattr(loss, "loss_and_grads", None)
    ):
        raise TypeError(
            f"fit: loss must be a pyro_elbo objective (ELBO(), IWELBO(), ...) or a "
            f"pyro.infer.ELBO instance (Trace_ELBO(), TraceEnum_ELBO(), ...), got {loss!r}"
        )
    num_particles = getattr(loss, "num_particles", 1)
    if not _whole(num_particles, 1):
        raise ValueError(
            f"fit: the objective {type(loss).__name__} has num_particles={num_particles!r}; "
            "it must be an integer >= 1"
        )
    nesting = getattr(loss, "max_plate_nesting", float("inf"))
    if nesting != float("inf") and not _whole(nesting, 0):
        raise ValueError(
            f"fit: the objective {type(loss).__name__} has max_plate_nesting={nesting!r}; it "
            "must be a non-negative integer (or left out to be guessed)"
        )
    return loss


def check_optim(optim):
    """``None`` (Adam), a ``pyro.optim.PyroOptim``, a torch optimizer class, a
    ``functools.partial`` of one, or a constructed ``torch.optim.Optimizer``."""
    if optim is None or isinstance(optim, (pyro.optim.PyroOptim, torch.optim.Optimizer)):
        return optim
    if isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer):
        return optim
    if (
        isinstance(optim, functools.partial)
        and isinstance(optim.func, type)
        and issubclass(optim.func, torch.optim.Optimizer)
    ):
        return optim
    if (isinstance(optim, type) and issubclass(optim, pyro.optim.PyroOptim)) or (
        callable(optim) and getattr(optim, "__module__", "").startswith("pyro.optim")
    ):
        name = getattr(optim, "__name__", "Adam")
        raise TypeError(
            f"fit: optim=pyro.optim.{name} is the optimizer's constructor; pass an instance, "
            f"e.g. optim=pyro.optim.{name}({{'lr': 0.01}})"
        )
    raise TypeError(
        f"fit: optim must be a Pyro or torch optimizer, got {optim!r} "
        f"({type(optim).__name__}). Pass pyro.optim.Adam({{'lr': 0.01}}), a torch optimizer "
        "class (torch.optim.Adam), functools.partial(torch.optim.Adam, lr=0.01), or leave it "
        "out for Adam with lr=0.01."
    )


def handles_enumeration(objective) -> bool:
    """Whether the objective sums out enumerated discrete sites (Pyro's TraceEnum/TMC ELBOs)."""
    return isinstance(objective, (pyro.infer.TraceEnum_ELBO, pyro.infer.TraceTMC_ELBO))


def pathwise_only(objective) -> str | None:
    """A description of the objective if its gradient needs every guide site reparameterized."""
    from pyro_elbo.objectives.cubo import CUBO
    from pyro_elbo.objectives.iwelbo import IWELBO

    estimator = getattr(objective, "estimator", None)
    # ELBO's STL gives such sites their score-function terms, as Trace_ELBO does
    if isinstance(objective, IWELBO) and estimator in ("stl", "dreg"):
        return f"{type(objective).__name__}(estimator={estimator!r})"
    if isinstance(objective, CUBO):
        return "CUBO"
    return None
