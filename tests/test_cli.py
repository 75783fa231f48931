"""The command line: --version, plain-text help with every option explained, commands named as
they are run, and a missing optional extra reported in one line."""

import argparse
import importlib
import sys

import pytest

import pyro_elbo
from pyro_elbo import cli


def _help(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    assert _help(cli.main, ["--version"], capsys).strip() == f"pyro-elbo {pyro_elbo.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_is_plain_text(argv, capsys):
    text = _help(cli.main, argv, capsys)
    for markup in ("``", ":func:", ":mod:", ":class:", "**"):
        assert markup not in text, markup
    assert text.startswith("usage: pyro-elbo")


def _options(build):
    parser = build()
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize(
    "module, prog",
    [
        ("benchmarks.__main__", "python -m benchmarks"),
        ("benchmarks.stress", "python -m benchmarks.stress"),
        ("benchmarks.estimators", "python -m benchmarks.estimators"),
        ("pyro_elbo.examples.vae", "pyro-elbo vae"),
        ("pyro_elbo.examples.distributed_linreg",
         "python -m pyro_elbo.examples.distributed_linreg"),
        ("pyro_elbo.cli", "pyro-elbo demo"),
    ],
)
def test_every_option_has_help_and_the_command_its_name(module, prog, monkeypatch, capsys):
    # capture the parser each main builds by stopping it at parse_args
    seen = []

    def stop(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(["demo", "--help"] if module == "pyro_elbo.cli" else ["--help"])
    parser = seen[0]
    if module == "pyro_elbo.cli":
        parser = parser._subparsers._group_actions[0].choices["demo"]
    assert parser.prog == prog
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert action.help, f"{prog} {action.option_strings[0]} has no help"
    assert "``" not in (parser.description or "")


def test_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    assert cli.main(["vae", "--fast", "--objective", "vae"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "scikit-learn" in err and "pip install 'pyro_elbo[examples]'" in err


def test_plain_strips_rst():
    text = cli.plain("Run ``x --y`` with :func:`pyro_elbo.fit` or :class:`~a.b.Guide`::\n\n  z")
    assert text == "Run x --y with pyro_elbo.fit or Guide:\n\n  z"
