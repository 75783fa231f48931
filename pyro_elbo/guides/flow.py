r"""``AutoRealNVP``: a Real-NVP flow on top of a Gaussian fit, for posteriors that are not Gaussian.

The guide draws the flat unconstrained latent vector as

.. math::

    \varepsilon \sim N(0, I_D), \qquad
    u = m_0 + L_0 \bigl(a + T\, f_K \circ \dots \circ f_1(\varepsilon)\bigr),

where ``(m_0, L_0)`` is a Gaussian answer held fixed (the Laplace / Gaussian-VI fit the flow
starts from), ``a`` (zeros) and the lower-triangular ``T`` (identity) are trained in the whitened
coordinates of that Gaussian, and each ``f_k`` is an affine coupling layer (Dinh, Sohl-Dickstein
& Bengio 2017, "Density estimation using Real NVP";
:class:`pyro.distributions.transforms.AffineCoupling`): a subset ``A_k`` of the coordinates
passes unchanged and sets the shift and log-scale of the others,
``y_B = x_B \odot \exp(s_k(x_A)) + t_k(x_A)``, with a two-hidden-layer network ``(t_k, s_k)``
whose output layer starts at zero, so every ``f_k`` starts as the identity and **the guide starts
exactly at the Gaussian it is built on**.  ``A_k`` follows the bits of the coordinate index
(layer ``2b``: coordinates whose bit ``b`` is set, layer ``2b + 1``: the others), so every
ordered pair of coordinates ``(i, j)`` has a layer where ``i`` sets ``j``'s scale: a funnel's
log-scale coordinate reaches every coordinate it scales, whatever their order.

Training, as Agrawal, Sheldon & Domke (2020, "Advances in black-box VI: normalizing flows,
importance weighting, and optimization", NeurIPS) recommend: sticking the landing (Roeder et al.
2017), a batch of particles, a fixed small Adam step; then importance-weighted (PSIS) draws.
:func:`flow_objective` and :func:`flow_optimizer` are those defaults.

**STL is correct by construction.**  STL needs ``log q`` with the parameters held constant at
the sampled ``u`` (equivalently, the direct part ``grad_phi log q_phi(stop(u))`` to subtract).
``get_posterior`` builds its transform afresh on every call, from ``pyro.param`` values, and the
transform remembers only the one ``(epsilon, u)`` pair it produced: ``log_prob`` at any other
tensor (a detached copy of ``u``, or ``u`` under another guide call with detached parameters)
inverts the flow exactly (affine couplings have a closed-form inverse) instead of returning the
cached noise ``epsilon`` of the sampling pass, which would silently turn STL into the plain
reparameterization gradient.  ``tests/test_flow.py`` checks the STL gradient is exactly zero
when q is the posterior, and the plain reparameterization gradient is not.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch.distributions import constraints
from torch.distributions.transforms import Transform

__all__ = [
    "AutoRealNVP",
    "FLOW_LR",
    "FLOW_PARTICLES",
    "flow_objective",
    "flow_optimizer",
    "gaussian_base",
]

#: particles per step of the flow stage (Agrawal et al. 2020 use batches of 10-100+)
FLOW_PARTICLES = 32
#: the fixed Adam step of the flow stage (all parameters live in whitened coordinates)
FLOW_LR = 5e-3


def gaussian_base(guide, *args, **kwargs):
    """``(loc, scale_tril)`` of a fitted Gaussian autoguide over the flat unconstrained latent
    vector (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
    AutoLowRankMultivariateNormal), detached."""
    from pyro_elbo.guides.posterior import posterior_of

    base = posterior_of(guide, *args, joint=True).base
    loc = base.mean.detach()
    if isinstance(base, torch.distributions.MultivariateNormal):
        return loc, base.scale_tril.detach()
    if isinstance(base, torch.distributions.LowRankMultivariateNormal):
        return loc, torch.linalg.cholesky(base.covariance_matrix.detach())
    return loc, torch.diag_embed(base.stddev.detach())


def _coupling_net(x, w1, b1, w2, b2, w3, b3):
    """Shift and log-scale of one coupling layer: two ELU hidden layers, a linear output, the
    log-scale soft-clamped to (-4, 4) by ``4 tanh(s / 4)``."""
    h = torch.nn.functional.elu(x @ w1.T + b1)
    h = torch.nn.functional.elu(h @ w2.T + b2)
    out = h @ w3.T + b3
    split = out.shape[-1] // 2
    return out[..., :split], 4.0 * torch.tanh(out[..., split:] / 4.0)


class RealNVPTransform(Transform):
    """The whole flow ``y = loc + L f_K(...f_1(x))`` as one transform over parameter tensors.

    Layer ``k`` is ``(cond, rest, weights)``: ``y[rest] = x[rest] * exp(s(x[cond])) +
    t(x[cond])``, ``y[cond] = x[cond]``.  The inverse is closed-form; the log-determinant of
    the last forward or inverse call is kept with its ``(x, y)`` pair, so
    ``TransformedDistribution.log_prob`` costs one pass of the networks.  Built afresh by
    every ``get_posterior`` call, so nothing is cached across parameter values.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, layers, loc, scale_tril):
        super().__init__(cache_size=1)
        self.layers, self.loc, self.scale_tril = layers, loc, scale_tril
        self._log_det = (None, None, None)

    def _call(self, x):
        log_det = 0.0
        z = x
        for cond, rest, weights in self.layers:
            shift, log_scale = _coupling_net(z[..., cond], *weights)
            z = z.index_copy(-1, rest, z[..., rest] * log_scale.exp() + shift)
            log_det = log_det + log_scale.sum(-1)
        y = self.loc + (self.scale_tril @ z.unsqueeze(-1)).squeeze(-1)
        self._log_det = (x, y, log_det + self.scale_tril.diagonal().log().sum())
        return y

    def _inverse(self, y):
        z = torch.linalg.solve_triangular(
            self.scale_tril, (y - self.loc).unsqueeze(-1), upper=False
        ).squeeze(-1)
        log_det = self.scale_tril.diagonal().log().sum()
        for cond, rest, weights in reversed(self.layers):
            shift, log_scale = _coupling_net(z[..., cond], *weights)
            z = z.index_copy(-1, rest, (z[..., rest] - shift) * (-log_scale).exp())
            log_det = log_det + log_scale.sum(-1)
        self._log_det = (z, y, log_det)
        return z

    def log_abs_det_jacobian(self, x, y):
        x_old, y_old, log_det = self._log_det
        if x is not x_old or y is not y_old:
            self._call(x)
            log_det = self._log_det[2]
        return log_det


