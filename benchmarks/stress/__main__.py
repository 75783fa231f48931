"""``python -m benchmarks.stress``: see :mod:`benchmarks.stress`."""

from benchmarks.stress.cli import main

main()
