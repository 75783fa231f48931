"""NumPyro contenders for the benchmark problems (optional: ``pip install -e ".[bench]"``).

Each builds the same model on the same data as :mod:`benchmarks.models`, the same autoguide
(``AutoNormal`` or ``AutoMultivariateNormal``), NumPyro's ``Trace_ELBO(num_particles=K)`` and
``optax``-free ``numpyro.optim.Adam``, and times ``jax.jit(svi.update)``: NumPyro's fastest
ordinary path.  The VAE has no contender: a NumPyro VAE needs a neural-network library (flax or
haiku), which the ``bench`` extra does not install.

XLA is held to one thread (``XLA_FLAGS``), as torch is, so that the ratios compare work, not
thread counts.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


def available() -> bool:
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return True


def _jitted_step(model, guide_cls, args, num_particles, lr, seed=0):
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    guide = guide_cls(model)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=num_particles))
    state = svi.init(jax.random.PRNGKey(seed), *args)
    update = jax.jit(svi.update)
    holder = [state]

    def step():
        holder[0], loss = update(holder[0], *args)
        return float(loss)  # blocks until the step is done

    return step


def logistic(X, y, num_particles, lr):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.autoguide import AutoNormal

    X, y = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())
    dim = X.shape[1]

    def model(X, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)

    return _jitted_step(model, AutoNormal, (X, y), num_particles, lr)


def hierarchical(group, y, num_groups, num_particles, lr):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.autoguide import AutoNormal

    group, y = jnp.asarray(group.numpy()), jnp.asarray(y.numpy())

    def model(group, y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfNormal(2.0))
        with numpyro.plate("groups", num_groups):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(theta[group], 0.5), obs=y)

    return _jitted_step(model, AutoNormal, (group, y), num_particles, lr)


def linear_regression(X, y, prior_scale, noise_scale, num_particles, lr):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.autoguide import AutoMultivariateNormal

    X, y = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())
    prior_scale = jnp.broadcast_to(jnp.asarray(prior_scale), (X.shape[1],))

    def model(X, y):
        w = numpyro.sample("weights", dist.Normal(0.0, prior_scale).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("obs", dist.Normal(X @ w, noise_scale), obs=y)

    return _jitted_step(model, AutoMultivariateNormal, (X, y), num_particles, lr)
