"""Checks of the sites of one traced pair that the engine does not make: a plate that differs
between model and guide (name, size or dim, or a latent site in other plates), a
non-reparameterizable guide site under a pathwise-only estimator, and NaN or inf in observed
data (entries masked out allowed)."""

from __future__ import annotations

import torch

from pyro_elbo.engine.validation import ModelGuideMismatchError
from pyro_elbo.fit.settings_checks import pathwise_only

__all__ = ["PlateMismatchError", "check_observed", "check_pathwise", "check_plates"]


class PlateMismatchError(ModelGuideMismatchError):
    """A plate differs (name, size or dim) between model and guide."""



def check_pathwise(guide_sites, objective):
    needs = pathwise_only(objective)
    if needs is None:
        return
    for name, site in guide_sites.items():
        fn = site["fn"]
        if site["is_observed"] or getattr(fn, "has_rsample", True):
            continue
        kind = "discrete" if fn.support.is_discrete else "not reparameterizable"
        raise ValueError(
            f"guide site {name!r} is {kind} ({type(fn).__name__} has no rsample), but {needs} "
            "is a pathwise (path-derivative) estimator that differentiates through every guide "
            "sample. Use ELBO(estimator='reparam'), which adds score-function terms for such "
            "sites, ELBO(estimator='score'), or sum the site out with TraceEnum_ELBO."
        )


def _frames(site):
    return {f.name: f for f in site["cond_indep_stack"] if f.vectorized}


def _plate_text(frame):
    full = frame.full_size if getattr(frame, "full_size", None) is not None else frame.size
    sub = f", subsample {frame.size}" if frame.size != full else ""
    return f"size {full}{sub}, dim {frame.dim}"


def check_plates(model_sites, guide_sites):
    # one plate name, one plate: same full size, batch size and dim in model and guide
    seen = {}
    for role, sites in (("model", model_sites), ("guide", guide_sites)):
        for name, site in sites.items():
            for frame in _frames(site).values():
                key = (frame.dim, getattr(frame, "full_size", None) or frame.size, frame.size)
                if frame.name in seen and seen[frame.name][0] != key:
                    other_key, other_role, other_site, other_frame = seen[frame.name]
                    raise PlateMismatchError(
                        f"plate {frame.name!r} has {_plate_text(other_frame)} in the "
                        f"{other_role} (site {other_site!r}) but {_plate_text(frame)} in the "
                        f"{role} (site {name!r}). Use the same pyro.plate (name, size, "
                        "subsample_size, dim) in model and guide."
                    )
                seen.setdefault(frame.name, (key, role, name, frame))
    # a latent site lives in the same plates in model and guide
    for name, guide_site in guide_sites.items():
        model_site = model_sites.get(name)
        if model_site is None or model_site["is_observed"]:
            continue
        in_model, in_guide = _frames(model_site), _frames(guide_site)
        if set(in_model) == set(in_guide):
            continue
        missing = sorted(set(in_model) - set(in_guide))
        extra = sorted(set(in_guide) - set(in_model))
        if missing:
            where = f"inside plate(s) {missing} in the model but not in the guide"
        else:
            where = f"inside plate(s) {extra} in the guide but not in the model"
        raise PlateMismatchError(
            f"latent site {name!r} is {where}, so its log q and log p would be scaled and "
            "broadcast differently (wrong under subsampling). Sample it inside the same "
            "pyro.plate statements in the guide as in the model."
        )



def check_observed(model_sites):
    for name, site in model_sites.items():
        if not site["is_observed"]:
            continue
        value = site["value"]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value)
        if not bool(bad.any()):
            continue
        mask = site.get("mask")
        event_dim = getattr(site["fn"], "event_dim", 0)
        if isinstance(mask, torch.Tensor):
            if event_dim:
                bad = bad.reshape(bad.shape[: bad.dim() - event_dim] + (-1,)).any(-1)
            bad = bad & mask.to(torch.bool)
            if not bool(bad.any()):
                continue
        elif mask is False:
            continue
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
        raise ValueError(
            f"observed site {name!r} has {count} non-finite value(s) ({kind}; the first at index "
            f"{first}). Drop or impute them, or mask them out with pyro.sample(..., "
            "obs_mask=...) or poutine.mask, so they do not enter the likelihood."
        )
