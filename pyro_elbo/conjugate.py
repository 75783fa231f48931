r"""Exact conjugate "oracles": models whose posterior and evidence are known in closed form.

Each oracle binds a data set to a Pyro model and gives the exact answers a variational method is
judged against: ``posterior()`` (a ``torch.distributions.Distribution`` over the latent site, in
the constrained space) and ``log_evidence()`` (log p(x), a 0-dim tensor).  Every model samples its
latents globally, observes the data in ``pyro.plate("data", N, subsample_size=..., dim=-1)``
(site ``"obs"``) and vectorizes under an outer particle plate at dim -2.

Notation: N data points x_1..x_N, S = sum_i x_i, xbar = S / N, SS = sum_i (x_i - xbar)^2.

``NormalNormal`` (per dimension d when the data are (N, D); the dimensions are independent)::

    loc ~ Normal(m0, s0),  x_i ~ Normal(loc, s)
    posterior:  Normal(m_n, s_n),  1/s_n^2 = 1/s0^2 + N/s^2,  m_n = s_n^2 (m0/s0^2 + S/s^2)
    log p(x) = -N/2 log(2 pi s^2) - SS/(2 s^2) + 1/2 log(s^2 / (s^2 + N s0^2))
               - N (xbar - m0)^2 / (2 (s^2 + N s0^2))

``LinearRegression`` (X is N x D, prior precision P0 = diag(1/s0^2), noise scale s)::

    w ~ Normal(0, s0 I),  y_i ~ Normal(x_i . w, s)
    posterior:  MultivariateNormal(m, Lambda^-1),  Lambda = P0 + X^T X / s^2,
                m = Lambda^-1 X^T y / s^2
    log p(y) = -N/2 log(2 pi s^2) - sum_d log s0_d - 1/2 log|Lambda|
               - 1/2 (|y - X m|^2 / s^2 + m^T P0 m)
    (equivalently y ~ MultivariateNormal(0, s^2 I + X diag(s0^2) X^T))

``BetaBernoulli``::

    p ~ Beta(a, b),  x_i ~ Bernoulli(p)
    posterior:  Beta(a + S, b + N - S)
    log p(x) = log B(a + S, b + N - S) - log B(a, b)

``GammaPoisson`` (Gamma with shape a and rate b)::

    r ~ Gamma(a, b),  x_i ~ Poisson(r)
    posterior:  Gamma(a + S, b + N)
    log p(x) = a log b - log Gamma(a) + log Gamma(a + S) - (a + S) log(b + N)
               - sum_i log(x_i!)

``DirichletCategorical`` (K categories, counts n_k = #{i : x_i = k}, A = sum_k alpha_k)::

    p ~ Dirichlet(alpha),  x_i ~ Categorical(p)
    posterior:  Dirichlet(alpha + n)
    log p(x) = log Gamma(A) - log Gamma(A + N) + sum_k [log Gamma(alpha_k + n_k) - log Gamma(alpha_k)]

``NormalGamma`` (not mean-field; precision tau, prior loc m0, pseudo-count kappa)::

    tau ~ Gamma(a, b),  loc | tau ~ Normal(m0, 1/sqrt(kappa tau)),  x_i ~ Normal(loc, 1/sqrt(tau))
    posterior:  tau ~ Gamma(a_n, b_n),  loc | tau ~ Normal(m_n, 1/sqrt(kappa_n tau)),
                kappa_n = kappa + N,  m_n = (kappa m0 + S) / kappa_n,  a_n = a + N/2,
                b_n = b + SS/2 + kappa N (xbar - m0)^2 / (2 kappa_n)
    marginal of loc:  StudentT(2 a_n, m_n, sqrt(b_n / (a_n kappa_n)))
    log p(x) = log Gamma(a_n) - log Gamma(a) + a log b - a_n log b_n + 1/2 log(kappa / kappa_n)
               - N/2 log(2 pi)

Hyperparameters may be floats or tensors; they are converted to the floating dtype of the data
(the first floating-point tensor among data and hyperparameters, else torch's default dtype).
Bad inputs raise ``ValueError`` with a message that names the argument.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = [
    "BetaBernoulli",
    "ConjugateOracle",
    "DirichletCategorical",
    "GammaPoisson",
    "LinearRegression",
    "NormalGamma",
    "NormalGammaPosterior",
    "NormalNormal",
]


_SCALAR_SHAPE = torch.Size()

# ----------------------------------------------------------------------------------------------
# input checks


def _infer_dtype(*values) -> torch.dtype:
    """The dtype of the first floating-point tensor-like value, else torch's default dtype."""
    for value in values:
        if value is None or isinstance(value, (bool, int, float)):
            continue
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _tensor(name: str, value, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a finite tensor (converted to ``dtype`` when given)."""
    try:
        t = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} could not be converted to a tensor: {e}") from e
    if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return t


def _param(
    name: str, value, dtype: torch.dtype, shape=(), *, positive: bool = False
) -> torch.Tensor:
    """A hyperparameter broadcast to ``shape``; ``positive`` asks for > 0."""
    t = _tensor(name, value, dtype)
    shape = torch.Size(shape)
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (or broadcast to it), got {tuple(t.shape)}"
        )
    if positive and (t <= 0).any():
        raise ValueError(f"{name} must be positive, got a minimum of {t.min().item()}")
    return t.expand(shape)


def _truth(name: str, value, dtype: torch.dtype, shape, support) -> torch.Tensor:
    """A user-given true parameter for ``simulate``: right shape and inside ``support``."""
    t = _param(name, value, dtype, shape).clone()
    if not bool(support.check(t).all()):
        raise ValueError(f"{name} must lie in the support of the prior ({support}), got {t}")
    return t


def _num_data(num_data) -> int:
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
    return num_data


def _check_vector(name: str, t: torch.Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(t.shape)}")


def _integer_valued(name: str, data) -> torch.Tensor:
    """Finite data whose values are all integers, as int64."""
    t = _tensor(name, data)
    if t.dtype == torch.bool:
        t = t.long()
    if t.is_floating_point() and not (t == t.round()).all():
        raise ValueError(f"{name} must hold integer values")
    if t.is_complex():
        raise ValueError(f"{name} must be real")
    return t.long()


# ----------------------------------------------------------------------------------------------
# base class


class ConjugateOracle:
    """Shared parts of the oracles: data size, site names, the data plate and the repr.

    Subclasses set ``latents`` (the latent site names, in the model's order) and define
    ``model``, ``posterior`` and ``log_evidence``.  ``true_params`` is ``None`` unless the
    oracle was built by ``simulate``, which stores the true latent values there by site name.
    """

    latents: tuple[str, ...] = ()
    observed: str = "obs"
    """Name of the observed sample site."""

    def __init__(self, num_data: int, dtype: torch.dtype):
        if num_data < 1:
            raise ValueError("data must contain at least one observation")
        self.num_data = int(num_data)
        self.dtype = dtype
        self.true_params: dict[str, torch.Tensor] | None = None

    @property
    def latent(self) -> str | None:
        """The latent site name of a single-site oracle (``None`` when there are several)."""
        return self.latents[0] if len(self.latents) == 1 else None

    def _plate(self, subsample_size: int | None = None) -> pyro.plate:
        device = getattr(self, "data", getattr(self, "y", None))
        device = device.device if isinstance(device, torch.Tensor) else None
        return pyro.plate(
            "data", self.num_data, subsample_size=subsample_size, dim=-1, device=device
        )

    def to(self, device) -> ConjugateOracle:
        """Move data and hyperparameters to ``device`` (e.g. ``"cuda"``), in place; returns self."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, dict):
                setattr(
                    self,
                    name,
                    {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()},
                )
        return self

    def _repr_fields(self) -> dict:
        return {"N": self.num_data}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def model(self, subsample_size: int | None = None):
        raise NotImplementedError

    def posterior(self):
        raise NotImplementedError

    def log_evidence(self) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# oracles


class NormalNormal(ConjugateOracle):
    """Normal mean with known scale: ``loc ~ Normal(prior_loc, prior_scale)``,
    ``x_i ~ Normal(loc, obs_scale)``.

    ``data`` of shape (N,) gives a scalar ``loc``; (N, D) gives ``loc`` of shape (D,) (a
    ``to_event(1)`` site), and the three hyperparameters may then be scalars or (D,) tensors.
    """

    latents = ("loc",)

    def __init__(self, data, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0):
        dtype = _infer_dtype(data, prior_loc, prior_scale, obs_scale)
        data = _tensor("data", data, dtype)
        if data.dim() not in (1, 2) or (data.dim() == 2 and data.shape[1] == 0):
            raise ValueError(f"data must have shape (N,) or (N, D), got {tuple(data.shape)}")
        super().__init__(data.shape[0], dtype)
        self.data = data
        self.event_shape = data.shape[1:]
        hyper = self._hyper(dtype, self.event_shape, prior_loc, prior_scale, obs_scale)
        self.prior_loc, self.prior_scale, self.obs_scale = hyper

    @staticmethod
    def _hyper(dtype, event_shape, prior_loc=0.0, prior_scale=1.0, obs_scale=1.0):
        return (
            _param("prior_loc", prior_loc, dtype, event_shape),
            _param("prior_scale", prior_scale, dtype, event_shape, positive=True),
            _param("obs_scale", obs_scale, dtype, event_shape, positive=True),
        )

    @property
    def dim(self) -> int | None:
        """D for (N, D) data, ``None`` for (N,) data."""
        return self.event_shape[0] if self.event_shape else None

    def _repr_fields(self):
        fields = super()._repr_fields()
        if self.dim is not None:
            fields["D"] = self.dim
        return fields

    def _wrap(self, d):
        return d.to_event(1) if self.event_shape else d

    def model(self, subsample_size=None):
        loc = pyro.sample("loc", self._wrap(dist.Normal(self.prior_loc, self.prior_scale)))
        with self._plate(subsample_size) as idx:
            pyro.sample(
                "obs",
                self._wrap(dist.Normal(loc, self.obs_scale)),
                obs=self.data.index_select(0, idx),
            )
        return loc

    def posterior(self):
        precision = self.prior_scale.pow(-2) + self.num_data * self.obs_scale.pow(-2)
        var = precision.reciprocal()
        mean = var * (
            self.prior_loc * self.prior_scale.pow(-2) + self.data.sum(0) * self.obs_scale.pow(-2)
        )
        return self._wrap(dist.Normal(mean, var.sqrt()))

    def log_evidence(self):
        n = self.num_data
        s2, s02 = self.obs_scale.pow(2), self.prior_scale.pow(2)
        xbar = self.data.mean(0)
        ss = (self.data - xbar).pow(2).sum(0)
        marg_var = s2 + n * s02
        per_dim = (
            -0.5 * n * torch.log(2 * math.pi * s2)
            - 0.5 * ss / s2
            + 0.5 * torch.log(s2 / marg_var)
            - 0.5 * n * (xbar - self.prior_loc).pow(2) / marg_var
        )
        return per_dim.sum()

    @classmethod
    def simulate(cls, num_data, dim=None, *, true_loc=None, seed=0, dtype=None, **hyper):
        """Draw ``loc`` from the prior (or use ``true_loc``) and N observations given it.

        ``dim=None`` gives (N,) data, ``dim=D`` gives (N, D) data.  ``dtype`` defaults to that
        of the tensors passed, else torch's default dtype.
        """
        num_data = _num_data(num_data)
        event_shape = torch.Size(() if dim is None else (dim,))
        dtype = dtype or _infer_dtype(true_loc, *hyper.values())
        prior_loc, prior_scale, obs_scale = cls._hyper(dtype, event_shape, **hyper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if true_loc is None:
                loc = torch.distributions.Normal(prior_loc, prior_scale).sample()
            else:
                loc = _truth("true_loc", true_loc, dtype, event_shape, constraints.real)
            data = torch.distributions.Normal(loc, obs_scale).sample((num_data,))
        oracle = cls(data, prior_loc, prior_scale, obs_scale)
        oracle.true_params = {"loc": loc}
        return oracle


class LinearRegression(ConjugateOracle):
    """Bayesian linear regression with known noise: ``w ~ Normal(0, prior_scale).to_event(1)``,
    ``y_i ~ Normal(x_i . w, noise_scale)``.  ``prior_scale`` may be a scalar or a (D,) tensor;
    ``noise_scale`` is a scalar.  The posterior is a ``MultivariateNormal``.
    """

    latents = ("weights",)

    def __init__(self, X, y, prior_scale=1.0, noise_scale=1.0):
        dtype = _infer_dtype(X, y, prior_scale, noise_scale)
        X, y = _tensor("X", X, dtype), _tensor("y", y, dtype)
        if X.dim() != 2 or X.shape[1] == 0:
            raise ValueError(f"X must have shape (N, D) with D >= 1, got {tuple(X.shape)}")
        if y.dim() != 1:
            raise ValueError(f"y must have shape (N,), got {tuple(y.shape)}")
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} entries")
        super().__init__(X.shape[0], dtype)
        self.X, self.y = X, y
        self.prior_scale, self.noise_scale = self._hyper(
            dtype, X.shape[1], prior_scale, noise_scale
        )

    @staticmethod
    def _hyper(dtype, dim, prior_scale=1.0, noise_scale=1.0):
        return (
            _param("prior_scale", prior_scale, dtype, (dim,), positive=True),
            _param("noise_scale", noise_scale, dtype, (), positive=True),
        )

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def _repr_fields(self):
        return {**super()._repr_fields(), "D": self.dim}

    def model(self, subsample_size=None):
        prior = dist.Normal(torch.zeros_like(self.prior_scale), self.prior_scale).to_event(1)
        w = pyro.sample("weights", prior)
        with self._plate(subsample_size) as idx:
            X = self.X.index_select(0, idx)
            # w has shape batch + (D,) with the data dim of batch of size 1 (e.g. (K, 1, D)
            # under a particle plate): X * w broadcasts to batch + (n, D).
            mean = (X * w).sum(-1)
            pyro.sample("obs", dist.Normal(mean, self.noise_scale), obs=self.y.index_select(0, idx))
        return w

    def _posterior_parts(self):
        noise_prec = self.noise_scale.pow(-2)
        prior_prec = self.prior_scale.pow(-2)
        precision = torch.diag_embed(prior_prec) + noise_prec * (self.X.T @ self.X)
        chol = torch.linalg.cholesky(precision)
        rhs = noise_prec * (self.X.T @ self.y)
        mean = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        return mean, precision, chol

    def posterior(self):
        mean, precision, _ = self._posterior_parts()
        return dist.MultivariateNormal(mean, precision_matrix=precision)

    def log_evidence(self):
        mean, _, chol = self._posterior_parts()
        s2 = self.noise_scale.pow(2)
        resid = self.y - self.X @ mean
        quad = resid.pow(2).sum() / s2 + (mean.pow(2) * self.prior_scale.pow(-2)).sum()
        return (
            -0.5 * self.num_data * torch.log(2 * math.pi * s2)
            - self.prior_scale.log().sum()
            - chol.diagonal().log().sum()
            - 0.5 * quad
        )

    @classmethod
    def simulate(cls, num_data, dim, *, true_weights=None, seed=0, dtype=None, **hyper):
        """Draw X with i.i.d. standard normal entries, ``w`` from the prior (or use
        ``true_weights``) and ``y`` given them."""
        num_data = _num_data(num_data)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dtype = dtype or _infer_dtype(true_weights, *hyper.values())
        prior_scale, noise_scale = cls._hyper(dtype, dim, **hyper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            X = torch.randn(num_data, dim, dtype=dtype)
            if true_weights is None:
                w = torch.distributions.Normal(torch.zeros_like(prior_scale), prior_scale).sample()
            else:
                w = _truth("true_weights", true_weights, dtype, (dim,), constraints.real)
            y = torch.distributions.Normal(X @ w, noise_scale).sample()
        oracle = cls(X, y, prior_scale, noise_scale)
        oracle.true_params = {"weights": w}
        return oracle


class BetaBernoulli(ConjugateOracle):
    """Coin flips: ``probs ~ Beta(concentration1, concentration0)``, ``x_i ~ Bernoulli(probs)``."""

    latents = ("probs",)

    def __init__(self, data, concentration1=1.0, concentration0=1.0):
        dtype = _infer_dtype(data, concentration1, concentration0)
        data = _tensor("data", data)
        _check_vector("data", data)
        if not ((data == 0) | (data == 1)).all():
            raise ValueError("data must hold only 0/1 values")
        super().__init__(data.shape[0], dtype)
        self.data = data.to(dtype)
        self.concentration1, self.concentration0 = self._hyper(
            dtype, concentration1, concentration0
        )

    @staticmethod
    def _hyper(dtype, concentration1=1.0, concentration0=1.0):
        return (
            _param("concentration1", concentration1, dtype, positive=True),
            _param("concentration0", concentration0, dtype, positive=True),
        )

    def model(self, subsample_size=None):
        probs = pyro.sample("probs", dist.Beta(self.concentration1, self.concentration0))
        with self._plate(subsample_size) as idx:
            pyro.sample("obs", dist.Bernoulli(probs), obs=self.data.index_select(0, idx))
        return probs

    def _posterior_params(self):
        heads = self.data.sum()
        return self.concentration1 + heads, self.concentration0 + self.num_data - heads

    def posterior(self):
        return dist.Beta(*self._posterior_params())

    def log_evidence(self):
        def log_beta(a, b):
            return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

        a_n, b_n = self._posterior_params()
        return log_beta(a_n, b_n) - log_beta(self.concentration1, self.concentration0)

    @classmethod
    def simulate(cls, num_data, *, true_probs=None, seed=0, dtype=None, **hyper):
        """Draw ``probs`` from the prior (or use ``true_probs``) and N flips given it."""
        num_data = _num_data(num_data)
        dtype = dtype or _infer_dtype(true_probs, *hyper.values())
        c1, c0 = cls._hyper(dtype, **hyper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if true_probs is None:
                probs = torch.distributions.Beta(c1, c0).sample()
            else:
                probs = _truth("true_probs", true_probs, dtype, (), constraints.unit_interval)
            data = torch.distributions.Bernoulli(probs).sample((num_data,))
        oracle = cls(data, c1, c0)
        oracle.true_params = {"probs": probs}
        return oracle


class GammaPoisson(ConjugateOracle):
    """Counts: ``rate ~ Gamma(concentration, rate)`` (shape/rate), ``x_i ~ Poisson(rate)``.

    The latent site is named ``"rate"``; the hyperparameter of the same name is the Gamma
    prior's rate and is stored as ``prior_rate``.
    """

    latents = ("rate",)

    def __init__(self, data, concentration=1.0, rate=1.0):
        dtype = _infer_dtype(data, concentration, rate)
        data = _integer_valued("data", data)
        _check_vector("data", data)
        if (data < 0).any():
            raise ValueError("data must hold non-negative integer counts")
        super().__init__(data.shape[0], dtype)
        self.data = data.to(dtype)
        self.concentration, self.prior_rate = self._hyper(dtype, concentration, rate)

    @staticmethod
    def _hyper(dtype, concentration=1.0, rate=1.0):
        return (
            _param("concentration", concentration, dtype, positive=True),
            _param("rate", rate, dtype, positive=True),
        )

    def model(self, subsample_size=None):
        rate = pyro.sample("rate", dist.Gamma(self.concentration, self.prior_rate))
        with self._plate(subsample_size) as idx:
            pyro.sample("obs", dist.Poisson(rate), obs=self.data.index_select(0, idx))
        return rate

    def _posterior_params(self):
        return self.concentration + self.data.sum(), self.prior_rate + self.num_data

    def posterior(self):
        return dist.Gamma(*self._posterior_params())

    def log_evidence(self):
        a, b = self.concentration, self.prior_rate
        a_n, b_n = self._posterior_params()
        return (
            a * b.log()
            - torch.lgamma(a)
            + torch.lgamma(a_n)
            - a_n * b_n.log()
            - torch.lgamma(self.data + 1).sum()
        )

    @classmethod
    def simulate(cls, num_data, *, true_rate=None, seed=0, dtype=None, **hyper):
        """Draw the Poisson rate from the prior (or use ``true_rate``) and N counts given it."""
        num_data = _num_data(num_data)
        dtype = dtype or _infer_dtype(true_rate, *hyper.values())
        concentration, prior_rate = cls._hyper(dtype, **hyper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if true_rate is None:
                rate = torch.distributions.Gamma(concentration, prior_rate).sample()
            else:
                rate = _truth("true_rate", true_rate, dtype, (), constraints.positive)
            data = torch.distributions.Poisson(rate).sample((num_data,))
        oracle = cls(data, concentration, prior_rate)
        oracle.true_params = {"rate": rate}
        return oracle


class DirichletCategorical(ConjugateOracle):
    """Categories: ``probs ~ Dirichlet(concentration)``, ``x_i ~ Categorical(probs)``.

    ``data`` holds integers in [0, K) where K = len(concentration) >= 2; it is stored as int64.
    """

    latents = ("probs",)

    def __init__(self, data, concentration):
        dtype = _infer_dtype(data, concentration)
        concentration = self._check_concentration(concentration, dtype)
        data = _integer_valued("data", data)
        _check_vector("data", data)
        k = concentration.shape[0]
        if ((data < 0) | (data >= k)).any():
            raise ValueError(f"data must hold categories in [0, {k}), got values outside")
        super().__init__(data.shape[0], dtype)
        self.data = data
        self.concentration = concentration

    @staticmethod
    def _check_concentration(concentration, dtype):
        t = _tensor("concentration", concentration, dtype)
        if t.dim() != 1 or t.shape[0] < 2:
            raise ValueError(
                f"concentration must have shape (K,) with K >= 2, got {tuple(t.shape)}"
            )
        return _param("concentration", t, dtype, t.shape, positive=True)

    @property
    def num_categories(self) -> int:
        return self.concentration.shape[0]

    def _repr_fields(self):
        return {**super()._repr_fields(), "K": self.num_categories}

    def model(self, subsample_size=None):
        probs = pyro.sample("probs", dist.Dirichlet(self.concentration))
        with self._plate(subsample_size) as idx:
            pyro.sample("obs", dist.Categorical(probs=probs), obs=self.data.index_select(0, idx))
        return probs

    def _posterior_concentration(self):
        counts = torch.bincount(self.data, minlength=self.num_categories)
        return self.concentration + counts.to(self.dtype)

    def posterior(self):
        return dist.Dirichlet(self._posterior_concentration())

    def log_evidence(self):
        alpha, alpha_n = self.concentration, self._posterior_concentration()
        total = alpha.sum()
        return (
            torch.lgamma(total)
            - torch.lgamma(total + self.num_data)
            + (torch.lgamma(alpha_n) - torch.lgamma(alpha)).sum()
        )

    @classmethod
    def simulate(
        cls, num_data, num_categories=3, *, true_probs=None, seed=0, dtype=None, concentration=None
    ):
        """Draw ``probs`` from the prior (or use ``true_probs``) and N categories given it.

        ``concentration`` defaults to ``ones(num_categories)``; when given, it sets K.
        """
        num_data = _num_data(num_data)
        dtype = dtype or _infer_dtype(true_probs, concentration)
        if concentration is None:
            if (
                isinstance(num_categories, bool)
                or not isinstance(num_categories, int)
                or (num_categories < 2)
            ):
                raise ValueError(f"num_categories must be an integer >= 2, got {num_categories!r}")
            concentration = torch.ones(num_categories, dtype=dtype)
        concentration = cls._check_concentration(concentration, dtype)
        k = concentration.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if true_probs is None:
                probs = torch.distributions.Dirichlet(concentration).sample()
            else:
                probs = _truth("true_probs", true_probs, dtype, (k,), constraints.simplex)
            data = torch.distributions.Categorical(probs=probs).sample((num_data,))
        oracle = cls(data, concentration)
        oracle.true_params = {"probs": probs}
        return oracle


class NormalGammaPosterior:
    """Exact joint posterior of :class:`NormalGamma`, a Normal-Gamma distribution::

        precision ~ Gamma(concentration, rate)
        loc | precision ~ Normal(loc, 1 / sqrt(kappa * precision))

    Not a ``torch.distributions.Distribution`` (the two sites have different supports); it
    works on dicts keyed by site name:

    * ``sample(sample_shape)`` / ``rsample(sample_shape)`` -> ``{"precision": t, "loc": t}``;
    * ``log_prob(values)`` -> the joint log density of a dict of values;
    * ``marginal("precision")`` -> ``Gamma(concentration, rate)``; ``marginal("loc")`` ->
      ``StudentT(2 concentration, loc, sqrt(rate / (concentration * kappa)))``;
    * ``conditional_loc(precision)`` -> the Normal of ``loc`` given ``precision``;
    * ``mean`` / ``variance`` -> dicts of the marginal moments (the variance of ``loc`` is
      infinite when ``concentration <= 1``).
    """

    latents = ("precision", "loc")

    def __init__(self, loc, kappa, concentration, rate):
        self.loc, self.kappa = loc, kappa
        self.concentration, self.rate = concentration, rate

    def conditional_loc(self, precision) -> dist.Normal:
        return dist.Normal(self.loc, (self.kappa * precision).rsqrt())

    def marginal(self, name: str) -> torch.distributions.Distribution:
        if name == "precision":
            return dist.Gamma(self.concentration, self.rate)
        if name == "loc":
            scale = (self.rate / (self.concentration * self.kappa)).sqrt()
            return dist.StudentT(2 * self.concentration, self.loc, scale)
        raise ValueError(f"name must be one of {self.latents}, got {name!r}")

    def sample(self, sample_shape=_SCALAR_SHAPE) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample(self, sample_shape=_SCALAR_SHAPE) -> dict[str, torch.Tensor]:
        precision = self.marginal("precision").rsample(sample_shape)
        return {"precision": precision, "loc": self.conditional_loc(precision).rsample()}

    def log_prob(self, values: dict) -> torch.Tensor:
        precision = torch.as_tensor(values["precision"], dtype=self.loc.dtype)
        loc = torch.as_tensor(values["loc"], dtype=self.loc.dtype)
        return self.marginal("precision").log_prob(precision) + self.conditional_loc(
            precision
        ).log_prob(loc)

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return {name: self.marginal(name).mean for name in self.latents}

    @property
    def variance(self) -> dict[str, torch.Tensor]:
        return {name: self.marginal(name).variance for name in self.latents}

    def __repr__(self) -> str:
        return (
            f"NormalGammaPosterior(loc={self.loc.item():.4g}, kappa={self.kappa.item():.4g}, "
            f"concentration={self.concentration.item():.4g}, rate={self.rate.item():.4g})"
        )


class NormalGamma(ConjugateOracle):
    """Normal with unknown mean and precision (not mean-field)::

        precision ~ Gamma(concentration, rate)
        loc ~ Normal(loc, 1 / sqrt(kappa * precision))
        x_i ~ Normal(loc, 1 / sqrt(precision))

    ``latents = ("precision", "loc")``.  There are two latent sites, so ``latent`` is ``None``
    and ``posterior()`` returns a :class:`NormalGammaPosterior` (a joint over a dict of values)
    instead of a single ``Distribution``.  The prior hyperparameter ``loc`` is stored as
    ``prior_loc`` (``loc`` is also the latent site's name).
    """

    latents = ("precision", "loc")

    def __init__(self, data, loc=0.0, kappa=1.0, concentration=1.0, rate=1.0):
        dtype = _infer_dtype(data, loc, kappa, concentration, rate)
        data = _tensor("data", data, dtype)
        _check_vector("data", data)
        super().__init__(data.shape[0], dtype)
        self.data = data
        self.prior_loc, self.kappa, self.concentration, self.rate = self._hyper(
            dtype, loc, kappa, concentration, rate
        )

    @staticmethod
    def _hyper(dtype, loc=0.0, kappa=1.0, concentration=1.0, rate=1.0):
        return (
            _param("loc", loc, dtype),
            _param("kappa", kappa, dtype, positive=True),
            _param("concentration", concentration, dtype, positive=True),
            _param("rate", rate, dtype, positive=True),
        )

    def model(self, subsample_size=None):
        precision = pyro.sample("precision", dist.Gamma(self.concentration, self.rate))
        loc = pyro.sample("loc", dist.Normal(self.prior_loc, (self.kappa * precision).rsqrt()))
        with self._plate(subsample_size) as idx:
            pyro.sample(
                "obs", dist.Normal(loc, precision.rsqrt()), obs=self.data.index_select(0, idx)
            )
        return {"precision": precision, "loc": loc}

    def _posterior_params(self):
        n = self.num_data
        xbar = self.data.mean()
        ss = (self.data - xbar).pow(2).sum()
        kappa_n = self.kappa + n
        loc_n = (self.kappa * self.prior_loc + n * xbar) / kappa_n
        conc_n = self.concentration + 0.5 * n
        rate_n = (
            self.rate + 0.5 * ss + 0.5 * self.kappa * n * (xbar - self.prior_loc).pow(2) / kappa_n
        )
        return loc_n, kappa_n, conc_n, rate_n

    def posterior(self) -> NormalGammaPosterior:
        return NormalGammaPosterior(*self._posterior_params())

    def log_evidence(self):
        _, kappa_n, conc_n, rate_n = self._posterior_params()
        a, b = self.concentration, self.rate
        return (
            torch.lgamma(conc_n)
            - torch.lgamma(a)
            + a * b.log()
            - conc_n * rate_n.log()
            + 0.5 * (self.kappa / kappa_n).log()
            - 0.5 * self.num_data * math.log(2 * math.pi)
        )

    @classmethod
    def simulate(cls, num_data, *, true_precision=None, true_loc=None, seed=0, dtype=None, **hyper):
        """Draw (precision, loc) from the prior and N observations given them.

        ``true_precision`` / ``true_loc`` fix either or both; a drawn ``loc`` is drawn given the
        (drawn or given) precision.
        """
        num_data = _num_data(num_data)
        dtype = dtype or _infer_dtype(true_precision, true_loc, *hyper.values())
        loc0, kappa, conc, rate = cls._hyper(dtype, **hyper)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if true_precision is None:
                precision = torch.distributions.Gamma(conc, rate).sample()
            else:
                precision = _truth(
                    "true_precision", true_precision, dtype, (), constraints.positive
                )
            if true_loc is None:
                loc = torch.distributions.Normal(loc0, (kappa * precision).rsqrt()).sample()
            else:
                loc = _truth("true_loc", true_loc, dtype, (), constraints.real)
            data = torch.distributions.Normal(loc, precision.rsqrt()).sample((num_data,))
        oracle = cls(data, loc0, kappa, conc, rate)
        oracle.true_params = {"precision": precision, "loc": loc}
        return oracle
