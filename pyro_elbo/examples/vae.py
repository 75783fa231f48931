"""A variational autoencoder on real data: scikit-learn's handwritten digits.

The data are the 1,797 8x8 images of ``sklearn.datasets.load_digits`` (shipped with scikit-learn,
no download), with pixel intensities 0..16 read as Bernoulli probabilities ``v / 16``: training
images are binarized afresh every epoch (dynamic binarization), the held-out test images once,
with a fixed seed.

Model and guide (Kingma & Welling 2014; MATH.md §1-§3)::

    z_i ~ N(0, I_d),        x_i | z_i ~ Bernoulli(logits = decoder(z_i))       (64 pixels)
    q(z_i | x_i) = N(mu(x_i), diag sigma(x_i)^2)                (AmortizedNormal, an MLP encoder)

Objectives compared (Burda, Grosse & Salakhutdinov 2016; Roeder et al. 2017; Tucker et al. 2019):

* ``vae``:    ELBO, one particle, with the closed-form Gaussian KL of MATH.md (2),
  ``KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 2 log sigma - 1)`` per dimension
  (:func:`gaussian_kl`; ``ELBO(analytic_kl=True)`` takes it from ``kl_divergence``);
* ``stl``:    ELBO, one particle, sticking-the-landing gradient;
* ``iwae5``, ``iwae50``: IWELBO with K = 5 and 50, pathwise (IWAE) gradient;
* ``dreg5``, ``dreg50``: IWELBO with K = 5 and 50, doubly reparameterized gradient.

The test-set log-likelihood is estimated per image by importance sampling with the trained
encoder as proposal, ``log p(x_i) ~= log (1/S) sum_s p(x_i, z_s) / q(z_s | x_i)``, S >= 1000
(Burda et al. use S = 5000), a stochastic lower bound.  Two standard errors are reported: the
Monte Carlo SE of the estimate (delta method, per image, combined) and the SE of the test-set mean
over images.  Differences between models are in paired SE units (the same test images).

Entry points: :func:`train_vae`, :func:`evaluate_log_likelihood`, :func:`compare`, :func:`plot`,
and the command line ``pyro-elbo vae`` (:func:`main`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_elbo.engine.particles import run_particles
from pyro_elbo.engine.weights import importance_weights
from pyro_elbo.guides.amortized import AmortizedNormal
from pyro_elbo.objectives.elbo import ELBO
from pyro_elbo.objectives.iwelbo import IWELBO

__all__ = [
    "OBJECTIVES",
    "PAIRS",
    "VAE",
    "Digits",
    "LogLikelihood",
    "TrainResult",
    "compare",
    "evaluate_log_likelihood",
    "gaussian_kl",
    "load_digits",
    "main",
    "plot",
    "train_vae",
]

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


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag scale^2) || N(0, I))`` summed over the last dim (MATH.md (2)):
    ``1/2 sum_d (mu_d^2 + sigma_d^2 - 2 log sigma_d - 1)``."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum(-1)


# ------------------------------------------------------------------------------- data


@dataclass
class Digits:
    """Train intensities in [0, 1] (binarized per epoch) and fixed binarized test images."""

    train: torch.Tensor  # (N_train, 64) probabilities v / 16
    test: torch.Tensor  # (N_test, 64) 0/1

    def binarized_train(self, generator: torch.Generator) -> torch.Tensor:
        return torch.bernoulli(self.train, generator=generator)


def load_digits(num_test: int = 300, num_train: int | None = None, seed: int = 0) -> Digits:
    """scikit-learn's digits, split at random (``seed``) into train and test images."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the VAE example needs scikit-learn for its data: pip install 'pyro_elbo[examples]'"
        ) from error
    images = torch.as_tensor(sklearn_digits().data, dtype=torch.get_default_dtype()) / 16.0
    total = images.shape[0]
    if not 0 < num_test < total:
        raise ValueError(f"num_test must be between 1 and {total - 1}, got {num_test}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    test, train = images[order[:num_test]], images[order[num_test:]]
    if num_train is not None:
        if not 0 < num_train <= train.shape[0]:
            raise ValueError(f"num_train must be between 1 and {train.shape[0]}, got {num_train}")
        train = train[:num_train]
    return Digits(train=train, test=torch.bernoulli(test, generator=generator))


# ------------------------------------------------------------------------------- model


def _mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Bernoulli decoder and Gaussian encoder, each an MLP with two tanh hidden layers.

    ``model(x, num_data=None)``: ``x`` is a (mini)batch of binary images; ``num_data`` the size of
    the whole training set (the plate scales the minibatch by ``num_data / len(x)``).
    ``guide``: an :class:`~pyro_elbo.guides.AmortizedNormal` over site ``"z"``.
    """

    def __init__(self, data_dim: int = 64, latent_dim: int = 8, hidden: int = 128):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.decoder = _mlp([latent_dim, hidden, hidden, data_dim])
        encoder = _mlp([data_dim, hidden, hidden, 2 * latent_dim])
        self.guide = AmortizedNormal(
            encoder, site="z", plate="data", data=0, size="num_data", name="vae_encoder"
        )

    @property
    def encoder(self) -> nn.Module:
        return self.guide.encoder

    def model(self, x, num_data=None):
        pyro.module("vae_decoder", self.decoder)
        num_data = x.shape[0] if num_data is None else num_data
        prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    @torch.no_grad()
    def reconstruct(self, x):
        """Pixel probabilities decoded from the encoder's mean."""
        loc, _ = self.guide.encode(x)
        return torch.sigmoid(self.decoder(loc))

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None):
        """Pixel probabilities of ``num`` images decoded from prior draws."""
        z = torch.randn(num, self.latent_dim, generator=generator)
        return torch.sigmoid(self.decoder(z))


