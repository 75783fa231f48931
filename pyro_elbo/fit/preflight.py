"""Up-front validation of ``fit(model, guide, ..., loss=..., optim=...)``, before step 1.

Everything ``fit`` can find out about a bad pairing before it spends compute is checked here, and
each problem is an exception that names the site (or argument) and says what to do:

* settings: ``num_steps``/``max_steps``/``checkpoint_every`` must be positive integers, ``optim``
  a Pyro or torch optimizer, ``loss`` an objective *instance* with valid arguments;
* structure (:func:`pyro_elbo.engine.validation.check_traces`, called on one unvectorized trace of
  guide and model): a latent site missing from the guide, a guide site absent from the model (not
  marked auxiliary), a guide sampling an observed site, a batch or event shape mismatch, an
  enumerated site under an objective that cannot sum it out;
* a **support mismatch**: the guide's support must lie inside the prior's, or q puts mass where
  ``log p = -inf``.  Checked by mapping a few points of the unconstrained space through
  ``biject_to(guide support)`` and testing them against the prior's support (``Delta`` guide sites,
  as in autoguides, have their *value* tested instead);
* a **discrete** (or otherwise non-reparameterizable) guide site under a pathwise-only estimator
  (STL, DReG, CUBO);
* a **plate** with a different name, size or dim in model and guide;
* **data that is not a tensor** (a numpy array or a list used as an observed value, or making
  model or guide fail): a ``TypeError`` naming the argument and the site;
* NaN or inf in **observed data** (entries masked out are allowed);
* a model that **observes nothing** (no ``obs=``, no ``pyro.factor``: a forgotten ``obs=``): one
  warning;
* a non-finite log-density at the initial draw;
* a guide with **no parameters**.

The traces run under ``poutine.block`` and create the guide's parameters (autoguides build theirs
on first call); nothing is optimized.  :func:`check_pair` is the part that works on traces
already run: pyro_elbo's objectives call it on their first call (:mod:`.first_call`), so
``SVI(..., loss=pyro_elbo.ELBO())`` gets the same errors.  When the model fails on the guide's
draw, a guide site off the prior's support is looked for first (the model may have failed by
building ``Normal(0, scale < 0)`` from it) and reported as a :class:`SupportMismatchError`.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field

import pyro
import pyro.infer
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

from pyro_elbo.engine.traces import is_messenger, side_trace_pair
from pyro_elbo.engine.validation import (
    ModelGuideMismatchError,
    check_traces,
    replay_until_failure,
)
from pyro_elbo.fit.data_checks import check_data, raise_for_data, warn_if_nothing_observed
from pyro_elbo.fit.first_call import mark_checked

__all__ = [
    "PlateMismatchError",
    "Preflight",
    "SupportMismatchError",
    "check_model_guide",
    "check_pair",
    "check_objective",
    "check_optim",
    "check_steps",
    "handles_enumeration",
]


class SupportMismatchError(ModelGuideMismatchError):
    """The guide can put mass where the model's prior has none."""


class PlateMismatchError(ModelGuideMismatchError):
    """A plate differs (name, size or dim) between model and guide."""


# ------------------------------------------------------------------ settings


def check_steps(num_steps, max_steps, checkpoint_every, skip_nonfinite) -> None:
    """Positive integers where required; ``skip_nonfinite`` a non-negative integer."""
    for name, value, optional in (
        ("num_steps", num_steps, True),
        ("max_steps", max_steps, False),
        ("checkpoint_every", checkpoint_every, True),
    ):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(
                f"fit: {name} must be a positive integer, got {value!r}"
                + (" (pass None to stop on convergence)" if name == "num_steps" else "")
            )
    if (
        isinstance(skip_nonfinite, bool)
        or not isinstance(skip_nonfinite, numbers.Integral)
        or skip_nonfinite < 0
    ):
        raise ValueError(
            f"fit: skip_nonfinite must be a non-negative integer (how many non-finite steps to "
            f"skip before raising), got {skip_nonfinite!r}"
        )


def check_objective(loss):
    """The objective instance to use: ``None`` gives ``pyro_elbo.ELBO()``."""
    if loss is None:
        from pyro_elbo.objectives.elbo import ELBO

        return ELBO()
    if isinstance(loss, type):
        if issubclass(loss, pyro.infer.ELBO):
            raise TypeError(
                f"fit: loss={loss.__name__} is a class; pass an instance, e.g. "
                f"loss={loss.__name__}() or loss={loss.__name__}(num_particles=8)"
            )
        raise TypeError(f"fit: loss must be an objective instance, got the class {loss!r}")
    if not isinstance(loss, pyro.infer.ELBO) and not callable(
        getattr(loss, "loss_and_grads", None)
    ):
        raise TypeError(
            f"fit: loss must be a pyro_elbo objective (ELBO(), IWELBO(), ...) or a "
            f"pyro.infer.ELBO instance (Trace_ELBO(), TraceEnum_ELBO(), ...), got {loss!r}"
        )
    num_particles = getattr(loss, "num_particles", 1)
    if (
        isinstance(num_particles, bool)
        or not isinstance(num_particles, numbers.Integral)
        or num_particles < 1
    ):
        raise ValueError(
            f"fit: the objective {type(loss).__name__} has num_particles={num_particles!r}; "
            "it must be an integer >= 1"
        )
    nesting = getattr(loss, "max_plate_nesting", float("inf"))
    if nesting != float("inf") and (
        isinstance(nesting, bool) or not isinstance(nesting, numbers.Integral) or nesting < 0
    ):
        raise ValueError(
            f"fit: the objective {type(loss).__name__} has max_plate_nesting={nesting!r}; it "
            "must be a non-negative integer (or left out to be guessed)"
        )
    return loss


