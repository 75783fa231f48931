"""Whether the guide's support lies inside the prior's (else q puts mass where ``log p = -inf``),
checked by mapping a few points of the unconstrained space through ``biject_to(guide support)``
and testing them against the prior's support; ``Delta`` guide sites (autoguides) and
AutoMessenger sites have their *value* tested instead."""

from __future__ import annotations

import pyro
import torch
from torch.distributions import biject_to, constraints

from pyro_elbo.engine.validation import ModelGuideMismatchError

__all__ = ["SupportMismatchError", "check_supports"]


class SupportMismatchError(ModelGuideMismatchError):
    """The guide can put mass where the model's prior has none."""



def _base(fn):
    """Strip Independent/Expanded/Masked wrappers (they do not change the support's base)."""
    while True:
        inner = getattr(fn, "base_dist", None)
        if inner is None or type(fn).__name__ not in (
            "Independent",
            "ExpandedDistribution",
            "MaskedDistribution",
        ):
            return fn
        fn = inner


def check_supports(model_sites, guide_sites):
    for name, guide_site in guide_sites.items():
        model_site = model_sites.get(name)
        if model_site is None or model_site["is_observed"]:
            continue
        guide_fn, model_fn = guide_site["fn"], model_site["fn"]
        value = guide_site["value"]
        outer = model_fn.support
        if isinstance(_base(guide_fn), pyro.distributions.Delta) or "prior" in guide_site["infer"]:
            # autoguides sample Delta(T(u)), AutoMessenger guides T(Normal) with a T whose
            # nominal codomain is Real: the support is nominal, the value is what counts
            inside = _inside(outer, value)
            if inside is not None and not inside:
                raise SupportMismatchError(
                    f"guide site {name!r} is a point mass (Delta) at a value outside the support "
                    f"of the model's {type(model_fn).__name__} prior ({_support_text(outer)}). "
                    "Initialize it inside the support, or constrain its parameter "
                    f"(pyro.param(..., constraint={_constraint_hint(outer)}))."
                )
            continue
        inner = guide_fn.support
        if inner is outer or _same(inner, outer):
            continue
        points = _support_points(inner, value)
        if points is None:
            continue
        inside = _inside(outer, points)
        if inside is not None and not inside:
            raise SupportMismatchError(
                f"guide site {name!r}: the guide's {type(guide_fn).__name__} has support "
                f"{_support_text(inner)}, which is not inside the support "
                f"{_support_text(outer)} of the model's {type(model_fn).__name__} prior, so q "
                "can put mass where the prior has none (log p = -inf there). Use a guide "
                "distribution on the prior's support (e.g. LogNormal or Gamma for positive, Beta "
                "for the unit interval, Dirichlet for a simplex), or an autoguide, which "
                "transforms to the support."
            )


def _same(a, b):
    """Structural equality of two constraints (same type and attributes)."""
    if type(a) is not type(b):
        return False
    try:
        attrs_a, attrs_b = vars(a), vars(b)
    except TypeError:
        return False
    return attrs_a.keys() == attrs_b.keys() and all(_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)


def _equal(x, y):
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        try:
            return bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
        except (TypeError, RuntimeError):
            return False
    if isinstance(x, constraints.Constraint):
        return _same(x, y)
    return x == y


def _support_points(support, value):
    """Points spread over ``support``, shaped like ``value``: biject_to(support) applied to
    0, +-8 and a few seeded N(0, 3^2) draws in the unconstrained space.  ``None`` if the
    support has no bijection (discrete supports: their enumerated values are used)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    try:
        transform = biject_to(support)
        shape = transform.inverse_shape(value.shape)
    except NotImplementedError:
        return None
    generator = torch.Generator().manual_seed(0)
    draws = [torch.zeros(shape), torch.full(shape, 8.0), torch.full(shape, -8.0)]
    draws += [3.0 * torch.randn(shape, generator=generator) for _ in range(4)]
    with torch.no_grad():
        return torch.stack([transform(d.to(dtype=value.dtype, device=value.device)) for d in draws])


def _inside(support, value):
    """Whether every entry of ``value`` is in ``support`` (``None`` if it cannot be told)."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        with torch.no_grad():
            return bool(support.check(value.detach()).all())
    except (NotImplementedError, RuntimeError, ValueError):
        return None


def _support_text(support):
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    text = repr(base)
    return text.replace("()", "") if text.endswith("()") else text


def _constraint_hint(support):
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    for name in ("positive", "unit_interval", "simplex", "nonnegative"):
        if base is getattr(constraints, name, None):
            return f"constraints.{name}"
    return "a constraint matching the prior's support"
