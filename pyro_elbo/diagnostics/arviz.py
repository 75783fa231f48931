r"""Hand a fitted guide to ArviZ: InferenceData (ArviZ 0.x) or a DataTree (ArviZ 1.x), and
PSIS-LOO corrected for draws from q.

**Draws.** :func:`to_dict` draws S values ``z_s ~ q(z)`` from the guide in ONE vectorized pass of
the particle engine (:func:`~pyro_elbo.engine.particles.run_particles`, particles in an outer
plate at ``dim = -(P+1)``, P the model's plate nesting), under ``torch.no_grad``, and reads every
group off the engine's traces and per-site terms.  One unvectorized engine run first gives the
per-draw shapes and plate dims and checks that the guide matches the model.  A model that does
not vectorize (Python control flow on a sample, a hard-coded ``expand``) falls back to S
sequential runs, with a warning.

=====================  =================================================  =====================
group                  content                                            dims
=====================  =================================================  =====================
posterior              latent sites (constrained space, as the model      (chain=1, draw=S,
                       sees them) and ``pyro.deterministic`` sites; no    plates..., events...)
                       auxiliary guide sites
posterior_predictive   every observed site re-sampled from
                       ``p(y | z_s)`` with the same draws
log_likelihood         pointwise ``log p(y_i | z_s)`` (masked, unscaled)  (chain, draw, plates)
observed_data          the observed values                                (plates, events)
sample_stats           ``lp = log p(x, z_s)``, ``log_q = log q(z_s)``,    (chain, draw)
                       ``log_weight = lp - log_q``
optimization           ``loss`` (when ``losses`` is given)                (step,)
=====================  =================================================  =====================

Dims are named after the ``pyro.plate`` s; other dims (event dims, undeclared batch dims) are
``<site>_dim_<i>``; size-1 dims that only hold the place of a plate a site is not in are dropped.
The posterior predictive draws each observed site from its distribution given the draw (and the
observed values of the sites before it), as ``az.plot_ppc`` and LOO-PIT expect for
conditionally independent data.

**Enumerated models.** A model fitted with ``TraceEnum_ELBO`` (discrete sites marked for
parallel enumeration, absent from the guide) takes the path of
:mod:`pyro_elbo.diagnostics.enumerated`: the continuous latents come from the guide, the
discrete ones are drawn from their conditional posterior by ``infer_discrete``, and ``lp`` and
the pointwise log-likelihood have the discrete sites summed out, so :func:`loo` applies as is.

A guide that was never fitted gets an ``UnfittedGuideWarning``
(:mod:`pyro_elbo.guides.unfitted`).

**Versions.** The groups are built as plain numpy (:class:`InferenceDict`, no ArviZ import), then
handed to ``arviz.from_dict`` (ArviZ < 1, an ``InferenceData``) or ``arviz_base.from_dict``
(ArviZ >= 1, an ``xarray.DataTree``), by the installed version of the ``arviz`` distribution.
ArviZ 1.x needs Python >= 3.12; :meth:`InferenceDict.save` / :meth:`InferenceDict.load` move the
groups between environments.  The numpy half (:mod:`.inference_dict`, :mod:`.loo`,
:mod:`.psis`) imports neither torch nor pyro, so it runs where only ArviZ is installed.

**LOO for VI draws**: :func:`loo` (:mod:`pyro_elbo.diagnostics.loo`) corrects PSIS-LOO by
``p(z | x) / q(z)`` (Magnusson et al. 2019).

**Layout** (:mod:`pyro_elbo.diagnostics.draw_layout`, site kinds, shapes and dim names),
**files** and the hand-off to ArviZ (:mod:`pyro_elbo.diagnostics.inference_dict`) live in
modules of their own; this one draws from the guide and resamples.
"""

from __future__ import annotations

import warnings

import numpy as np

