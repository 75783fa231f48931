"""Command line: ``pyro-elbo demo`` (also ``python -m pyro_elbo demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyro-elbo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fit every conjugate oracle and check it")
    demo.add_argument("--out", default=None, help="folder for the table (nothing written if absent)")
    demo.add_argument(
        "--steps", type=int, default=3000, help="the most steps a fit may take (it stops on convergence)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    commands.add_parser(
        "vae", help="train the digits VAE under ELBO/IWELBO/DReG/STL (see pyro-elbo vae --help)",
        add_help=False,
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vae"]:
        from pyro_elbo.examples.vae import main as vae_main

        return vae_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyro_elbo.demo import run_demo

        if args.steps < 1:
            parser.error("--steps must be >= 1")
        run_demo(out=args.out, steps=args.steps, progress=not args.no_progress, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
