r"""The potential of the Laplace stage: ``U(u) = -log p(x, T(u)) - log |det dT/du|`` over one
flat vector ``u`` of unconstrained latents (``T = biject_to(support)`` per site), built on Pyro's
own HMC potential (:func:`pyro.infer.mcmc.util.initialize_model`: discrete sites enumerated out),
packed in the guide's order, optionally in float64, and the deterministic start point
:func:`init_to_finite_mean`.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.mcmc.util import initialize_model

from pyro_elbo.engine.traces import quietly

__all__ = ["LaplaceUnavailable", "flat_potential", "init_to_finite_mean"]


class LaplaceUnavailable(ValueError):
    """The model has no Laplace stage: it subsamples data, or its potential is not finite
    anywhere it was tried.  ``fit`` should skip the stage and say why."""


def _slices(sites):
    slices, pos = {}, 0
    for name, shape in sites:
        size = math.prod(shape)
        slices[name] = slice(pos, pos + size)
        pos += size
    return slices


def _guide_order(guide, args, kwargs):
    """Site names in the guide's packing order, or ``None`` for a guide without one."""
    if isinstance(guide, (AutoNormal, AutoContinuous, AutoDelta)):
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    return None


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _default_dtype(dtype):
    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def flat_potential(model, *args, guide=None, init_loc_fn=None, dtype=None, **kwargs):
    """``(U, sites, transforms, u0)``: the potential ``U(u)`` over one flat unconstrained vector,
    the packing order ``((site, shape), ...)`` (the guide's when it is an autoguide), the
    ``{site: constrained -> unconstrained}`` transforms and a start point.

    With ``dtype`` (e.g. float64) the model runs with its floating-point arguments cast to it
    and with it as torch's default dtype (so constants such as ``HalfCauchy(5.0)`` are built in
    it: torch's half distributions cast the value to their parameters' dtype); if the model
    fails that way, its own dtype is kept, with a warning.
    """
    order = _guide_order(guide, args, kwargs)
    if dtype is not None:
        try:
            return _flat_potential(model, _cast(args, dtype), _cast(kwargs, dtype), order,
                                   init_loc_fn, dtype)
        except LaplaceUnavailable:
            raise
        except Exception as e:  # the model does not run in this dtype: keep its own
            warnings.warn(
                f"laplace_init: the model does not run with {dtype} latents ({e}); the "
                "Laplace stage runs in the model's own dtype.",
                stacklevel=3,
            )
    return _flat_potential(model, args, kwargs, order, init_loc_fn, None)


def _flat_potential(model, args, kwargs, order, init_loc_fn, dtype):
    init = init_loc_fn or init_to_finite_mean
    try:
        with quietly(grad=True, fork=False), _default_dtype(dtype):
            init_params, potential_fn, transforms, trace = initialize_model(
                model, model_args=args, model_kwargs=kwargs, init_strategy=init
            )
    except NotImplementedError as e:
        raise LaplaceUnavailable(
            f"laplace_init needs the full-data log joint and the model subsamples ({e}); run "
            "the Laplace stage on the model without subsample_size, or skip it."
        ) from e
    except ValueError as e:
        raise LaplaceUnavailable(
            f"laplace_init found no start point with a finite log joint ({e}); pass "
            "init_loc_fn= with a valid start."
        ) from e
    if not init_params:
        raise LaplaceUnavailable("laplace_init: the model has no continuous latent sites")
    names = [n for n in trace.nodes if n in init_params]  # model order
    if order is not None:
        missing = [n for n in order if n not in init_params]
        if missing:
            raise LaplaceUnavailable(
                f"laplace_init: guide sites {missing} are not continuous latent sites of the "
                "model (discrete or hidden sites cannot be initialized)"
            )
        names = order + [n for n in names if n not in order]
    sites = [(n, tuple(init_params[n].shape)) for n in names]
    slices = _slices(sites)

    def potential(u):
        params = {n: u[slices[n]].reshape(shape) for n, shape in sites}
        with _default_dtype(dtype):
            return potential_fn(params)

    u0 = torch.cat([init_params[n].detach().reshape(-1) for n in names])
    if dtype is not None:
        u0 = u0.to(dtype)
        with torch.no_grad():
            value = potential(u0)
        if value.dtype != dtype or not torch.isfinite(value):
            raise RuntimeError(f"the potential is {value.dtype} / not finite at the start")
    return potential, sites, transforms, u0


def init_to_finite_mean(site=None):
    """The prior mean where it is finite and in the support (deterministic), else the point
    ``biject_to(support)(0)`` (``init_to_feasible``).  Pyro's ``init_to_mean`` returns the
    infinite mean of a HalfCauchy."""
    if site is None:
        return init_to_finite_mean
    try:
        value = site["fn"].mean.detach()
        if torch.isfinite(value).all() and bool(site["fn"].support.check(value).all()):
            return value
    except (RuntimeError, ValueError, NotImplementedError):
        pass
    return init_to_feasible(site)
