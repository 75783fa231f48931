"""Small Pyro effect handlers used by the particle engine.

* :class:`DetachParams` returns every ``pyro.param`` value detached, so a guide replayed under it
  evaluates log q with its parameters held constant while the replayed samples keep their graph
  (the path-derivative recipe of Roeder et al. 2017).
* :func:`detached_parameters` does the same for plain ``nn.Parameter`` attributes of an
  ``nn.Module`` guide (``AutoMultivariateNormal.loc``, encoder weights), which Pyro reads without
  honouring the value a handler puts in the ``param`` message.
* :class:`DetachSamples` cuts the guide's samples from the graph (score-function estimators).
* :class:`BetaScale` multiplies the scale of every latent site by ``beta`` (the beta-ELBO).
"""

from __future__ import annotations

import contextlib

import torch
from pyro.poutine.messenger import Messenger

__all__ = ["BetaScale", "DetachParams", "DetachSamples", "detached_parameters"]


class DetachParams(Messenger):
    """Return the value of every ``pyro.param`` statement detached from the autograd graph."""

    def _pyro_post_param(self, msg):
        value = msg["value"]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            msg["value"] = value.detach()


class DetachSamples(Messenger):
    """Cut every sampled (not observed) value from the autograd graph: a score-function guide."""

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if not msg["is_observed"] and isinstance(value, torch.Tensor) and value.requires_grad:
            msg["value"] = value.detach()


class BetaScale(Messenger):
    """Multiply the log-density scale of every latent (not observed) sample site by ``beta``."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


@contextlib.contextmanager
def detached_parameters(module):
    """Temporarily swap the plain ``nn.Parameter`` attributes of ``module`` for detached copies.

    Parameters that back a ``PyroParam`` (named ``*_unconstrained``) are left alone: they are read
    through ``pyro.param`` and :class:`DetachParams` detaches them.  Nothing is swapped when
    ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, torch.nn.Module):
        yield
        return
    swapped = []
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is None or name.endswith("_unconstrained") or not param.requires_grad:
                continue
            swapped.append((submodule, name, param))
    try:
        for submodule, name, param in swapped:
            # Bypass nn.Module.__setattr__ (and PyroModule's) so the registered Parameter is
            # replaced in place by a plain tensor for the duration of the replay.
            submodule._parameters[name] = param.detach()
        yield
    finally:
        for submodule, name, param in swapped:
            submodule._parameters[name] = param
