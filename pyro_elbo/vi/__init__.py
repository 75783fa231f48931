"""Score-based Gaussian VI for Pyro models: right answers in far fewer gradient evaluations.

* :mod:`pyro_elbo.vi.bam`: Batch-and-Match (Cai et al., ICML 2024), pure ``init``/``step``;
* :mod:`pyro_elbo.vi.path`: one Pathfinder path (Zhang et al., JMLR 2022);
* :mod:`pyro_elbo.vi.multipath`: :func:`pathfinder`, several paths and PSIS resampling;
* :mod:`pyro_elbo.vi.target`: the unconstrained log joint with counted evaluations, and the
  writer of a Gaussian into an autoguide;
* :mod:`pyro_elbo.vi.methods`: ``fit(..., method="bam" | "pathfinder")``.
"""

from pyro_elbo.vi.multipath import PathfinderResult, pathfinder

__all__ = ["PathfinderResult", "pathfinder"]
