r"""Non-centering: the cure for a funnel, and the checks that say when it is needed.

A hierarchical prior ``theta ~ N(mu, tau)`` whose scale ``tau`` is itself latent gives a funnel
(Neal 2003): the posterior's width in ``theta`` moves with ``tau``, which no Gaussian (and no
fixed-step optimizer) follows, and the joint density grows without bound as ``tau -> 0`` at
``theta = mu``, so there is no mode to find.  :func:`noncentered` rewrites the model with
:class:`pyro.infer.reparam.LocScaleReparam` (``centered=0``) on every latent location-scale site
(Normal, StudentT, Cauchy, Laplace): ``theta = mu + tau * theta_decentered``,
``theta_decentered ~ N(0, 1)``, which turns the funnel into a near-Gaussian posterior
(Papaspiliopoulos, Roberts & Skold 2007; Gorinova, Moore & Hoffman 2020).

:func:`funnel_without_mode` is the escalation's first check (``fit(model, None)``,
``reparam="auto"``): (1) ``scale_sites``: the latent location-scale sites whose scale changes
between prior draws (a scale set by other latents: structure, from a few traces of the model,
milliseconds); only if there are any, (2) the Laplace stage's L-BFGS
(:func:`pyro_elbo.init.laplace_init`): when it finds no mode (``selected == "path"``: it ran
down the funnel), the model is non-centered before any Gaussian is fitted.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.poutine as poutine
import torch

__all__ = ["REPARAM_CHOICES", "check_reparam", "funnel_without_mode", "noncentered",
           "scale_sites"]

REPARAM_CHOICES = ("auto", None, "noncentered")
#: prior draws traced by :func:`scale_sites`
SCALE_DRAWS = 4


def check_reparam(reparam):
    if reparam not in REPARAM_CHOICES:
        raise ValueError(
            f"fit: reparam must be 'auto' (non-center a funnel the escalating default finds), "
            f"None (never) or 'noncentered' (LocScaleReparam on every latent location-scale "
            f"site), got {reparam!r}"
        )
    return reparam


_LOC_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)


def _loc_scale_config(msg):
    from pyro.infer.reparam import LocScaleReparam

    if msg["type"] != "sample" or msg["is_observed"] or msg["name"].endswith("_decentered"):
        return None  # (the site LocScaleReparam itself draws passes through here too)
    fn = msg["fn"]
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, _LOC_SCALE):
        return LocScaleReparam(centered=0.0)
    return None


def noncentered(model):
    """``model`` with every latent Normal/StudentT/Cauchy/Laplace site non-centered by
    :class:`pyro.infer.reparam.LocScaleReparam` (``centered=0``): site ``x`` becomes
    ``x_decentered`` (standard), and ``x`` a deterministic function of it."""
    return poutine.reparam(model, config=_loc_scale_config)


def _base(fn):
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def scale_sites(model, args, kwargs, num_draws: int = SCALE_DRAWS) -> list:
    """Latent location-scale sites whose scale differs between ``num_draws`` prior draws of the
    model (their scale is a function of other latents)."""
    from pyro_elbo.engine.traces import quietly

    scales = {}
    with quietly():
        for seed in range(num_draws):
            torch.manual_seed(seed)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                fn = _base(site["fn"])
                if isinstance(fn, _LOC_SCALE):
                    scales.setdefault(name, []).append(fn.scale.detach())
    out = []
    for name, values in scales.items():
        first = values[0]
        if any(v.shape != first.shape or not torch.equal(v, first) for v in values[1:]):
            out.append(name)
    return out


def funnel_without_mode(model, args, kwargs):
    """``(sites, laplace)`` when the model has latent location-scale sites with a latent scale
    (``sites``) and the Laplace stage's L-BFGS finds no mode (``laplace``: its
    :class:`~pyro_elbo.init.LaplaceResult`); else ``None``.  Never raises (a failed check is
    ``None``: the escalation then goes its usual way)."""
    import warnings

    from pyro_elbo.init.laplace import laplace_init

    try:
        sites = scale_sites(model, args, kwargs)
        if not sites:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            laplace = laplace_init(model, None, *args, **kwargs)
    except Exception:  # noqa: BLE001 - a check, not a requirement
        return None
    if laplace.selected != "path":
        return None
    return sites, laplace
