"""``python -m benchmarks.stress``: run the suite and the experiments, write
``benchmarks/results/stress.json`` and ``stress.md``."""

from __future__ import annotations

import json
import platform
import time

import pyro
import torch

from benchmarks.stress.cases import CASES
from benchmarks.stress.experiments import (
    conditioning_experiment,
    funnel_experiment,
    guide_experiment,
)
from benchmarks.stress.references import RESULTS, load_references
from benchmarks.stress.report import markdown
from benchmarks.stress.settings import SETTINGS, run_case


def main(argv=None):
    import benchmarks.stress as package
    from pyro_elbo.cli import parser as cli_parser

    parser = cli_parser("python -m benchmarks.stress", package.__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                        help="the posteriors to fit")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS,
                        help="the fit settings to run on each case")
    parser.add_argument("--quick", action="store_true", help="a fifth of the steps")
    parser.add_argument("--experiments", nargs="*", default=[],
                        choices=["conditioning", "guides", "funnel"],
                        help="extra experiments to run (written next to the suite's results)")
    parser.add_argument("--no-suite", action="store_true", help="only the experiments")
    parser.add_argument("--refresh-reference", action="store_true",
                        help="recompute the NUTS reference draws instead of reading them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(False)  # speed only: the numbers do not depend on it
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "stress.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    start = time.perf_counter()
    if not args.no_suite:
        cases = [CASES[n]() for n in args.cases]
        load_references(cases, refresh=args.refresh_reference)
        results.setdefault("cases", {})
        for case in cases:  # a run of some settings keeps the other settings' rows
            entry = results["cases"].setdefault(case.name, {"rows": {}})
            entry.update(reference=case.reference_info, notes=case.notes)
            entry["rows"].update(run_case(case, args.settings, args.quick))
            entry["rows"] = {k: entry["rows"][k] for k in SETTINGS if k in entry["rows"]}
    if "conditioning" in args.experiments:
        results["conditioning"] = conditioning_experiment()
    if "guides" in args.experiments:
        results["guides"] = guide_experiment()
    if "funnel" in args.experiments:
        results["funnel"] = funnel_experiment()
    results["meta"] = {"machine": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "pyro": pyro.__version__,
                       "seconds": round(time.perf_counter() - start)}
    path.write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / "stress.md").write_text(markdown(results))
    print(markdown(results))
