"""Score-based Gaussian VI for Pyro models: right answers in far fewer gradient evaluations.

* :mod:`pyro_elbo.vi.bam`: Batch-and-Match (Cai et al., ICML 2024), pure ``init``/``step``;
* :mod:`pyro_elbo.vi.lowrank`: its low-rank-plus-diagonal variant in ``O(D (r + B)^2)``
  (match, then the factor-analysis patch of Modi, Cai & Saul, AISTATS 2025);
* :mod:`pyro_elbo.vi.start`: BaM's first Gaussian (Laplace, one Pathfinder path, the prior);
* :mod:`pyro_elbo.vi.bam_run`: ``fit(method="bam")``'s loop, stopping tests and checkpoints;
* :mod:`pyro_elbo.vi.path`: one Pathfinder path (Zhang et al., JMLR 2022);
* :mod:`pyro_elbo.vi.multipath`: :func:`pathfinder`, several paths and PSIS resampling;
* :mod:`pyro_elbo.vi.target`: the unconstrained log joint with counted evaluations, and the
  writer of a Gaussian into an autoguide;
* :mod:`pyro_elbo.vi.methods`: ``fit(..., method="auto" | "bam" | "pathfinder")``.
"""

from pyro_elbo.vi.multipath import PathfinderResult, pathfinder

__all__ = ["PathfinderResult", "pathfinder"]
