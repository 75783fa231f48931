r"""Can I trust this fit?  PSIS k-hat of the guide, and a sandwich on log p(x).

Both functions draw S values ``z_s ~ q`` in one vectorized pass of the particle engine and use
the log importance weights ``log w_s = log p(x, z_s) - log q(z_s)`` (MATH.md §4).

:func:`diagnose` (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?: evaluating
variational inference", ICML; Vehtari et al. 2024, "Pareto smoothed importance sampling", JMLR):

* ``khat``: the shape of a generalized Pareto distribution fitted to the largest weights
  (ArviZ's PSIS, :func:`pyro_elbo.diagnostics.psis.psislw`).  The weights have finite moments
  of order < 1/k, so k-hat measures how badly q misses posterior mass: q too narrow or
  missing a mode gives heavy-tailed weights.  Verdict: ``k < 0.5`` good (q close to the
  posterior, IS reliable), ``0.5 <= k < 0.7`` ok (usable, tails less so), ``k >= 0.7`` bad;
  and bad whenever ``k > min(1 - 1/log10 S, 0.7)``, the threshold above which S draws cannot
  give a reliable PSIS estimate (Vehtari et al. 2024, §3);
* ``log_evidence`` ± SE: the importance-sampled ``log (1/S) sum_s w_s``;
* ``elbo`` ± SE: ``mean_s log w_s``;
* ``cubo``: CUBO_2 = ``(1/2) log (1/S) sum_s w_s^2`` (Dieng et al. 2017);
* ``ess``: Kish's effective sample size of the raw weights ``(sum w)^2 / sum w^2``.

:func:`evidence_bounds`: ``lower`` = the IW estimate, whose expectation is <= log p(x) for every
S (Jensen; Burda et al. 2016), and ``upper`` = the CUBO_2 estimate, since
``(1/2) log E_q[w^2] >= log p(x)`` (Dieng et al. 2017).  The S-draw CUBO estimate is itself
biased low (Jensen again) and badly so when ``E_q[w^2]`` is infinite (k-hat > 0.5, e.g. q
narrower than the posterior by more than sqrt(2)); then the "upper" bound can fall below
log p(x), so read it together with ``diagnose(...).khat``.  The estimates come from
:mod:`pyro_elbo.engine.bounds`.

A degenerate guide (a point mass: a scale below what its dtype resolves, an ``AutoDelta``)
gives constant weights too, nowhere near log p(x) (:mod:`pyro_elbo.diagnostics.degenerate`):
``Diagnosis.verdict`` is then ``"bad"`` with advice saying so, never "exact", and
:class:`EvidenceBounds` keeps the IW lower bound (still one) and sets the upper one to +inf.
:meth:`EvidenceBounds.contains` floors each SE at the weights' round-off ``resolution``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import pyro_elbo.diagnostics.degenerate as degenerate
from pyro_elbo.diagnostics.enumerated import find_enumerated, run_enumerated
from pyro_elbo.diagnostics.psis import (
    check_num_samples,
    draw_particles,
    khat_threshold,
    psis_khat,
)
from pyro_elbo.engine.bounds import cubo_estimate, elbo_estimate, iw_estimate
from pyro_elbo.engine.particles import guess_plate_nesting, run_particles
from pyro_elbo.engine.traces import forked_rng
from pyro_elbo.guides.unfitted import param_names, warn_if_created

__all__ = [
    "Diagnosis",
    "EvidenceBounds",
    "diagnose",
    "evidence_bounds",
    "funnel_sites",
    "khat_threshold",
    "psis_khat",
    "verdict",
]

#: The fewest draws k-hat is computed from (its tail fit needs them; 10^4 is the default).
MIN_SAMPLES = 100


def verdict(khat: float, num_samples: int) -> str:
    """``"good"`` (k < 0.5), ``"ok"`` (0.5 <= k < 0.7) or ``"bad"`` (k >= 0.7 or above
    :func:`khat_threshold`), after Yao et al. 2018."""
    if math.isnan(khat) or khat >= 0.7 or khat > khat_threshold(num_samples):
        return "bad"
    return "good" if khat < 0.5 else "ok"


@dataclass
class Diagnosis:
    """What :func:`diagnose` found (floats); ``repr`` is a short report with advice."""

    khat: float
    num_samples: int
    log_evidence: float
    log_evidence_se: float
    elbo: float
    elbo_se: float
    cubo: float
    cubo_se: float
    ess: float
    degenerate: str = ""  #: why the guide is a point mass (then the verdict is "bad"), or ""
    funnel_sites: tuple = ()

    @property
    def threshold(self) -> float:
        """The sample-size threshold ``min(1 - 1/log10 S, 0.7)``."""
        return khat_threshold(self.num_samples)

    @property
    def verdict(self) -> str:
        """``"good"``, ``"ok"`` or ``"bad"`` (always ``"bad"`` for a degenerate guide)."""
        return "bad" if self.degenerate else verdict(self.khat, self.num_samples)

    @property
    def advice(self) -> str:
        k, S = self.khat, self.num_samples
        if self.degenerate:
            return (
                f"degenerate guide: {self.degenerate}. q is (numerically) a point mass, not the "
                "posterior: k-hat, the IS log evidence and the ELBO say nothing about the fit. "
                "The guide's scale collapsed (a diverged fit, or init_scale too small); refit, "
                "e.g. with fit(..., init='laplace') or a smaller learning rate."
            )
        if k == -math.inf:
            return "k-hat -inf: the importance weights are constant, q is the exact posterior."
        if self.verdict == "good":
            return (
                f"k-hat {k:.2f} < 0.5: q covers the posterior; importance sampling and the "
                "ELBO gap are reliable."
            )
        if self.verdict == "ok":
            return (
                f"k-hat {k:.2f} in [0.5, 0.7): q is usable but light in the tails; means are "
                "fine, tail quantities and IS estimates less so. A richer guide "
                "(AutoMultivariateNormal, a flow) or IWELBO tightens it."
            )
        if self.funnel_sites:
            names = ", ".join(repr(n) for n in self.funnel_sites)
            return (
                f"k-hat {k:.2f}: a funnel. The scale of the latent site(s) {names} depends on "
                "other latents (it varies across q's draws), a "
                "geometry no Gaussian guide holds. Non-center it: "
                "pyro.infer.reparam.LocScaleReparam(centered=0) via poutine.reparam, or "
                "fit(model, None, ..., reparam='noncentered'); or let fit(model, None, ...) "
                "escalate to a flow guide."
            )
        if k < 0.7:  # above the sample-size threshold only
            return (
                f"k-hat {k:.2f} > {self.threshold:.2f}, the threshold for S={S} draws: too few "
                "draws for a reliable PSIS estimate; rerun with more num_samples (10^4)."
            )
        return (
            f"k-hat {k:.2f} > 0.7: the guide is too narrow or misses mass; try a full-rank "
            "guide, IWELBO or more particles. Importance-sampling estimates (log evidence, "
            "PSIS-LOO) are unreliable."
        )

    def __repr__(self) -> str:
        return (
            f"Diagnosis: {self.verdict}{' (degenerate guide)' if self.degenerate else ''} "
            f"(k-hat {self.khat:.2f}, S={self.num_samples}, "
            f"ESS {self.ess:.0f})\n"
            f"  log p(x) (IS) {self.log_evidence:.4f} ± {self.log_evidence_se:.4f}\n"
            f"  ELBO          {self.elbo:.4f} ± {self.elbo_se:.4f}\n"
            f"  CUBO_2        {self.cubo:.4f} ± {self.cubo_se:.4f}\n"
            f"  {self.advice}"
        )


@dataclass
class EvidenceBounds:
    """``lower`` (IW) and ``upper`` (CUBO_2) estimates of log p(x), each with its SE;
    ``resolution``: the round-off of the log weights in their dtype; ``degenerate``: why the
    guide is a point mass (then ``upper`` is +inf: no upper bound), or ``""``."""

    lower: float
    lower_se: float
    upper: float
    upper_se: float
    num_samples: int
    resolution: float = 0.0
    degenerate: str = ""

    @property
    def width(self) -> float:
        """``upper - lower``: a bound on KL-type gaps; zero for the exact posterior."""
        return self.upper - self.lower

    def contains(self, value, num_se: float = 3.0) -> bool:
        """``lower - num_se * se_l <= value <= upper + num_se * se_u``, each SE floored at
        ``resolution`` (constant log weights have SE 0, but are constant only up to round-off).

        The margin matters at the lower end: the IW estimate is below log p(x) in expectation
        only by about ``lower_se**2 / 2``, so for a good q it lands within noise of log p(x),
        on either side.
        """
        value = float(value)
        low = self.lower - num_se * max(self.lower_se, self.resolution)
        high = self.upper + num_se * max(self.upper_se, self.resolution)
        return low <= value <= high

    def __repr__(self) -> str:
        if self.degenerate:
            return (
                f"EvidenceBounds({self.lower:.4f} ± {self.lower_se:.4f} <= log p(x), no upper "
                f"bound: degenerate guide ({self.degenerate}), S={self.num_samples})"
            )
        return (
            f"EvidenceBounds({self.lower:.4f} ± {self.lower_se:.4f} <= log p(x) <= "
            f"{self.upper:.4f} ± {self.upper_se:.4f}, S={self.num_samples})"
        )


def log_weights(
    model, guide, *args, num_samples: int, where: str = "log_weights", **kwargs
) -> torch.Tensor:
    """``log p(x, z_s) - log q(z_s)`` for S draws from the guide, shape ``(S,)`` (one vectorized
    engine pass; a loop with a warning when the model does not vectorize).  Discrete sites the
    model enumerates are summed out of ``log p`` (:mod:`pyro_elbo.diagnostics.enumerated`)."""
    num_samples = check_num_samples(num_samples)
    before = param_names(guide, where, stacklevel=5)
    with torch.no_grad():
        nesting = guess_plate_nesting(model, guide, args, kwargs)
        # enumerated discrete sites, and a guide never fitted (from one blocked draw)
        enumerated, guide_trace = find_enumerated(model, guide, args, kwargs)
        warn_if_created(guide, before, guide_trace, where, stacklevel=5)
        if enumerated:
            draws = run_enumerated(model, guide, args, kwargs, num_samples, nesting,
                                   log_likelihood=False, draw_discrete=False)
            return (draws.log_p() - draws.log_q()).double()
        # one unvectorized, validated run: a guide that does not match the model fails here,
        # with an error naming the site
        run_particles(
            model, guide, args, kwargs, num_particles=1, plate_nesting=nesting, validate=True
        )
        return draw_particles(
            model, guide, args, kwargs, num_samples, nesting, lambda p: p.log_p() - p.log_q()
        ).double()


def diagnose(model, guide, *args, num_samples: int = 10000, **kwargs) -> Diagnosis:
    """PSIS k-hat, verdict, IS log evidence, ELBO, CUBO_2 and ESS of ``guide`` for ``model``.

    :param num_samples: draws S (at least 100; k-hat is biased low for small S, report it
        with S).
    ``args``/``kwargs`` go to model and guide (run on the full data).
    """
    num_samples = check_num_samples(num_samples, minimum=MIN_SAMPLES)
    lw = log_weights(model, guide, *args, num_samples=num_samples, where="diagnose", **kwargs)
    log_evidence, log_evidence_se = iw_estimate(lw)
    elbo, elbo_se = elbo_estimate(lw)
    point_mass = degenerate.check_degenerate(model, guide, args, kwargs, lw)
    cubo, cubo_se = cubo_estimate(lw, n=2.0)
    ess = math.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))
    khat = psis_khat(lw.numpy())
    funnels = ()
    if verdict(khat, num_samples) != "good":
        funnels = tuple(funnel_sites(model, guide, *args, **kwargs))
    return Diagnosis(
        khat=khat,
        num_samples=num_samples,
        degenerate=point_mass.reason,
        log_evidence=float(log_evidence),
        log_evidence_se=float(log_evidence_se),
        elbo=float(elbo),
        elbo_se=float(elbo_se),
        cubo=float(cubo),
        cubo_se=float(cubo_se),
        ess=ess,
        funnel_sites=funnels,
    )


#: a site is a funnel's neck when the sd of its log scale across q's draws exceeds this (a scale
#: fixed by the data or the prior has sd 0; one set by another latent varies with it)
FUNNEL_LOG_SCALE_SD = 0.1


def funnel_sites(model, guide, *args, num_samples: int = 500, **kwargs) -> list:
    """Latent sites of a location-scale family (Normal, StudentT, Cauchy, Laplace, LogNormal)
    whose scale, read from the model replayed on ``num_samples`` draws of ``guide``, varies
    across the draws: the sd of its log exceeds :data:`FUNNEL_LOG_SCALE_SD`.  Such a scale is
    a function of other latents: a hierarchical prior whose posterior is a funnel (Neal 2003),
    the case for non-centering (:class:`pyro.infer.reparam.LocScaleReparam`)."""
    import pyro.distributions as dist

    families = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace, dist.LogNormal)

    def collect(particles):
        found = {}
        for trace in particles.model_traces:
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                fn = site["fn"]
                while isinstance(fn, (torch.distributions.Independent,
                                      dist.ExpandedDistribution)):
                    fn = fn.base_dist
                if isinstance(fn, families):
                    found.setdefault(name, []).append(fn.scale.detach().double().log())
        return found

    with torch.no_grad(), forked_rng():
        torch.manual_seed(5)
        nesting = guess_plate_nesting(model, guide, args, kwargs)
        found = draw_particles(model, guide, args, kwargs, num_samples, nesting, collect)
    out = []
    for name, tensors in found.items():
        if len(tensors) == 1:
            log_scale = tensors[0]
            log_scale = log_scale.reshape(log_scale.shape[0], -1) if log_scale.dim() else None
        else:
            log_scale = torch.stack([t.reshape(-1) for t in tensors])
        if log_scale is None or log_scale.shape[0] < 2:
            continue
        if float(log_scale.std(0).max()) > FUNNEL_LOG_SCALE_SD:
            out.append(name)
    return out


def evidence_bounds(model, guide, *args, num_samples: int = 10000, **kwargs) -> EvidenceBounds:
    """Lower (IW) and upper (CUBO_2) estimates of log p(x), each with its delta-method SE.

    ``.contains(value)`` tests ``value`` against the bounds widened by 3 SE (at least the
    round-off ``resolution``).  A degenerate guide gets no upper bound.  The upper estimate
    is trustworthy only when the weights have a finite second moment (k-hat < 0.5).
    """
    num_samples = check_num_samples(num_samples, minimum=2)
    lw = log_weights(
        model, guide, *args, num_samples=num_samples, where="evidence_bounds", **kwargs
    )
    lower, lower_se = iw_estimate(lw)
    upper, upper_se = cubo_estimate(lw, n=2.0)
    point_mass = degenerate.check_degenerate(model, guide, args, kwargs, lw)
    if point_mass.reason:  # CUBO of a point mass is no upper bound; IW still is a lower one
        upper, upper_se = math.inf, 0.0
    return EvidenceBounds(
        lower=float(lower),
        lower_se=float(lower_se),
        upper=float(upper),
        upper_se=float(upper_se),
        num_samples=num_samples,
        resolution=point_mass.resolution,
        degenerate=point_mass.reason,
    )