from pyro_elbo.diagnostics.inference_dict import LOSS_GROUP, SAMPLE_DIMS, InferenceDict
from pyro_elbo.diagnostics.loo import loo
from pyro_elbo.diagnostics.psis import CONSTANT_LOG_WEIGHTS as CONSTANT_LOG_WEIGHTS  # re-export
from pyro_elbo.diagnostics.psis import (
    arviz_version,
    check_num_samples,
    draw_particles,
    khat_threshold,
    psis_khat,
    psislw,
)

__all__ = [
    "LOSS_GROUP",
    "SAMPLE_DIMS",
    "InferenceDict",
    "arviz_version",
    "loo",
    "psis_khat",
    "psislw",
    "to_dict",
    "to_inference_data",
]


# --------------------------------------------------------------------------- Pyro -> numpy
def to_inference_data(model, guide, *args, **options):
    """Draw ``num_samples`` values from a fitted guide and return ArviZ data: ``InferenceData``
    on ArviZ 0.x, an ``xarray.DataTree`` on ArviZ 1.x (see the module docstring for groups
    and dims).  Arguments (``num_samples=1000``, ``posterior_predictive``, ``log_likelihood``,
    ``coords``, ``dims``, ``losses``, ``resample``) as :func:`to_dict`; the other positional
    and keyword arguments go to model and guide."""
    return to_dict(model, guide, *args, **options).to_arviz()


def to_dict(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    coords: dict | None = None,
    dims: dict | None = None,
    losses=None,
    resample: str | None = None,
    **kwargs,
) -> InferenceDict:
    """The ArviZ groups as numpy (:class:`InferenceDict`), without importing ArviZ.

    :param model: the Pyro model, run on the full data (a subsampled plate gives the log
        likelihood of the minibatch only, and a scaled ``lp``; this warns).
    :param guide: the fitted guide.
    :param int num_samples: draws S >= 1 (one chain).
    :param bool posterior_predictive: add the ``posterior_predictive`` group.
    :param bool log_likelihood: add the pointwise ``log_likelihood`` group (needs an observed
        site).
    :param dict coords: ``{dim: index values}``, e.g. ``{"school": names}``.
    :param dict dims: ``{site: [dim names]}`` to override the names read from the plates.
    :param losses: the loss trace (a sequence of numbers, or an object with ``.losses``), stored
        in the ``optimization`` group with dim ``step``.
    :param resample: ``None``, or ``"psis"``: importance-resample the draws by their
        Pareto-smoothed weights ``p(x, z) / q(z)`` (Vehtari et al. 2015; Agrawal, Sheldon &
        Domke 2020's importance-weighted sampling), which removes most of the bias of a
        slightly-off Gaussian guide.  Only when k-hat is below ``min(1 - 1/log10 S, 0.7)``:
        otherwise the weights are unreliable, the draws are kept as drawn and a warning says
        so.  ``posterior.attrs["resampled"]`` records what was done (``loo`` then applies no
        further q-correction).
    """
    import torch

    from pyro_elbo.diagnostics.draw_layout import DrawLayout
    from pyro_elbo.diagnostics.enumerated import find_enumerated, prototype, run_enumerated
    from pyro_elbo.engine.particles import guess_plate_nesting, run_particles

    num_samples = check_num_samples(num_samples)
    if resample not in (None, "psis"):
        raise ValueError(f"resample must be None or 'psis', got {resample!r}")
    loss_trace = None if losses is None else _loss_array(losses)
    from pyro_elbo.guides.unfitted import param_names, warn_if_created

    before = param_names(guide, "to_inference_data", stacklevel=5)
    with torch.no_grad():
        nesting = guess_plate_nesting(model, guide, args, kwargs)
        # enumerated discrete sites, and a guide never fitted (from one blocked draw)
        enumerated, guide_trace = find_enumerated(model, guide, args, kwargs)
        warn_if_created(guide, before, guide_trace, "to_inference_data", stacklevel=5)
        if enumerated:  # discrete sites summed out, drawn by infer_discrete
            model_trace, guide_trace = prototype(model, guide, args, kwargs, nesting)
        else:
            proto = run_particles(
                model, guide, args, kwargs, num_particles=1, plate_nesting=nesting, validate=True
            )
            model_trace, guide_trace = proto.model_traces[0], proto.guide_traces[0]
        layout = DrawLayout(model_trace, guide_trace, nesting)
        if log_likelihood and not layout.observed:
            raise ValueError(
                "the model has no observed site (pyro.sample(..., obs=data)), so there is no "
                "log likelihood to record: pass the data to the model, or pass "
                "log_likelihood=False (and posterior_predictive=False)"
            )
        layout.warn_if_subsampled()
        site_dims = layout.dims()
        for name, names in (dims or {}).items():
            if name not in site_dims:
                raise ValueError(
                    f"dims names the variable {name!r}, which is not a site of the model; "
                    f"sites: {sorted(site_dims)}"
                )
            site_dims[name] = list(names)

        def collect(particles):
            return layout.collect(particles, posterior_predictive, log_likelihood)

        if enumerated:
            groups = collect(
                run_enumerated(model, guide, args, kwargs, num_samples, nesting, log_likelihood)
            )
        else:
            groups = draw_particles(model, guide, args, kwargs, num_samples, nesting, collect)
        attrs = _attrs(guide, num_samples)
        if resample == "psis":
            attrs["posterior"].update(_psis_resample(groups, num_samples))
    groups["observed_data"] = layout.observed_data()
    if loss_trace is not None:
        groups[LOSS_GROUP] = {"loss": loss_trace}
    return InferenceDict(
        groups={g: v for g, v in groups.items() if v},
        dims=site_dims,
        coords={k: list(np.asarray(v).tolist()) for k, v in (coords or {}).items()},
        attrs=attrs,
    )


