"""Pyro's test environment (its ``tests/conftest.py`` and ``setup.cfg``) for the compatibility suite:
float64 default dtype, validation on, and every warning an error except the ones Pyro ignores;
plus the xfail marks of ``known_failures.py``."""

import pyro
import pytest
import torch
from known_failures import BUGS, KNOWN_FAILURES

# Pyro's setup.cfg [tool:pytest] filterwarnings, in one mark so that the ignores come after "error"
PYRO_FILTERWARNINGS = pytest.mark.filterwarnings(
    "error",
    "ignore:numpy.ufunc size changed:RuntimeWarning",
    "ignore:numpy.dtype size changed:RuntimeWarning",
    "ignore:Mixed memory format inputs detected:UserWarning",
    "ignore:Setting attributes on ParameterDict:UserWarning",
    "ignore:Creating a tensor from a list of numpy.ndarrays is extremely slow",
    "ignore::DeprecationWarning",
    "ignore:CUDA initialization:UserWarning",
    "ignore:__floordiv__ is deprecated:UserWarning",
    "ignore:floor_divide is deprecated:UserWarning",
    "ignore:torch.tensor results are registered as constants in the trace",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/compat/" not in path:
            continue
        item.add_marker(PYRO_FILTERWARNINGS, append=False)  # a test's own filters win
        module = path.rsplit("/", 1)[-1][: -len(".py")]
        bug = KNOWN_FAILURES.get(f"{module}::{item.name}")
        if bug is not None:
            item.add_marker(pytest.mark.xfail(reason=f"[{bug}] {BUGS[bug]}", strict=False))


@pytest.fixture(autouse=True)
def _pyro_test_environment():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(dtype)
    pyro.enable_validation(True)