# ------------------------------------------------------------------------------- training


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


# ------------------------------------------------------------------------------- evaluation


@dataclass
class LogLikelihood:
    """Importance-sampled test log-likelihood (nats per image)."""

    per_image: torch.Tensor  # (N,) estimates of log p(x_i)
    per_image_mc_se: torch.Tensor  # (N,) delta-method Monte Carlo SEs
    num_samples: int

    @property
    def mean(self) -> float:
        return float(self.per_image.mean())

    @property
    def se(self) -> float:
        """SE of the test-set mean over images (the test set as a sample of digits)."""
        return float(self.per_image.std() / math.sqrt(self.per_image.shape[0]))

    @property
    def mc_se(self) -> float:
        """Monte Carlo SE of the test-set mean for this fixed test set."""
        return float(self.per_image_mc_se.pow(2).sum().sqrt() / self.per_image.shape[0])

    def difference(self, other: LogLikelihood) -> tuple[float, float]:
        """``(mean(self - other), paired SE)`` over the same test images."""
        d = self.per_image - other.per_image
        return float(d.mean()), float(d.std() / math.sqrt(d.shape[0]))

    def __repr__(self):
        return (
            f"LogLikelihood({self.mean:.3f} ± {self.se:.3f} (images) ± {self.mc_se:.4f} (MC), "
            f"S={self.num_samples})"
        )


