"""Training every objective and comparing their test log-likelihoods in paired SE units."""

from __future__ import annotations

import torch

from pyro_elbo.examples.vae.evaluation import evaluate_log_likelihood
from pyro_elbo.examples.vae.figure import plot
from pyro_elbo.examples.vae.training import OBJECTIVES, PAIRS, train_vae


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
