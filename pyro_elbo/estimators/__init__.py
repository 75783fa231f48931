"""Gradient estimators, one per module, each a pure function of engine particles.

:data:`ESTIMATORS` is the one table from the name a user passes (``ELBO(estimator=...)``,
``IWELBO(estimator=...)``) to the surrogate function and the engine options it needs; its keys per
objective are the names that objective allows.  ELBO surrogates take ``(particles, baseline)`` and
return shape ``(K,)``; IWELBO surrogates take ``(weights, objective)`` and return the unscaled
surrogate of the bound, with a ``one_particle`` variant for K = 1 (:mod:`.importance`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyro_elbo.estimators.importance import (
    dreg_surrogate,
    iw_stl_surrogate,
    iwae_one_particle,
    iwae_surrogate,
    path_one_particle,
)
from pyro_elbo.estimators.reparam import reparam_surrogate
from pyro_elbo.estimators.score import score_surrogate
from pyro_elbo.estimators.stl import stl_surrogate

__all__ = ["ESTIMATORS", "Estimator", "choose_estimator"]


@dataclass(frozen=True)
class Estimator:
    """A gradient estimator: its surrogate and what the engine must give it."""

    surrogate: Callable
    one_particle: Callable | None = None  # IWELBO at K = 1
    detach_params: bool = False  # needs log q with the guide's parameters held constant
    detach_samples: bool = False  # needs the samples cut from the graph


ESTIMATORS: dict[str, dict[str, Estimator]] = {
    "ELBO": {
        "reparam": Estimator(reparam_surrogate),
        "stl": Estimator(stl_surrogate, detach_params=True),
        "score": Estimator(score_surrogate, detach_samples=True),
    },
    "IWELBO": {
        "reparam": Estimator(iwae_surrogate, iwae_one_particle),
        "dreg": Estimator(dreg_surrogate, path_one_particle, detach_params=True),
        "stl": Estimator(iw_stl_surrogate, path_one_particle, detach_params=True),
    },
}


def choose_estimator(objective: str, estimator: str) -> Estimator:
    """The table entry for ``estimator`` under ``objective``; a clear error for any other name."""
    allowed = tuple(ESTIMATORS[objective])
    if estimator not in allowed:
        raise ValueError(f"estimator must be one of {allowed}, got {estimator!r}")
    return ESTIMATORS[objective][estimator]