def check_optim(optim):
    """``None`` (Adam), a ``pyro.optim.PyroOptim``, a torch optimizer class, a
    ``functools.partial`` of one, or a constructed ``torch.optim.Optimizer``."""
    if optim is None or isinstance(optim, (pyro.optim.PyroOptim, torch.optim.Optimizer)):
        return optim
    if isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer):
        return optim
    if (
        isinstance(optim, functools.partial)
        and isinstance(optim.func, type)
        and issubclass(optim.func, torch.optim.Optimizer)
    ):
        return optim
    if (isinstance(optim, type) and issubclass(optim, pyro.optim.PyroOptim)) or (
        callable(optim) and getattr(optim, "__module__", "").startswith("pyro.optim")
    ):
        name = getattr(optim, "__name__", "Adam")
        raise TypeError(
            f"fit: optim=pyro.optim.{name} is the optimizer's constructor; pass an instance, "
            f"e.g. optim=pyro.optim.{name}({{'lr': 0.01}})"
        )
    raise TypeError(
        f"fit: optim must be a Pyro or torch optimizer, got {optim!r} "
        f"({type(optim).__name__}). Pass pyro.optim.Adam({{'lr': 0.01}}), a torch optimizer "
        "class (torch.optim.Adam), functools.partial(torch.optim.Adam, lr=0.01), or leave it "
        "out for Adam with lr=0.01."
    )


def handles_enumeration(objective) -> bool:
    """Whether the objective sums out enumerated discrete sites (Pyro's TraceEnum/TMC ELBOs)."""
    return isinstance(objective, (pyro.infer.TraceEnum_ELBO, pyro.infer.TraceTMC_ELBO))


def _pathwise_only(objective) -> str | None:
    """A description of the objective if its gradient needs every guide site reparameterized."""
    from pyro_elbo.objectives.cubo import CUBO
    from pyro_elbo.objectives.iwelbo import IWELBO

    estimator = getattr(objective, "estimator", None)
    # ELBO's STL gives such sites their score-function terms, as Trace_ELBO does
    if isinstance(objective, IWELBO) and estimator in ("stl", "dreg"):
        return f"{type(objective).__name__}(estimator={estimator!r})"
    if isinstance(objective, CUBO):
        return "CUBO"
    return None


# ------------------------------------------------------------------ model and guide


@dataclass
class Preflight:
    """What the up-front run found: the traces and the parameters by owner."""

    guide_trace: object = field(repr=False)
    model_trace: object = field(repr=False)
    guide_params: list
    model_params: list


def check_model_guide(model, guide, objective, args, kwargs, check_density=True) -> Preflight:
    """Run guide and model once (unvectorized, blocked) and check the pair; see the module doc.
    ``check_density=False`` leaves the finite-log-density check of the draw to the caller
    (``fit`` runs it after its Laplace stage, which may move the guide to where it is finite)."""
    model_trace, guide_trace = _trace_checked_pair(model, guide, args, kwargs)
    check_data(_sample_sites(model_trace), args, kwargs)
    enumerating = handles_enumeration(objective)
    check_traces(
        _without_enumerated(model_trace, guide_trace, enumerating),
        guide_trace,
        allow_enumeration=enumerating,
        strict=True,  # fit refuses a guide site the model lacks (Trace_ELBO only warns)
    )
    model_sites = _sample_sites(model_trace)
    guide_sites = _sample_sites(guide_trace)
    _check_pathwise(guide_sites, objective)
    _check_plates(model_sites, guide_sites)
    _check_supports(model_sites, guide_sites)
    _check_observed(model_sites)
    warn_if_nothing_observed(model_sites)
    if check_density:
        _check_initial_density(model_trace, guide_trace)
    mark_checked(objective, model, guide)  # the objective's first call need not repeat them
    guide_params = _param_names(guide_trace)
    model_params = [n for n in _param_names(model_trace) if n not in guide_params]
    return Preflight(guide_trace, model_trace, guide_params, model_params)


def check_pair(model_trace, guide_trace, args, kwargs) -> None:
    """The checks of :func:`check_model_guide` that pyro_elbo's objectives do not make
    themselves (data types, plates, supports, NaN data, a model that observes nothing), on
    traces already run: what an objective's first call runs (:mod:`.first_call`)."""
    model_sites = _sample_sites(model_trace)
    guide_sites = _sample_sites(guide_trace)
    check_data(model_sites, args, kwargs)
    _check_plates(model_sites, guide_sites)
    _check_supports(model_sites, guide_sites)
    _check_observed(model_sites)
    warn_if_nothing_observed(model_sites)


