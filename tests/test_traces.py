"""The trace service (engine/traces.py): a side run leaves the user's random stream, autograd and
enclosing handlers as they were."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_elbo.engine.traces import quietly, side_trace_pair


def model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def test_side_run_keeps_the_random_stream_and_enclosing_trace():
    pyro.clear_param_store()
    data = torch.tensor([0.5, 1.5])
    guide = AutoNormal(model)
    torch.manual_seed(3)
    expected = torch.randn(4)
    torch.manual_seed(3)
    with poutine.trace() as outer:
        model_trace, guide_trace = side_trace_pair(model, guide, (data,), {})
    assert torch.equal(torch.randn(4), expected)
    assert len(outer.trace.nodes) == 0  # blocked: the enclosing handler saw nothing
    assert "loc" in guide_trace.nodes and "obs" in model_trace.nodes
    assert model_trace.nodes["loc"]["value"] is guide_trace.nodes["loc"]["value"]
    assert not model_trace.log_prob_sum().requires_grad  # no graph unless asked


def test_side_run_with_grad_and_without_fork():
    pyro.clear_param_store()
    data = torch.tensor([0.5, 1.5])
    guide = AutoNormal(model)
    model_trace, guide_trace = side_trace_pair(model, guide, (data,), {}, grad=True)
    assert guide_trace.log_prob_sum().requires_grad
    torch.manual_seed(3)
    with quietly(fork=False):
        torch.randn(1)
    after_unforked = torch.randn(4)
    torch.manual_seed(3)
    torch.randn(1)
    assert torch.equal(torch.randn(4), after_unforked)


def test_validation_is_set_for_the_side_run_and_restored():
    before = pyro.infer.util.is_validation_enabled()
    with quietly(validate=not before):
        assert pyro.infer.util.is_validation_enabled() is (not before)
    assert pyro.infer.util.is_validation_enabled() is before
