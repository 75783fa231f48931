"""Every kind of guide Pyro's Trace_ELBO accepts gets the path-derivative estimators right.

STL and DReG need log q with the guide's parameters held constant.  For each guide kind (autoguides
passed wrapped in a handler or a lambda, frozen with ``poutine.block``, ``AutoGuideList``, flows
with transform caches, ``AutoMessenger`` guides, ``nn.Module`` / ``PyroModule`` guides, a
``pyro.module`` network in a function guide, per-datum ``pyro.param`` guides in a subsampled plate):

* on the same draws, the STL surrogate's gradient equals the path derivative computed here
  independently (autograd through ``z(phi)``, log q evaluated with every parameter of the guide
  set to ``requires_grad=False`` and the draws cloned, so no transform cache is hit), to 1e-10 in
  float64;
* where the family holds the exact posterior (set there), STL's and DReG's gradient variance is
  below 1e-12.

Model parameters that are not ``pyro.param`` sites (a plain ``nn.Module`` decoder) get DReG's
model gradient equal to IWAE's on the same draws, and InclusiveKL's too.
"""

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import autoguide as ag
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import transform_to as constraints_transform

from pyro_elbo import ELBO, IWELBO, InclusiveKL

# the reference freezes module weights (requires_grad=False) while pyro.module reads them
pytestmark = pytest.mark.filterwarnings("ignore:.*was not registered in the param store")


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------ models with known posteriors


def data():
    x = torch.tensor([[0.3, -1.1], [1.2, 0.4], [0.8, -0.2]])
    y = torch.tensor([0.5, 1.5])
    return x, y


def model():
    """z (2-dim) and w, each with a conjugate normal likelihood: the posterior is diagonal."""
    x, y = data()
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", 3):
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    with pyro.plate("obs2", 2):
        pyro.sample("y", dist.Normal(w, 1.0), obs=y)


def posterior():
    """Means and sds of (z0, z1, w)."""
    x, y = data()
    mean = torch.cat([x.sum(0) / 4, y.sum(0, keepdim=True) / 3])
    sd = torch.tensor([0.25, 0.25, 1 / 3]).sqrt()
    return mean, sd


LOCAL_X = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1, -0.4])


def local_model():
    x = LOCAL_X.to(torch.get_default_dtype())
    with pyro.plate("data", 6, subsample_size=3) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def local_guide():
    """Per-datum parameters, subsampled by the plate (``event_dim`` given)."""
    with pyro.plate("data", 6, subsample_size=3):
        loc = pyro.param("q_loc", torch.zeros(6), event_dim=0)
        scale = pyro.param("q_scale", torch.ones(6), constraint=constraints.positive, event_dim=0)
        pyro.sample("z", dist.Normal(loc, scale))


# ------------------------------------------------------------------ the guide kinds


def _store_set(**values):
    """Set parameters in place (every module and optimizer holding them sees the new value)."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in values.items():
            leaf = store[name].unconstrained()
            leaf.copy_(constraints_transform(store._constraints[name]).inv(value))


def _mvn_exact():
    mean, sd = posterior()
    _store_set(
        **{
            "AutoMultivariateNormal.loc": mean,
            "AutoMultivariateNormal.scale": sd,
            "AutoMultivariateNormal.scale_tril": torch.eye(3),
        }
    )


def _mvn(wrap):
    guide = ag.AutoMultivariateNormal(model)
    return wrap(guide), [], _mvn_exact


def _messenger_exact():
    mean, sd = posterior()
    _store_set(**{"locs.z": mean[:2], "scales.z": sd[:2], "locs.w": mean[2], "scales.w": sd[2]})


class ModuleGuide(torch.nn.Module):
    """Plain ``nn.Parameter`` attributes, no Pyro registration."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))
        self.log_scale = torch.nn.Parameter(torch.zeros(3))

    def forward(self):
        scale = self.log_scale.exp()
        pyro.sample("z", dist.Normal(self.loc[:2], scale[:2]).to_event(1))
        pyro.sample("w", dist.Normal(self.loc[2], scale[2]))

    def set_exact(self):
        mean, sd = posterior()
        with torch.no_grad():
            self.loc.copy_(mean)
            self.log_scale.copy_(sd.log())


class PyroModuleGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(3))
        self.scale = PyroParam(torch.ones(3), constraint=constraints.positive)

    def forward(self):
        pyro.sample("z", dist.Normal(self.loc[:2], self.scale[:2]).to_event(1))
        pyro.sample("w", dist.Normal(self.loc[2], self.scale[2]))


def _module_guide():
    guide = ModuleGuide()
    return guide, list(guide.parameters()), guide.set_exact


def _pyro_module_guide():
    guide = PyroModuleGuide()

    def exact():
        mean, sd = posterior()
        _store_set(loc=mean, scale=sd)

    return guide, [], exact


def _network_in_function_guide():
    """A network registered with ``pyro.module`` inside a function guide (the DMM pattern)."""
    net = torch.nn.Linear(1, 6)

    def guide():
        pyro.module("encoder", net)
        out = net(torch.ones(1))
        loc, scale = out[:3], out[3:].exp()
        pyro.sample("z", dist.Normal(loc[:2], scale[:2]).to_event(1))
        pyro.sample("w", dist.Normal(loc[2], scale[2]))

    def exact():
        mean, sd = posterior()
        with torch.no_grad():
            net.weight.zero_()
            net.bias.copy_(torch.cat([mean, sd.log()]))

    return guide, list(net.parameters()), exact


def _guide_list():
    guide = ag.AutoGuideList(model)
    guide.append(ag.AutoDiagonalNormal(poutine.block(model, expose=["z"])))
    guide.append(ag.AutoNormal(poutine.block(model, expose=["w"])))
    return guide, [], None


def _blocked():
    """The freezing idiom: the guide's scale hidden from SVI."""
    guide = ag.AutoMultivariateNormal(model)
    return poutine.block(guide, hide=["AutoMultivariateNormal.scale_tril"]), [], _mvn_exact


GUIDES = {
    "scale-wrapped AutoMVN": lambda: _mvn(lambda g: poutine.scale(g, 1.0)),
    "lambda AutoMVN": lambda: _mvn(lambda g: lambda *a, **k: g(*a, **k)),
    "blocked AutoMVN": _blocked,
    "AutoGuideList": _guide_list,
    "AutoStructured": lambda: (
        ag.AutoStructured(
            model, conditionals={"z": "mvn", "w": "normal"}, dependencies={"w": {"z": "linear"}}
        ),
        [],
        None,
    ),
    "AutoGaussian": lambda: (ag.AutoGaussian(model), [], None),
    "AutoIAFNormal": lambda: (ag.AutoIAFNormal(model, hidden_dim=[4]), [], None),
    "AutoNormalizingFlow": lambda: (
        ag.AutoNormalizingFlow(model, partial(T.iterated, 2, T.affine_autoregressive)),
        [],
        None,
    ),
    "AutoNormalMessenger": lambda: (ag.AutoNormalMessenger(model), [], _messenger_exact),
    "AutoHierarchicalNormalMessenger": lambda: (
        ag.AutoHierarchicalNormalMessenger(model),
        [],
        None,
    ),
    "AutoRegressiveMessenger": lambda: (ag.AutoRegressiveMessenger(model), [], None),
    "nn.Module": _module_guide,
    "PyroModule": _pyro_module_guide,
    "pyro.module in a function": _network_in_function_guide,
    "subsampled per-datum pyro.param": lambda: (local_guide, [], None),
}
LOCAL = {"subsampled per-datum pyro.param"}


def _model_for(kind):
    return local_model if kind in LOCAL else model


def _leaves(extra):
    """Every tensor the guide may read: the param store's leaves and the given module weights."""
    leaves = [pyro.get_param_store()[n].unconstrained() for n in pyro.get_param_store().keys()]
    seen = {id(t) for t in leaves}
    return leaves + [t for t in extra if id(t) not in seen]


def _grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1)
                      for t, g in zip(leaves, grads)])


