"""Training a VAE with one objective (:func:`train_vae`); the objectives compared and the
settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyro
import torch

from pyro_elbo.examples.vae.data import Digits, load_digits
from pyro_elbo.examples.vae.model import VAE
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.iwelbo import IWELBO

#: objective name -> (description, factory)
OBJECTIVES = {
    "vae": ("ELBO, analytic KL (K=1)", lambda: ELBO(1, analytic_kl=True)),
    "stl": ("ELBO, STL (K=1)", lambda: ELBO(1, estimator="stl")),
    "iwae5": ("IWELBO K=5, reparam (IWAE)", lambda: IWELBO(5)),
    "iwae50": ("IWELBO K=50, reparam (IWAE)", lambda: IWELBO(50)),
    "dreg5": ("IWELBO K=5, DReG", lambda: IWELBO(5, estimator="dreg")),
    "dreg50": ("IWELBO K=50, DReG", lambda: IWELBO(50, estimator="dreg")),
}

#: the differences the comparison reports (A - B, in paired SE units): the IWAE ordering of
#: Burda et al. (K=50 > K=5 > VAE) and DReG against IWAE's pathwise gradient (Tucker et al.)
PAIRS = (
    ("iwae5", "vae"),
    ("iwae50", "iwae5"),
    ("iwae50", "vae"),
    ("stl", "vae"),
    ("dreg5", "iwae5"),
    ("dreg50", "iwae50"),
)

#: the full-size demo and the fast setting used by the tests
FULL = {"latent_dim": 8, "hidden": 128, "epochs": 300, "num_test": 300, "num_train": None}
FAST = {"latent_dim": 4, "hidden": 32, "epochs": 40, "num_test": 100, "num_train": 300}


@dataclass
class TrainResult:
    """A trained VAE and its training record."""

    objective: str
    vae: VAE
    data: Digits
    losses: list = field(default_factory=list)  # mean loss per data point, per epoch
    seconds: float = 0.0  # wall-clock training time
    cpu_seconds: float = 0.0  # CPU time of this process while training (robust to a busy machine)
    config: dict = field(default_factory=dict)

    def __repr__(self):
        return (
            f"TrainResult({self.objective!r}, epochs={len(self.losses)}, final loss "
            f"{self.losses[-1]:.3f} nats/image, {self.seconds:.1f} s)"
        )


def train_vae(
    objective: str = "vae",
    *,
    epochs: int | None = None,
    latent_dim: int | None = None,
    hidden: int | None = None,
    batch_size: int = 100,
    lr: float = 3e-3,
    seed: int = 0,
    fast: bool = False,
    data: Digits | None = None,
    progress: bool = False,
    callback=None,
) -> TrainResult:
    """Train a VAE on the digits with one of :data:`OBJECTIVES` (SVI, Adam).

    ``fast=True`` uses the small setting of :data:`FAST` (a 300-image training set, a small
    network, 40 epochs) for tests; otherwise :data:`FULL`.  Explicit arguments override either.
    Training runs in a param store scope of its own (``ParamStoreDict.scope``), so the caller's
    param store is left as it was; the trained weights live in ``result.vae``.
    ``callback(epoch, vae, loss)`` is called after every epoch (epoch counted from 1).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    setting = FAST if fast else FULL
    epochs = setting["epochs"] if epochs is None else epochs
    latent_dim = setting["latent_dim"] if latent_dim is None else latent_dim
    hidden = setting["hidden"] if hidden is None else hidden
    for name, value in (("epochs", epochs), ("latent_dim", latent_dim), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if data is None:
        data = load_digits(setting["num_test"], setting["num_train"], seed=0)
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = VAE(data.train.shape[1], latent_dim, hidden)
    loss_fn = OBJECTIVES[objective][1]()
    num_data = data.train.shape[0]
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    # a param store of its own: the networks' names cannot clash with the caller's params
    with pyro.get_param_store().scope():
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=loss_fn)
        for epoch in range(epochs):
            x = data.binarized_train(generator)
            order = torch.randperm(num_data, generator=generator)
            total = 0.0
            for begin in range(0, num_data, batch_size):
                batch = x[order[begin : begin + batch_size]]
                total += svi.step(batch, num_data=num_data) * batch.shape[0] / num_data
            losses.append(total / num_data)
            if callback is not None:
                callback(epoch + 1, vae, losses[-1])
            if progress and (epoch + 1) % max(1, epochs // 10) == 0:
                print(f"  {objective} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.3f}", flush=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    config = {"epochs": epochs, "latent_dim": latent_dim, "hidden": hidden,
              "batch_size": batch_size, "lr": lr, "seed": seed, "num_train": num_data}
    return TrainResult(objective, vae, data, losses, seconds, cpu_seconds, config)
