"""The small logistic regression the compiled-step tests share (test_fast.py,
test_fast_whitened.py): 40 rows, 3 weights and a LogNormal scale on the logits."""

import pyro
import pyro.distributions as dist
import torch

GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=GEN)
Y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5])), generator=GEN)


def model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1) * s), obs=y)