def bit_masks(dim: int, num_layers: int) -> list:
    """The conditioning sets ``A_k``: layer ``2b`` conditions on the coordinates whose index has
    bit ``b`` set, layer ``2b + 1`` on the others, cycling when ``num_layers`` is larger."""
    bits = max(1, math.ceil(math.log2(dim)))
    masks = []
    for k in range(num_layers):
        bit = (k // 2) % bits
        ones = [i for i in range(dim) if (i >> bit) & 1]
        zeros = [i for i in range(dim) if not (i >> bit) & 1]
        masks.append(ones if k % 2 == 0 else zeros)
    return masks


class AutoRealNVP(AutoContinuous):
    """A Real-NVP flow guide over all latent sites, built on a Gaussian answer (see the module
    docstring for the construction).

    :param model: the Pyro model.
    :param base: where the flow starts: a fitted Gaussian autoguide of the same model, a
        ``(loc, scale_tril)`` pair over the flat unconstrained latent vector, or ``None``
        (``N(m, I)`` with ``m`` from ``init_loc_fn``).
    :param int num_layers: coupling layers (default ``max(4, 2 ceil(log2 D))``, so every
        ordered pair of coordinates has a layer where one sets the other's scale).
    :param int hidden_dim: width of each coupling network (default ``max(32, 2 D)``).
    :param int seed: seeds the (deterministic) initial hidden weights; no global random
        numbers are drawn.
    :param init_loc_fn: for ``base=None`` only.

    ``guide.joint_posterior()`` (or ``posterior_of(guide, joint=True)``) gives q over the
    model's sites for sampling and ``log_prob``.  Coupling needs at least two latent
    dimensions.
    """

    #: the auxiliary site's distribution (the flow) depends on the parameters alone, never on
    #: other draws: STL's parameter-held-constant log q is the live draw scored by a detached
    #: copy of the flow (its inverse pass), with no second guide pass
    #: (:func:`pyro_elbo.engine.detach.detach_auxiliary_sites`)
    auxiliary_depends_on_params_only = True

    def __init__(self, model, base=None, *, num_layers=None, hidden_dim=None, seed=0,
                 init_loc_fn=init_to_median):
        super().__init__(model, init_loc_fn=init_loc_fn)
        # plain attributes (a base guide must not become a submodule, its parameters ours)
        object.__setattr__(self, "_base_arg", base)
        object.__setattr__(self, "_settings", (num_layers, hidden_dim, seed))

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        D = self.latent_dim
        if D < 2:
            raise ValueError(
                f"AutoRealNVP: the model has {D} latent dimension; a coupling flow needs at "
                "least 2 (for one dimension use AutoNormal, or a spline flow)."
            )
        base = self._base_arg
        if base is None:
            loc = self._init_loc().detach()
            tril = torch.eye(D, dtype=loc.dtype)
        elif isinstance(base, tuple):
            loc, tril = (torch.as_tensor(t).detach().clone() for t in base)
        else:
            loc, tril = gaussian_base(base, *args, **kwargs)
        if loc.shape != (D,) or tril.shape != (D, D):
            raise ValueError(
                f"AutoRealNVP: base must be over the {D} unconstrained latent dimensions; got "
                f"loc {tuple(loc.shape)}, scale_tril {tuple(tril.shape)}"
            )
        dtype = loc.dtype
        self.register_buffer("base_loc", loc.clone())
        self.register_buffer("base_scale_tril", tril.clone())
        self.shift = torch.nn.Parameter(torch.zeros(D, dtype=dtype))
        self.scale_tril = PyroParam(torch.eye(D, dtype=dtype), constraints.lower_cholesky)
        num_layers, hidden_dim, seed = self._settings
        layers = num_layers or max(4, 2 * math.ceil(math.log2(D)))
        hidden = hidden_dim or max(32, 2 * D)
        gen = torch.Generator().manual_seed(seed)
        self._layout, chunks, offset = [], [], 0
        for cond in bit_masks(D, layers):
            rest = [i for i in range(D) if i not in cond]
            d1, d2 = len(cond), len(rest)
            shapes = [(hidden, d1), (hidden,), (hidden, hidden), (hidden,), (2 * d2, hidden),
                      (2 * d2,)]
            for index, shape in enumerate(shapes):
                if index in (0, 2):  # hidden weights: N(0, 1/fan_in)
                    chunk = torch.randn(shape, generator=gen, dtype=torch.float64)
                    chunk = chunk / math.sqrt(shape[1])
                else:  # biases, and a zero output layer: the coupling starts as the identity
                    chunk = torch.zeros(shape, dtype=torch.float64)
                chunks.append(chunk.reshape(-1))
            self._layout.append((torch.tensor(cond), torch.tensor(rest), offset, shapes))
            offset += sum(math.prod(shape) for shape in shapes)
        # one flat parameter for every coupling network: one pyro.param read per guide call
        self.coupling_weights = torch.nn.Parameter(torch.cat(chunks).to(dtype))

    def get_base_dist(self):
        zero = self.base_loc.new_zeros(())
        return dist.Normal(zero, 1.0).expand([self.latent_dim]).to_event(1)

    def get_transform(self, *args, **kwargs):
        """The flow as one :class:`RealNVPTransform`, built afresh from the current parameter
        values (read through ``pyro.param``)."""
        weights, layers = self.coupling_weights, []
        for cond, rest, offset, shapes in self._layout:
            tensors = []
            for shape in shapes:
                size = math.prod(shape)
                tensors.append(weights[offset : offset + size].reshape(shape))
                offset += size
            layers.append((cond, rest, tensors))
        # u = m0 + L0 (a + T y) = (m0 + L0 a) + (L0 T) y
        loc = self.base_loc + self.base_scale_tril @ self.shift
        return RealNVPTransform(layers, loc, self.base_scale_tril @ self.scale_tril)

    def get_posterior(self, *args, **kwargs):
        return dist.TransformedDistribution(self.get_base_dist(), self.get_transform())

    def _loc_scale(self, *args, **kwargs):
        raise NotImplementedError("AutoRealNVP has no closed-form loc and scale; sample it")

    def posterior_distributions(self, *args, **kwargs):
        raise TypeError(
            "AutoRealNVP has no closed-form per-site marginals; sample the joint instead: "
            "posterior_of(guide, joint=True).sample((n,)) or pyro_elbo.to_inference_data"
        )

    def joint_posterior(self, *args, **kwargs):
        """q over every latent site (a :class:`~pyro_elbo.guides.JointPosterior` whose base is
        the flow), a detached snapshot of the current parameters."""
        from torch.distributions import biject_to

        from pyro_elbo.guides.posterior import JointPosterior, _Block

        if self.prototype_trace is None:
            with torch.no_grad():
                self(*args, **kwargs)
        with self._pyro_context:
            base = _detached_flow(self)
        blocks, pos = [], 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = torch.Size(self._unconstrained_shapes[name])
            blocks.append(_Block(name, pos, shape, biject_to(site["fn"].support)))
            pos += blocks[-1].size
        return JointPosterior(base, blocks, {})


def _detached_flow(guide):
    with torch.no_grad():  # the parameters read here carry no graph
        return guide.get_posterior()


def flow_objective(num_particles: int | None = None):
    """The flow stage's objective: ``ELBO(num_particles, estimator="stl")`` (default
    :data:`FLOW_PARTICLES`)."""
    from pyro_elbo.objectives.elbo import ELBO

    return ELBO(num_particles or FLOW_PARTICLES, estimator="stl")


def flow_optimizer(lr: float | None = None):
    """The flow stage's optimizer: Adam with a fixed step ``lr`` (default :data:`FLOW_LR`; a
    ``functools.partial`` that ``fit`` builds over every parameter)."""
    import functools

    return functools.partial(torch.optim.Adam, lr=lr or FLOW_LR)
