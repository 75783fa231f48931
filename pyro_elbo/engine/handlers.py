"""Small Pyro effect handlers used by the particle engine.

* :class:`DetachSamples` cuts the guide's samples from the graph (score-function estimators).
* :class:`BetaScale` multiplies the scale of every latent site by ``beta`` (the beta-ELBO).
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

__all__ = ["BetaScale", "DetachSamples"]


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
