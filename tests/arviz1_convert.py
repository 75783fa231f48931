"""Convert saved pyro_elbo groups with ArviZ 1.x (run by tests/test_arviz.py in a Python 3.12
venv that has ArviZ 1.x and no torch).

usage: python arviz1_convert.py <pyro_elbo/diagnostics/arviz.py> <groups.npz> <result.json>

Loads the module by path (its numpy half, with its siblings psis.py, inference_dict.py and
loo.py, needs neither torch nor pyro), converts the groups
with its version dispatch (a DataTree), runs its VI-corrected ``loo``
(``loo_approximate_posterior``), the naive ``az.loo`` and its ``psis_khat``, and writes what it
found as JSON.
"""

import importlib.util
import json
import sys
import warnings

import arviz as az
import numpy as np


def load_module(path):
    # its numpy siblings first, under their package names, so that arviz.py's imports of them
    # work without the (torch-importing) package
    for sibling in ("psis", "inference_dict", "loo"):
        spec = importlib.util.spec_from_file_location(
            f"pyro_elbo.diagnostics.{sibling}", str(path).replace("arviz.py", f"{sibling}.py")
        )
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    spec = importlib.util.spec_from_file_location("pyro_elbo_arviz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def main(module_path, npz_path, out_path):
    module = load_module(module_path)
    data = module.InferenceDict.load(npz_path)
    tree = data.to_arviz()
    groups = [child for child in tree.children]
    dims = {
        group: {name: list(tree[group][name].dims) for name in tree[group].data_vars}
        for group in groups
    }
    summary = az.summary(tree, kind="stats")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corrected = module.loo(tree)
        naive = az.loo(tree, var_name="obs")
    log_weight = np.asarray(tree["sample_stats"]["log_weight"]).reshape(-1)
    result = {
        "arviz_major": module.arviz_version()[0],
        "arviz_version": az.__version__,
        "python": sys.version.split()[0],
        "type": type(tree).__name__,
        "groups": groups,
        "dims": dims,
        "summary_finite": bool(np.isfinite(summary.select_dtypes("number").values).all()),
        "loo_elpd": float(corrected.elpd),
        "loo_se": float(corrected.se),
        "loo_max_k": float(np.max(corrected.pareto_k)) if corrected.pareto_k is not None else None,
        "naive_loo_elpd": float(naive.elpd),
        "khat": module.psis_khat(log_weight),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
