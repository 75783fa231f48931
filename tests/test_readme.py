"""Every Python example in README.md runs as written (README stays true to the code)."""

import re
from pathlib import Path

import pyro
import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    pyro.clear_param_store()
    old = torch.get_default_dtype()
    try:
        namespace = {"__name__": "__readme__"}
        exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), namespace)
    finally:
        torch.set_default_dtype(old)
    assert capsys.readouterr().out.strip(), "each README example prints its result"