def reference_path_loss(model, guide, leaves):
    """``-(log p(x, z) - log q_{phi0}(z))`` at one draw ``z(phi)``, with ``phi0`` a constant copy."""
    log_p, log_q = reference_path_terms(model, guide, leaves)
    return -(log_p - log_q)


def reference_path_terms(model, guide, leaves):
    """``(log p(x, z), log q_{phi0}(z))`` at one draw ``z(phi)``, ``phi0`` a constant copy.

    The draw is Pyro's (``Trace_ELBO``'s dispatch); log q_{phi0} replays the guide on clones of
    the draws (new tensors with the same graph) while every leaf is ``requires_grad=False``;
    Delta sites keep their live log density (AutoStructured's, AutoGaussian's Jacobians depend
    on the parameters).
    """
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, poutine.guide.GuideMessenger):
        guide()
        model_trace, guide_trace = unwrapped.get_traces()
        full = unwrapped.trace
    else:
        full = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model, trace=full)).get_trace()
        guide_trace = prune_subsample_sites(full)
    log_p = prune_subsample_sites(model_trace).log_prob_sum()
    fixed = full.copy()
    for name, node in fixed.nodes.items():
        if node["type"] == "sample" and not node["is_observed"]:
            fixed.nodes[name] = {**node, "value": node["value"].clone()}
    flags = [t.requires_grad for t in leaves]
    try:
        for t in leaves:
            t.requires_grad_(False)
        replayed = prune_subsample_sites(
            poutine.trace(poutine.replay(guide, trace=fixed)).get_trace()
        )
        replayed.compute_log_prob()  # while frozen: a real-valued pyro.param *is* its leaf
    finally:
        for t, flag in zip(leaves, flags):
            t.requires_grad_(flag)
    guide_trace.compute_log_prob()
    log_q = sum(
        # a Delta site (an autoguide's Jacobian as log_density) is a change of variables, not a
        # point of q: its whole gradient stays (the path derivative in the auxiliary draws)
        node["log_prob_sum"] if _is_delta(node["fn"]) else replayed.nodes[name]["log_prob_sum"]
        for name, node in guide_trace.nodes.items()
        if node["type"] == "sample"
    )
    return log_p, log_q


def _is_delta(fn):
    while not isinstance(fn, dist.Delta):
        if getattr(fn, "base_dist", None) is None:
            return False
        fn = fn.base_dist
    return True


@pytest.mark.parametrize("kind", list(GUIDES))
def test_stl_gradient_is_the_path_derivative(kind):
    guide, extra, _ = GUIDES[kind]()
    model = _model_for(kind)
    objective = ELBO(1, estimator="stl")
    objective.differentiable_loss(model, guide)  # lazy set-up: parameters, plate nesting
    leaves = _leaves(extra)
    with torch.no_grad():  # off the optimum, and away from any symmetric initialization
        for t in leaves:
            t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    pyro.set_rng_seed(11)
    engine = _grads(objective.differentiable_loss(model, guide), leaves)
    pyro.set_rng_seed(11)
    reference = _grads(reference_path_loss(model, guide, leaves), leaves)
    pyro.set_rng_seed(11)
    pathwise = _grads(ELBO(1).differentiable_loss(model, guide), leaves)
    assert torch.allclose(engine, reference, rtol=0, atol=1e-10), (engine - reference).abs().max()
    # and STL is not the plain pathwise gradient (the direct part is not zero here)
    assert (engine - pathwise).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kind", ["AutoIAFNormal", "AutoNormalizingFlow", "AutoRegressiveMessenger", "nn.Module"]
)
def test_dreg_gradient_is_the_weighted_path_derivative(kind):
    """DReG's guide gradient ``sum_k w~_k^2 d(log p_k - log q_{phi0,k})`` on the same K = 3
    draws (drawn one after another, so the reference can repeat them), against the reference
    path terms; its loss is the IW bound."""
    guide, extra, _ = GUIDES[kind]()
    objective = IWELBO(3, estimator="dreg", vectorize_particles=False)
    objective.differentiable_loss(model, guide)
    leaves = _leaves(extra)
    pyro.set_rng_seed(13)
    engine = _grads(objective.differentiable_loss(model, guide), leaves)
    pyro.set_rng_seed(13)
    terms = [reference_path_terms(model, guide, leaves) for _ in range(3)]
    log_w = torch.stack([log_p - log_q for log_p, log_q in terms])
    weights = torch.softmax(log_w.detach(), 0)
    reference = _grads(-(weights.pow(2) * log_w).sum(), leaves)
    assert reference.abs().max() > 1e-3
    assert torch.allclose(engine, reference, rtol=0, atol=1e-10), (engine - reference).abs().max()


