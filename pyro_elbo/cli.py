"""Command line: ``pyro-elbo demo`` (also ``python -m pyro_elbo demo``) and ``pyro-elbo vae``.

:func:`parser` builds the argument parser of a command with plain-text help (docstrings are
reStructuredText; :func:`plain` strips the markup) and :func:`run_main` turns a missing optional
dependency into one line that names the extra to install.
"""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["main", "parser", "plain", "run_main"]

#: optional dependency (top-level module) -> the extra of pyro_elbo that installs it
EXTRAS = {
    "sklearn": ("scikit-learn", "examples"),
    "scipy": ("scipy", "dev"),
    "jax": ("jax", "bench"),
    "numpyro": ("numpyro", "bench"),
}

_ROLE = re.compile(r":\w+:`(~?)([^`]+)`")


def plain(text: str | None) -> str:
    """reStructuredText to plain text for ``--help``: ``:func:`x``` -> ``x``, ````x```` -> ``x``,
    ``**x**`` -> ``x``, ``::`` at the end of a line -> ``:``."""
    if not text:
        return ""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = text.replace("``", "").replace("**", "")
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*::$\n?", "", text, flags=re.MULTILINE)
    return text.strip()


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Description as written; each option's default shown unless it is None or False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` named as the command is run (``prog``), whose description is
    ``doc`` in plain text with its line breaks kept, and whose help shows each default."""

    return argparse.ArgumentParser(
        prog=prog, description=plain(doc), formatter_class=_Formatter, **kwargs
    )


def run_main(main, argv=None) -> int:
    """``main(argv)``, with a missing optional dependency reported in one line (exit code 1)."""
    try:
        return main(argv) or 0
    except ImportError as error:
        cause = error.__cause__ if isinstance(error.__cause__, ImportError) else error
        module = (getattr(cause, "name", None) or getattr(error, "name", None) or "").split(".")[0]
        if module not in EXTRAS:
            raise
        package, extra = EXTRAS[module]
        print(
            f"error: this command needs {package}, which is not installed; install the "
            f"'{extra}' extra: pip install 'pyro_elbo[{extra}]'",
            file=sys.stderr,
        )
        return 1


def _build():
    from pyro_elbo import __version__

    top = parser(
        "pyro-elbo",
        "Variational-inference objectives for Pyro, checked against exact answers.\n\n"
        "Commands:\n"
        "  demo  fit every conjugate oracle and check each fit against its exact answer\n"
        "  vae   train the digits VAE under several objectives (needs the 'examples' extra)",
    )
    top.add_argument("--version", action="version", version=f"pyro-elbo {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="{demo,vae}")
    from pyro_elbo import demo as demo_module

    demo = commands.add_parser(
        "demo",
        help="fit every conjugate oracle and check it",
        description=plain(demo_module.__doc__),
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--out", default=None, metavar="DIR",
        help="folder for the table (demo.md, demo.json) and the figure (demo.png); "
        "nothing is written if absent",
    )
    demo.add_argument(
        "--steps", type=int, default=3000,
        help="the most steps a fit may take (it stops earlier on convergence)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of every fit")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    commands.add_parser(
        "vae", help="train the digits VAE under ELBO/IWELBO/DReG/STL (see pyro-elbo vae --help)",
        add_help=False,
    )
    return top


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vae"]:
        from pyro_elbo.examples.vae import main as vae_main

        return vae_main(argv[1:])
    top = _build()
    args = top.parse_args(argv)
    if args.command == "demo":
        from pyro_elbo.demo import run_demo

        if args.steps < 1:
            top.error("--steps must be >= 1")
        run_demo(out=args.out, steps=args.steps, progress=not args.no_progress, seed=args.seed)
    return 0


def main(argv=None) -> int:
    """Entry point of ``pyro-elbo`` and ``python -m pyro_elbo``."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
