"""The command line ``pyro-elbo vae`` and ``python -m pyro_elbo.examples.vae`` (:func:`main`)."""

from __future__ import annotations

import sys

import torch

from pyro_elbo.examples.vae.comparison import compare, format_pairs, format_table
from pyro_elbo.examples.vae.training import OBJECTIVES


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