#: the kinds whose family holds the exact posterior (the others: identity only)
EXACT = [
    "scale-wrapped AutoMVN",
    "lambda AutoMVN",
    "blocked AutoMVN",
    "AutoNormalMessenger",
    "nn.Module",
    "PyroModule",
    "pyro.module in a function",
    "subsampled per-datum pyro.param",
]


def _local_exact():
    _store_set(q_loc=LOCAL_X / 2, q_scale=torch.full((6,), math.sqrt(0.5)))


@pytest.mark.parametrize("kind", EXACT)
@pytest.mark.parametrize(
    "make", [lambda: ELBO(2, estimator="stl"), lambda: IWELBO(3, estimator="dreg")],
    ids=["stl", "dreg"],
)
def test_path_estimators_have_zero_variance_at_the_exact_posterior(kind, make):
    guide, extra, exact = GUIDES[kind]()
    exact = _local_exact if kind in LOCAL else exact
    model = _model_for(kind)
    objective = make()
    objective.differentiable_loss(model, guide)  # creates the parameters
    exact()
    leaves = _leaves(extra)
    draws = torch.stack(
        [_grads(objective.differentiable_loss(model, guide), leaves) for _ in range(12)]
    )
    assert draws.var(0).max() < 1e-12
    assert draws.abs().max() < 1e-6  # the gradient at the optimum is zero
    # the same guide off the optimum has a gradient that varies (the test can fail)
    with torch.no_grad():
        leaves[0].add_(0.3)
    draws = torch.stack(
        [_grads(objective.differentiable_loss(model, guide), leaves) for _ in range(4)]
    )
    assert draws.var(0).max() > 1e-6


def test_a_flow_without_an_inverse_is_refused_by_name():
    guide = ag.AutoNormalizingFlow(model, partial(T.iterated, 1, T.block_autoregressive))
    ELBO(1).differentiable_loss(model, guide)  # the pathwise ELBO needs no inverse
    with pytest.raises(NotImplementedError, match="AutoNormalizingFlow.*estimator='reparam'"):
        ELBO(1, estimator="stl").differentiable_loss(model, guide)


# ------------------------------------------------------------------ model parameters


class Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 3)

    def forward(self, z):
        return self.net(z)


def _decoder_pair():
    decoder = Decoder()  # a plain module: no pyro.module, no PyroModule
    x = torch.tensor([[0.4, -0.3, 1.0], [0.1, 0.9, -0.5]])

    def model():
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    guide = ag.AutoNormal(model)
    return model, guide, list(decoder.parameters())


@pytest.mark.parametrize(
    "make", [lambda: IWELBO(4, estimator="dreg"), lambda: InclusiveKL(4)], ids=["dreg", "rws"]
)
def test_plain_module_decoder_gets_the_iwae_model_gradient(make):
    model, guide, weights = _decoder_pair()
    objective, iwae = make(), IWELBO(4)
    objective.differentiable_loss(model, guide)
    iwae.differentiable_loss(model, guide)
    pyro.set_rng_seed(5)
    grads = torch.autograd.grad(objective.differentiable_loss(model, guide), weights)
    pyro.set_rng_seed(5)
    expected = torch.autograd.grad(iwae.differentiable_loss(model, guide), weights)
    for got, want in zip(grads, expected):
        assert want.abs().max() > 1e-3
        assert torch.allclose(got, want, rtol=0, atol=1e-10)
