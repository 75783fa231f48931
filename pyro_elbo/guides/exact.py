"""``ExactGuide(oracle)``: a guide that samples the exact posterior of a conjugate oracle.

With ``q(z) = p(z | x)`` every importance weight is the evidence,
``w = p(x, z) / q(z) = p(x)``, so every bound of MATH.md collapses onto it::

    ELBO = IW-ELBO_K = CUBO_n = log p(x)        (exactly, for every K and n)

and the path-derivative gradient estimators (STL, DReG) have zero variance there, because
``grad_z (log p(x, z) - log q_{stop(phi)}(z)) = grad_z log p(x) = 0`` for every draw
(Roeder et al. 2017; Tucker et al. 2019).  The guide is the reference point the objectives and
diagnostics are tested against.

Sites are reparameterized wherever torch allows: Normal and MultivariateNormal by location-scale,
Beta, Gamma and Dirichlet by implicit reparameterization (Figurnov et al. 2018; torch's
``rsample``).  ``NormalGamma`` (not mean-field) samples ``precision ~ Gamma(a_n, b_n)`` and then
``loc | precision ~ Normal(m_n, 1 / sqrt(kappa_n precision))``, in the model's order.

``learnable=True`` makes the posterior's parameters ``pyro.param`` s initialized at the exact
values (Normal: loc, scale; MultivariateNormal: loc, scale_tril; Beta: the two concentrations;
Gamma: concentration, rate; Dirichlet: concentration; NormalGamma: loc, kappa, concentration,
rate), so SVI and the gradient estimators have parameters to differentiate; at initialization
their STL/DReG gradients are exactly zero with zero variance.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_elbo.conjugate import ConjugateOracle, NormalGamma, NormalGammaPosterior

__all__ = ["ExactGuide"]


def _parameters(posterior):
    """``(family, {arg: (value, constraint)}, reinterpreted event dims)`` of a posterior."""
    event = 0
    base = posterior
    while isinstance(base, torch.distributions.Independent):
        event += base.reinterpreted_batch_ndims
        base = base.base_dist
    if isinstance(base, torch.distributions.MultivariateNormal):
        args = {
            "loc": (base.loc, constraints.real),
            "scale_tril": (base.scale_tril, constraints.lower_cholesky),
        }
        return dist.MultivariateNormal, args, event
    for torch_family, family in (
        (torch.distributions.Normal, dist.Normal),
        (torch.distributions.Beta, dist.Beta),
        (torch.distributions.Gamma, dist.Gamma),
        (torch.distributions.Dirichlet, dist.Dirichlet),
    ):
        if isinstance(base, torch_family):
            args = {
                name: (getattr(base, name), constraint)
                for name, constraint in family.arg_constraints.items()
            }
            return family, args, event
    raise TypeError(
        f"ExactGuide does not know the posterior family {type(base).__name__}; supported: "
        "Normal, MultivariateNormal, Beta, Gamma, Dirichlet (and Independent of them)"
    )


class ExactGuide:
    """A guide sampling ``oracle.posterior()`` (the exact posterior), site by site.

    :param oracle: a :mod:`pyro_elbo.conjugate` oracle.
    :param bool learnable: make the posterior's parameters ``pyro.param`` s (initialized at the
        exact values) so there is something to optimize (default False: a fixed guide).
    :param str prefix: prefix of the param names when ``learnable`` (default ``"exact"``).
    """

    def __init__(self, oracle, *, learnable: bool = False, prefix: str = "exact"):
        if not isinstance(oracle, ConjugateOracle):
            raise TypeError(
                f"oracle must be a pyro_elbo.conjugate oracle (NormalNormal, ...), got "
                f"{type(oracle).__name__}"
            )
        self.oracle = oracle
        self.learnable = bool(learnable)
        self.prefix = prefix
        posterior = oracle.posterior()
        if isinstance(posterior, NormalGammaPosterior):
            self._family = None
            self._init = {
                "loc": (posterior.loc, constraints.real),
                "kappa": (posterior.kappa, constraints.positive),
                "concentration": (posterior.concentration, constraints.positive),
                "rate": (posterior.rate, constraints.positive),
            }
            self._event_dim = 0
        else:
            self._family, self._init, self._event_dim = _parameters(posterior)

    def __call__(self, *args, **kwargs):
        """Sample every latent site of the oracle's model from the (current) posterior."""
        values = self._values(detach=False)
        if self._family is None:  # NormalGamma: precision, then loc | precision
            precision = pyro.sample(
                "precision", dist.Gamma(values["concentration"], values["rate"])
            )
            loc = pyro.sample(
                "loc", dist.Normal(values["loc"], (values["kappa"] * precision).rsqrt())
            )
            return {"precision": precision, "loc": loc}
        return pyro.sample(self.oracle.latent, self._distribution(values))

    def posterior_distributions(self, *args, **kwargs):
        """``{site: Distribution}``: q's per-site marginals (for NormalGamma, the Gamma of
        ``precision`` and the Student-t of ``loc``), detached."""
        if self._family is None:
            joint = self.joint_posterior()
            return {name: joint.marginal(name) for name in NormalGamma.latents}
        return {self.oracle.latent: self._distribution(self._values(detach=True))}

    def joint_posterior(self, *args, **kwargs):
        """q over all latent sites: a Distribution (one site) or a
        :class:`~pyro_elbo.conjugate.NormalGammaPosterior` (NormalGamma), detached."""
        values = self._values(detach=True)
        if self._family is None:
            return NormalGammaPosterior(
                values["loc"], values["kappa"], values["concentration"], values["rate"]
            )
        return self._distribution(values)

    def _distribution(self, values):
        fn = self._family(**values)
        return fn.to_event(self._event_dim) if self._event_dim else fn

    def _values(self, detach: bool):
        if not self.learnable:
            return {name: value for name, (value, _) in self._init.items()}
        values = {
            name: pyro.param(f"{self.prefix}.{name}", value.detach().clone(), constraint=c)
            for name, (value, c) in self._init.items()
        }
        return {n: v.detach() for n, v in values.items()} if detach else values

    def __repr__(self):
        kind = ", learnable=True" if self.learnable else ""
        return f"ExactGuide({self.oracle!r}{kind})"