@torch.no_grad()
def evaluate_log_likelihood(
    vae: VAE, x: torch.Tensor, num_samples: int = 5000, chunk: int = 250, seed: int = 0
) -> LogLikelihood:
    """``log p(x_i)`` per image by importance sampling from the encoder, S = ``num_samples``.

    The log weights come from the particle engine in chunks of ``chunk`` particles (per image,
    from :func:`~pyro_elbo.engine.weights.importance_weights`) and are combined by one
    log-mean-exp per image.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    log_w = []
    try:
        # a param store scope of its own: evaluating never clashes with the caller's params
        with pyro.get_param_store().scope():
            for begin in range(0, num_samples, chunk):
                k = min(chunk, num_samples - begin)
                particles = run_particles(
                    vae.model, vae.guide, (x,), {}, num_particles=k, plate_nesting=1
                )
                log_w.append(importance_weights(particles, "evaluate_log_likelihood").log_w)
    finally:
        torch.set_rng_state(state)
    log_w = torch.cat(log_w, 0)  # (S, N)
    estimate = torch.logsumexp(log_w, 0) - math.log(num_samples)
    ratio = torch.exp(log_w - estimate)  # w / mean(w), mean 1 per image
    mc_se = ratio.std(0) / math.sqrt(num_samples)
    return LogLikelihood(estimate, mc_se, num_samples)


# ------------------------------------------------------------------------------- comparison


def compare(
    objectives=tuple(OBJECTIVES),
    *,
    fast: bool = False,
    num_samples: int = 5000,
    seed: int = 0,
    out: str | None = None,
    progress: bool = True,
    **train_kwargs,
):
    """Train one VAE per objective, evaluate each on the same test images, return the table.

    Returns ``(rows, results)``: ``rows`` a list of dicts (objective, test LL, SEs, seconds,
    difference to the first objective in paired SE units), ``results`` the
    :class:`TrainResult` and :class:`LogLikelihood` per objective.
    """
    results = {}
    for name in objectives:
        trained = train_vae(name, fast=fast, seed=seed, progress=progress, **train_kwargs)
        ll = evaluate_log_likelihood(trained.vae, trained.data.test, num_samples, seed=seed)
        results[name] = (trained, ll)
        if progress:
            print(
                f"{name}: {ll!r}, trained in {trained.seconds:.1f} s "
                f"({trained.cpu_seconds:.1f} s CPU)",
                flush=True,
            )
        if out is not None:
            plot(trained.vae, trained.data.test, out, filename=f"vae_{name}.png", title=name)
    reference = results[objectives[0]][1]
    rows = []
    for name, (trained, ll) in results.items():
        diff, diff_se = ll.difference(reference)
        rows.append(
            {
                "objective": name,
                "description": OBJECTIVES[name][0],
                "test_ll": ll.mean,
                "se_images": ll.se,
                "se_mc": ll.mc_se,
                "vs_first": diff,
                "vs_first_se": diff_se,
                "train_loss": trained.losses[-1],
                "seconds": trained.seconds,
                "cpu_seconds": trained.cpu_seconds,
            }
        )
    if out is not None:
        import os

        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "vae_table.md"), "w") as handle:
            handle.write(format_table(rows, objectives[0]) + "\n\n")
            handle.write(format_pairs(results) + "\n")
        torch.save(
            {name: {"per_image": ll.per_image, "per_image_mc_se": ll.per_image_mc_se,
                    "losses": trained.losses, "seconds": trained.seconds,
                    "cpu_seconds": trained.cpu_seconds,
                    "config": trained.config, "state_dict": trained.vae.state_dict()}
             for name, (trained, ll) in results.items()},
            os.path.join(out, "vae_results.pt"),
        )
    return rows, results


def format_table(rows, reference: str) -> str:
    lines = [
        f"| objective | test log-likelihood | SE (images) | SE (MC) | vs {reference} (paired SE) "
        "| final train loss | train seconds (wall / CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        z = r["vs_first"] / r["vs_first_se"] if r["vs_first_se"] > 0 else 0.0
        lines.append(
            f"| {r['description']} | {r['test_ll']:.3f} | {r['se_images']:.3f} | "
            f"{r['se_mc']:.4f} | {r['vs_first']:+.3f} ± {r['vs_first_se']:.3f} ({z:+.1f} SE) | "
            f"{r['train_loss']:.3f} | {r['seconds']:.0f} / {r['cpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_pairs(results) -> str:
    """The differences of :data:`PAIRS` present in ``results``, in paired SE units."""
    lines = ["| difference | nats per image | paired SE | SE units |", "|---|---|---|---|"]
    for a, b in PAIRS:
        if a in results and b in results:
            diff, se = results[a][1].difference(results[b][1])
            z = diff / se if se > 0 else 0.0
            lines.append(f"| {a} - {b} | {diff:+.3f} | {se:.3f} | {z:+.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- figure


def plot(vae: VAE, x: torch.Tensor, folder: str, *, filename: str = "vae_digits.png",
         num: int = 10, seed: int = 0, title: str | None = None) -> str:
    """Save a figure: ``num`` test images, their reconstructions, and ``num`` prior samples.

    Returns the path of the PNG written in ``folder`` (created if needed).
    """
    import os

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    num = min(num, x.shape[0])
    side = int(round(math.sqrt(x.shape[1])))
    rows = {
        "test image": x[:num],
        "reconstruction": vae.reconstruct(x[:num]),
        "prior sample": vae.sample(num, torch.Generator().manual_seed(seed)),
    }
    fig, axes = plt.subplots(3, num, figsize=(num * 0.9, 3 * 1.0))
    for r, (label, images) in enumerate(rows.items()):
        for c in range(num):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(side, side).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = os.path.join(folder, filename)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    """``pyro-elbo vae [--objective NAME ...] [--fast] [--epochs N] [--out DIR]``."""
    from pyro_elbo.cli import parser as make_parser

    parser = make_parser(
        "pyro-elbo vae",
        "Train VAEs on scikit-learn's digits with several objectives and compare their "
        "importance-sampled test log-likelihoods. Needs scikit-learn: "
        "pip install 'pyro_elbo[examples]'.",
    )
    parser.add_argument(
        "--objective", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES),
        help="objectives to train (default: all); the first is the reference of the table",
    )
    parser.add_argument("--fast", action="store_true", help="the small setting used by tests")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: that of the setting, --fast or full)")
    parser.add_argument("--latent-dim", type=int, default=None,
                        help="dimension of the latent z (default: that of the setting)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="width of the hidden layers (default: that of the setting)")
    parser.add_argument("--samples", type=int, default=5000,
                        help="importance samples per test image (>= 1000 recommended)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data split, training)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="folder for the table and figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples < 2:
        parser.error("--samples must be >= 2")
    torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in (("epochs", args.epochs), ("latent_dim", args.latent_dim),
                     ("hidden", args.hidden))
        if v is not None
    }
    rows, results = compare(
        tuple(args.objective), fast=args.fast, num_samples=args.samples, seed=args.seed,
        out=args.out, **overrides,
    )
    print(format_table(rows, args.objective[0]))
    print(format_pairs(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