def _trace_checked_pair(model, guide, args, kwargs):
    """``(model_trace, guide_trace)`` of one side run (blocked, with autograd, on the caller's
    random stream: a seeded ``fit`` draws after it what it drew before); a failure is
    explained, naming the argument or site, and says whether the guide or the model raised it."""
    # the guide traced by its own handler too, so that a model failure can be explained from
    # the draw it failed on; the model marks that the guide has finished
    traced_guide = guide if is_messenger(guide) else poutine.trace(guide)
    reached = []

    def replayed_model(*args, **kwargs):
        reached.append(True)
        return model(*args, **kwargs)

    try:
        return side_trace_pair(
            replayed_model, traced_guide, args, kwargs, grad=True, fork=False, user=(model, guide)
        )
    except Exception as error:
        if reached and isinstance(error, ModelGuideMismatchError) and error.__cause__ is not None:
            raise  # explained by the trace service, naming the site
        raise_for_data(error, args, kwargs)
        if not reached:  # an AutoMessenger guide runs the model itself: it is the guide's run
            _note(error, "raised by the guide in fit's check before step 1")
            raise
        guide_trace = traced_guide.msngr.trace
        _raise_for_supports(model, guide_trace, args, kwargs, error)
        _note(error, "raised by the model (replayed on the guide) in fit's check before step 1")
        raise


def _raise_for_supports(model, guide_trace, args, kwargs, error):
    """The model failed on the guide's draw: if a guide site lies off its prior's support
    (a Normal guide for a positive site makes the model build Normal(0, scale < 0)), raise
    the :class:`SupportMismatchError` that explains it."""
    reached = replay_until_failure(model, guide_trace, args, kwargs)
    try:
        _check_supports(reached, _sample_sites(guide_trace))
    except SupportMismatchError as mismatch:
        raise mismatch from error


def check_has_params(preflight: Preflight, guide) -> None:
    """A guide with no parameters has nothing to fit (a warning when the model has some)."""
    if preflight.guide_params:
        return
    name = getattr(guide, "__name__", type(guide).__name__)
    if preflight.model_params:
        import warnings

        warnings.warn(
            f"fit: the guide {name!r} has no parameters; only the model's parameters "
            f"({', '.join(preflight.model_params[:4])}) are fitted.",
            stacklevel=3,
        )
        return
    raise ValueError(
        f"fit: the guide {name!r} has no parameters (no pyro.param, pyro.module or PyroModule "
        "parameter is read when it runs), so there is nothing to optimize. Give the guide "
        "learnable parameters, e.g. pyro.param('loc', torch.tensor(0.)), or use an autoguide "
        "such as pyro.infer.autoguide.AutoNormal(model)."
    )


def _note(error, text):
    if hasattr(error, "add_note"):
        error.add_note(f"({text})")


def _sample_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _param_names(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def _without_enumerated(model_trace, guide_trace, enumerating):
    """Under an enumerating objective, model sites it sums out are not missing from the guide."""
    if not enumerating:
        return model_trace
    trace = model_trace.copy()
    for name, site in list(model_trace.nodes.items()):
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and site["infer"].get("enumerate")
            and name not in guide_trace.nodes
        ):
            trace.remove_node(name)
    return trace


def _check_pathwise(guide_sites, objective):
    needs = _pathwise_only(objective)
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


def _check_plates(model_sites, guide_sites):
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


def _check_supports(model_sites, guide_sites):
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


def _check_observed(model_sites):
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


def check_initial_density(model, guide, args, kwargs, preflight=None, when="initial"):
    """The log-densities of one draw of the pair are finite: the draw of ``preflight`` when
    given, else a new one (blocked, from a forked generator: the run's random numbers are not
    consumed)."""
    if preflight is not None:
        return _check_initial_density(preflight.model_trace, preflight.guide_trace, when)
    model_trace, guide_trace = side_trace_pair(model, guide, args, kwargs, grad=True)
    _check_initial_density(model_trace, guide_trace, when)


def _check_initial_density(model_trace, guide_trace, when="initial"):
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        try:
            trace.compute_log_prob()
        except Exception as error:
            _note(
                error, f"raised computing the {role}'s log-densities in fit's check before step 1"
            )
            raise
        for name, site in _sample_sites(trace).items():
            log_prob = site.get("log_prob")
            if not isinstance(log_prob, torch.Tensor) or bool(torch.isfinite(log_prob).all()):
                continue
            raise ValueError(
                f"before step 1: the log-density of {role} site {name!r} is "
                f"{_nonfinite_text(log_prob)} at the guide's {when} draw, so the objective "
                "would be non-finite from the start. Check the data against the distribution's "
                "support, the distribution's parameters (a scale of 0, a log of a negative "
                "number) and the guide's initialization."
            )


def _nonfinite_text(tensor):
    if bool(torch.isnan(tensor).any()):
        return "NaN"
    return "-inf" if bool((tensor == float("-inf")).any()) else "+inf"
