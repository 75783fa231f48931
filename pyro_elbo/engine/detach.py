"""Holding the guide's parameters constant in log q, for any guide (STL, DReG), and finding the
trainable tensors a log-density depends on.

* :func:`log_q_with_constant_params`: ``log q_{stop(phi)}(z(phi))`` per guide site, by re-evaluating
  log q on the draws cut from the graph and subtracting that direct part (no parameter is looked
  for, so autoguides, flows, ``AutoMessenger`` guides, modules, closures and wrapped callables are
  all handled the same way);
* :func:`detach_auxiliary_sites`: the same without a second guide pass, for Pyro's Gaussian
  autoguides (:data:`GAUSSIAN_AUTOGUIDES`);
* :func:`path_derivative_unavailable`: whether (and why not) a guide admits the above;
* :func:`graph_leaves`: the leaf tensors an autograd graph reaches (model parameters of any kind).
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.util import detach as detach_distribution
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo.engine.traces import messenger_guide_trace, quietly

__all__ = [
    "GAUSSIAN_AUTOGUIDES",
    "detach_auxiliary_sites",
    "detaches_auxiliary_exactly",
    "graph_leaves",
    "log_q_with_constant_params",
    "path_derivative_unavailable",
]


def graph_leaves(roots, seen: set) -> list[torch.Tensor]:
    """The leaf tensors that require grad reachable from ``roots`` through autograd nodes not
    in ``seen`` (which the walk extends)."""
    found, stack = [], []
    for root in roots:
        if not isinstance(root, torch.Tensor) or not root.requires_grad:
            continue
        if root.grad_fn is None:
            if root not in seen:  # tensors hash by identity
                seen.add(root)
                found.append(root)
        else:
            stack.append(root.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if variable not in seen:
                seen.add(variable)
                found.append(variable)
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def log_q_with_constant_params(guide, full_trace, guide_trace, user_guide, args, kwargs) -> dict:
    """Per guide site, log q with the guide's parameters held constant and the samples live:
    ``{name: log q_{stop(phi)}(z(phi))}`` (scaled and masked), for any guide.

    No parameter is looked for.  The guide is replayed on its own draws, cut from the graph
    (``z_bar = stop(z)``), which gives ``log q_phi(z_bar)``: every tensor the guide reads (a
    ``pyro.param``, a module's weights, a flow's transform, a closure's tensor) stays live, and
    everything computed from a sample is constant, so its gradient is the direct part
    ``d/dphi log q_phi(z)`` at fixed ``z``.  Subtracting it from the live term removes exactly
    that part::

        log q_{stop(phi)}(z(phi)) := log q_phi(z(phi)) + [stop(log q_phi(z_bar)) - log q_phi(z_bar)]

    Same value as ``log q`` (the bracket is exactly 0), gradient the path derivative
    ``d log q/dz * dz/dphi`` (Roeder et al. 2017).  The replay reuses the subsample indices, and
    the drawn values are new tensors, so a transform's cache (flows) cannot hand back the live
    ones: ``log q_phi(z_bar)`` goes through the transform's inverse.

    ``full_trace`` is the guide's trace with its subsample sites, ``guide_trace`` the same pruned,
    with its score parts computed (the live terms).
    """
    fixed = poutine.Trace()
    for name, node in full_trace.nodes.items():
        copy = dict(node)
        value = node.get("value")
        if node["type"] == "sample" and isinstance(value, torch.Tensor):
            copy["value"] = value.detach()
        fixed.add_node(name, **copy)
    try:
        with poutine.block():
            replayed = poutine.trace(poutine.replay(guide, trace=fixed)).get_trace(*args, **kwargs)
            replayed = prune_subsample_sites(replayed)
            replayed.compute_log_prob()
    except Exception as error:
        raise NotImplementedError(
            f"the guide {_describe_guide(user_guide)} could not be evaluated at its own draws "
            f"({type(error).__name__}: {error}). A path-derivative estimator (STL, DReG) needs "
            "log q at a given point with the parameters held constant, e.g. the inverse of a "
            "flow's transform. Use estimator='reparam', or a transform with an inverse."
        ) from error
    live = guide_trace.nodes
    missing = [n for n, s in live.items() if s["type"] == "sample" and n not in replayed.nodes]
    if missing:
        raise NotImplementedError(
            f"the guide {_describe_guide(user_guide)} sampled {missing} but did not sample them "
            "again when replayed on its own draws (its structure depends on randomness outside "
            "pyro.sample); a path-derivative estimator (STL, DReG) needs the replay. Use "
            "estimator='reparam'."
        )
    detached = {}
    for name, node in replayed.nodes.items():
        if node["type"] != "sample" or name not in live:
            continue
        direct = node["log_prob"]
        if _is_delta(node["fn"]):
            # a deterministic site (an autoguide's Delta carrying a Jacobian as log_density):
            # its value is a function of earlier draws, so it is no point of q to hold fixed.
            # A Jacobian that depends on the parameters (AutoStructured, AutoGaussian) belongs
            # to the change of variables and keeps its whole gradient; the path derivative is
            # then taken in the space of the auxiliary draws (subtracting its direct part was
            # biased: posterior sd 0.01 against 0.71 in Pyro's test_exact).
            detached[name] = live[name]["score_parts"].log_prob
        elif isinstance(direct, torch.Tensor) and direct.requires_grad:
            detached[name] = live[name]["score_parts"].log_prob + (direct.detach() - direct)
        else:
            detached[name] = live[name]["score_parts"].log_prob
    return detached


def _is_delta(fn) -> bool:
    """Whether ``fn`` is a (masked, independent) ``Delta``: a deterministic site."""
    while True:
        if isinstance(fn, Delta):
            return True
        inner = getattr(fn, "base_dist", None)
        if inner is None or inner is fn:
            return False
        fn = inner


def _describe_guide(guide) -> str:
    name = getattr(guide, "__qualname__", None) or type(guide).__name__
    return repr(name)


#: autoguides whose auxiliary sites' distributions depend on the parameters only (never on other
#: samples): for them the parameter-detached log q needs no second guide pass
GAUSSIAN_AUTOGUIDES = (
    AutoNormal,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
)


def detaches_auxiliary_exactly(guide) -> bool:
    """Whether :func:`detach_auxiliary_sites` is exact for ``guide``: one of
    :data:`GAUSSIAN_AUTOGUIDES`, or a guide class that says so itself with the class attribute
    ``auxiliary_depends_on_params_only = True`` (not inherited: a subclass must say it again)."""
    return type(guide) in GAUSSIAN_AUTOGUIDES or bool(
        vars(type(guide)).get("auxiliary_depends_on_params_only", False))


def detach_auxiliary_sites(guide_trace):
    """The guide trace with every auxiliary site's distribution detached from the parameters,
    the samples untouched: what the parameter-detached replay gives for the guides
    :func:`detaches_auxiliary_exactly` names, without running the guide again.

    Exact for those guides only.  :data:`GAUSSIAN_AUTOGUIDES`: their auxiliary sites (``<site>_unconstrained`` of AutoNormal,
    ``_<Guide>_latent`` of the others) are Normal/MultivariateNormal/LowRankMultivariateNormal
    whose parameters are the guide's parameters, so detaching the distribution holds exactly
    the parameters constant.  Their other sites are ``Delta(T(u), log_density=Jacobian)``: their
    log-density depends on the sample ``u`` alone and stays on the path, as it must (detaching
    *those* distributions would drop the Jacobian's path gradient, which is biased).
    :class:`~pyro_elbo.guides.AutoRealNVP`: its auxiliary site is the flow on its base Gaussian,
    whose parameters are the guide's alone; the detached copy scores the live draw through its
    inverse (tested equal to the replay in ``tests/test_flow.py``).
    """
    detached = poutine.Trace()
    for name, node in guide_trace.nodes.items():
        if node["type"] != "sample":
            continue
        copy = {k: v for k, v in node.items() if k not in _LOG_PROB_KEYS}
        if node["infer"].get("is_auxiliary"):
            copy["fn"] = detach_distribution(node["fn"])
        detached.add_node(name, **copy)
    return detached


_LOG_PROB_KEYS = ("log_prob", "log_prob_sum", "unscaled_log_prob", "score_parts")


def path_derivative_unavailable(guide, args, kwargs) -> str | None:
    """Why ``guide``'s log q cannot be evaluated with its parameters held constant (what STL and
    DReG need), or ``None`` when it can.  One guide run, hidden from SVI, on a forked generator;
    a guide that fails on its own gives ``None`` (the objective will say why)."""
    messenger = poutine.unwrap(guide)
    with quietly(grad=True):
        try:
            if isinstance(messenger, GuideMessenger):
                guide(*args, **kwargs)
                full = messenger_guide_trace(messenger)
            else:
                full = poutine.trace(guide).get_trace(*args, **kwargs)
            pruned = prune_subsample_sites(full)
            pruned.compute_score_parts()
        except Exception:
            return None
        try:
            log_q_with_constant_params(guide, full, pruned, guide, args, kwargs)
        except NotImplementedError as error:
            return str(error)
    return None
