"""``pyro_elbo.fit``: a fit loop users can trust.

:func:`fit` runs stochastic VI with the recommended guide and objective where none is given
and a Laplace stage before step 1 (:mod:`.initial`), for ``guide=None`` an escalation from the
Gaussian to a flow guide decided by PSIS k-hat (:mod:`.escalate`), checks before step 1
(:mod:`.preflight`), automatic convergence (:mod:`.convergence`), a NaN/inf guard (:mod:`.nan`),
crash-safe checkpoints with exact resume (:mod:`.checkpoint`, :mod:`.saving`; the path checked
and locked, :mod:`.location`; the run's identity compared on resume, :mod:`.identity`; signals
handled between steps, :mod:`.interrupt`), a progress bar and callbacks, and returns a
:class:`FitResult`.  Under ``torchrun`` the same loop trains data-parallel
(:mod:`.data_parallel`).
"""

from pyro_elbo.fit.checkpoint import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointPathError,
    CheckpointWriteError,
    ResumeNotice,
)
from pyro_elbo.fit.convergence import (
    AutoConvergence,
    ConvergenceRule,
    RelativeTolerance,
    effective_sample_size,
    split_rhat,
)
from pyro_elbo.fit.escalate import Stage
from pyro_elbo.fit.identity import ZeroLearningRateWarning
from pyro_elbo.fit.initial import LaplaceStage
from pyro_elbo.fit.loop import FitResult, FitState, NonFiniteError, fit
from pyro_elbo.fit.preflight import PlateMismatchError, SupportMismatchError

__all__ = [
    "AutoConvergence",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointPathError",
    "CheckpointWriteError",
    "ConvergenceRule",
    "FitResult",
    "FitState",
    "LaplaceStage",
    "NonFiniteError",
    "PlateMismatchError",
    "RelativeTolerance",
    "Stage",
    "ResumeNotice",
    "SupportMismatchError",
    "ZeroLearningRateWarning",
    "effective_sample_size",
    "fit",
    "split_rhat",
]