def _psis_resample(groups, num_samples) -> dict:
    """Resample every per-draw group in place by the PSIS weights of ``sample_stats
    .log_weight``; returns the attributes that record it."""
    import torch

    log_weight = groups["sample_stats"]["log_weight"].reshape(-1)
    smoothed, khat = psislw(log_weight)
    khat, threshold = float(khat), khat_threshold(num_samples)
    weights = np.exp(smoothed)
    ess = float(1.0 / np.sum(weights**2))
    if khat > threshold:
        warnings.warn(
            f"resample='psis': k-hat {khat:.2f} > {threshold:.2f}, so the importance weights "
            "are unreliable and the draws are kept as drawn from q (not resampled). Fit a "
            "better guide (full rank, more steps) or use more draws.",
            stacklevel=3,
        )
        return {"resampled": "none", "psis_khat": khat, "psis_ess": ess}
    index = torch.multinomial(
        torch.as_tensor(weights, dtype=torch.float64), num_samples, replacement=True
    ).numpy()
    for name in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats"):
        for var, value in groups.get(name, {}).items():
            groups[name][var] = value[:, index]
    return {"resampled": "psis", "psis_khat": khat, "psis_ess": ess}


def _loss_array(losses) -> np.ndarray:
    losses = getattr(losses, "losses", losses)
    try:
        array = np.asarray([float(x) for x in losses], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            "losses must be a sequence of numbers (or an object with .losses), e.g. the values "
            f"returned by svi.step(); got {type(losses).__name__}"
        ) from error
    if array.ndim != 1 or array.size == 0:
        raise ValueError("losses must be a non-empty 1-D sequence of numbers")
    return array


def _attrs(guide, num_samples):
    import pyro

    from pyro_elbo import __version__

    posterior = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "creation_library": "pyro_elbo",
        "creation_library_version": __version__,
        "method": "variational",
        "guide": type(guide).__name__,
        "num_samples": num_samples,
        "note": "i.i.d. draws from the guide q (one chain); r_hat is undefined",
    }
    return {"posterior": posterior, "sample_stats": {"lp": "log p(x, z)", "log_q": "log q(z)"}}
