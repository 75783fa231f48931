# ruff: noqa: B007  (ported from Pyro; kept close to the original)
"""Pyro's ``tests/infer/test_inference.py`` (conjugate convergence) with this project's objectives.

Ported from Pyro 1.9 (Apache-2.0): the Trace_ELBO / TraceGraph_ELBO / TraceMeanField_ELBO cases
(NormalNormal, PoissonGamma, ExponentialGamma, BernoulliBeta with reparameterized,
non-reparameterized and vectorized guides; the fixed model/guide tests; the safety tests;
test_reparam_stable), with Pyro's model, guide, initialization, optimizer, step counts and
tolerances.  Left out: RenyiELBO, ReweightedWakeSleep, TraceTailAdaptive_ELBO, MMD and
EnergyDistance cases (other objectives), and the ``Jit*`` cases Pyro itself marks xfail.

Columns: see ``pyro_compat.py`` (``TraceMeanField_ELBO`` cases: ``TraceMeanField_ELBO`` and
``ELBO_akl``).

**Default run.**  The conjugate cases take 3,000-25,000 SVI steps each (10 s to several minutes
apiece), so the full grid (73 convergence cases) runs only with ``PYRO_ELBO_COMPAT_FULL=1``.  By
default: the fast tests (fixed model/guide, safety, test_reparam_stable) for every objective, and
one 3,000-5,000-step conjugate case per objective (``DEFAULT_CONVERGENCE``: NormalNormal for
ELBO and ELBO_akl, ExponentialGamma for IWELBO, vectorized BernoulliBeta for ELBO_stl).  So in the
default run every objective meets every fast test and one convergence test, not all five: the
five families at Pyro's step counts take over 10 minutes per objective, above the CI budget.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.optim as optim
import pytest
import torch
from pyro import poutine
from pyro.distributions.testing import fakes
from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDelta
from pyro.infer.reparam import LatentStableReparam
from pyro_compat import ELBOS, FULL, MEANFIELD_ELBOS, assert_equal, xfail_if_not_implemented
from torch.distributions import constraints

# (test function, objective id, case id) run by default; everything else needs the full grid
DEFAULT_CONVERGENCE = {
    ("test_normal_normal_elbo", "ELBO", "reparam"),
    ("test_normal_normal_elbo_analytic_kl", "ELBO_akl", ""),
    ("test_exponential_gamma", "IWELBO", "reparam"),
    ("test_bernoulli_beta_elbo_vectorized", "ELBO_stl", "reparam"),
}


def default_or_full(request, case=""):
    """Skip a convergence case outside the default subset unless PYRO_ELBO_COMPAT_FULL=1."""
    objective = request.node.callspec.id.split("-")
    key = (request.function.__name__, objective, case)
    if FULL:
        return
    for name, objective_id, case_id in DEFAULT_CONVERGENCE:
        if name == key[0] and objective_id in objective and case_id == case:
            return
    pytest.skip("convergence case outside the default subset; PYRO_ELBO_COMPAT_FULL=1 runs it")


def param_mse(name, target):
    return torch.sum(torch.pow(target - pyro.param(name), 2.0)).item()


def param_abs_error(name, target):
    return torch.sum(torch.abs(target - pyro.param(name))).item()


# ----------------------------------------------------------------------------- NormalNormalTests


class NormalNormal:
    def __init__(self):
        self.lam0 = torch.tensor([0.1, 0.1])  # precision of prior
        self.loc0 = torch.tensor([0.0, 0.5])  # prior mean
        # known precision of observation noise
        self.lam = torch.tensor([6.0, 4.0])
        self.data = torch.tensor([[-0.1, 0.3], [0.00, 0.4], [0.20, 0.5], [0.10, 0.7]])
        self.n_data = torch.tensor([float(len(self.data))])
        self.data_sum = self.data.sum(0)
        self.analytic_lam_n = self.lam0 + self.n_data.expand_as(self.lam) * self.lam
        self.analytic_log_sig_n = -0.5 * torch.log(self.analytic_lam_n)
        self.analytic_loc_n = self.data_sum * (self.lam / self.analytic_lam_n) + self.loc0 * (
            self.lam0 / self.analytic_lam_n
        )
        self.batch_size = 4

    def do_elbo_test(self, reparameterized, n_steps, loss):
        pyro.clear_param_store()

        def model():
            loc_latent = pyro.sample(
                "loc_latent",
                dist.Normal(self.loc0, torch.pow(self.lam0, -0.5)).to_event(1),
            )
            with pyro.plate("data", self.batch_size):
                pyro.sample(
                    "obs",
                    dist.Normal(loc_latent, torch.pow(self.lam, -0.5)).to_event(1),
                    obs=self.data,
                )
            return loc_latent

        def guide():
            loc_q = pyro.param("loc_q", self.analytic_loc_n.detach() + 0.134)
            log_sig_q = pyro.param("log_sig_q", self.analytic_log_sig_n.data.detach() - 0.14)
            sig_q = torch.exp(log_sig_q)
            Normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal
            pyro.sample("loc_latent", Normal(loc_q, sig_q).to_event(1))

        adam = optim.Adam({"lr": 0.001})
        svi = SVI(model, guide, adam, loss=loss)

        for k in range(n_steps):
            svi.step()

            loc_error = param_mse("loc_q", self.analytic_loc_n)
            log_sig_error = param_mse("log_sig_q", self.analytic_log_sig_n)

        return loc_error, log_sig_error  # Pyro's test asserts each is within 0.05 of zero


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize(
    "reparameterized,n_steps", [(True, 5000), (False, 15000)], ids=["reparam", "nonreparam"]
)
def test_normal_normal_elbo(request, Elbo, reparameterized, n_steps):
    default_or_full(request, "reparam" if reparameterized else "nonreparam")
    loc_error, log_sig_error = NormalNormal().do_elbo_test(reparameterized, n_steps, Elbo())
    assert_equal(0.0, loc_error, prec=0.05)
    assert_equal(0.0, log_sig_error, prec=0.05)


@pytest.mark.parametrize("Elbo", MEANFIELD_ELBOS)
def test_normal_normal_elbo_analytic_kl(request, Elbo):
    default_or_full(request)
    loc_error, log_sig_error = NormalNormal().do_elbo_test(True, 3000, Elbo())
    assert_equal(0.0, loc_error, prec=0.05)
    assert_equal(0.0, log_sig_error, prec=0.05)


# ---------------------------------------------------------------------------- TestFixedModelGuide


def do_test_fixedness(Elbo, fixed_parts):
    data = torch.tensor([2.0])
    alpha_q_log_0 = 0.17 * torch.ones(1)
    beta_q_log_0 = 0.19 * torch.ones(1)
    alpha_p_log_0 = 0.11 * torch.ones(1)
    beta_p_log_0 = 0.13 * torch.ones(1)
    pyro.clear_param_store()

    def model():
        alpha_p_log = pyro.param("alpha_p_log", alpha_p_log_0.clone())
        beta_p_log = pyro.param("beta_p_log", beta_p_log_0.clone())
        alpha_p, beta_p = torch.exp(alpha_p_log), torch.exp(beta_p_log)
        lambda_latent = pyro.sample("lambda_latent", dist.Gamma(alpha_p, beta_p))
        pyro.sample("obs", dist.Poisson(lambda_latent), obs=data)
        return lambda_latent

    def guide():
        alpha_q_log = pyro.param("alpha_q_log", alpha_q_log_0.clone())
        beta_q_log = pyro.param("beta_q_log", beta_q_log_0.clone())
        alpha_q, beta_q = torch.exp(alpha_q_log), torch.exp(beta_q_log)
        pyro.sample("lambda_latent", dist.Gamma(alpha_q, beta_q))

    def per_param_args(param_name):
        if "model" in fixed_parts and "p_" in param_name:
            return {"lr": 0.0}
        if "guide" in fixed_parts and "q_" in param_name:
            return {"lr": 0.0}
        return {"lr": 0.01}

    adam = optim.Adam(per_param_args)
    svi = SVI(model, guide, adam, loss=Elbo())

    for _ in range(3):
        svi.step()

    model_unchanged = (torch.equal(pyro.param("alpha_p_log").data, alpha_p_log_0)) and (
        torch.equal(pyro.param("beta_p_log").data, beta_p_log_0)
    )
    guide_unchanged = (torch.equal(pyro.param("alpha_q_log").data, alpha_q_log_0)) and (
        torch.equal(pyro.param("beta_q_log").data, beta_q_log_0)
    )
    model_changed = not model_unchanged
    guide_changed = not guide_unchanged
    error = ("model" in fixed_parts and model_changed) or (
        "guide" in fixed_parts and guide_changed
    )
    return not error


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize(
    "fixed_parts",
    [["model"], ["guide"], ["model", "guide"], ["bogus_tag"]],
    ids=["model_fixed", "guide_fixed", "both_fixed", "both_free"],
)
def test_fixed_model_guide(Elbo, fixed_parts):
    assert do_test_fixedness(Elbo, fixed_parts)


# ------------------------------------------------------------------------------ PoissonGammaTests


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize(
    "reparameterized,n_steps", [(True, 10000), (False, 25000)], ids=["reparam", "nonreparam"]
)
def test_poisson_gamma_elbo(request, Elbo, reparameterized, n_steps):
    default_or_full(request, "reparam" if reparameterized else "nonreparam")
    alpha0 = torch.tensor(1.0)
    beta0 = torch.tensor(1.0)
    data = torch.tensor([1.0, 2.0, 3.0])
    n_data = len(data)
    alpha_n = alpha0 + data.sum(0)  # posterior alpha
    beta_n = beta0 + torch.tensor(float(n_data))  # posterior beta
    loss = Elbo()

    pyro.clear_param_store()
    Gamma = dist.Gamma if reparameterized else fakes.NonreparameterizedGamma

    def model():
        lambda_latent = pyro.sample("lambda_latent", Gamma(alpha0, beta0))
        with pyro.plate("data", n_data):
            pyro.sample("obs", dist.Poisson(lambda_latent), obs=data)
        return lambda_latent

    def guide():
        alpha_q = pyro.param(
            "alpha_q", alpha_n.detach() + math.exp(0.17), constraint=constraints.positive
        )
        beta_q = pyro.param(
            "beta_q", beta_n.detach() / math.exp(0.143), constraint=constraints.positive
        )
        pyro.sample("lambda_latent", Gamma(alpha_q, beta_q))

    adam = optim.Adam({"lr": 0.0002, "betas": (0.97, 0.999)})
    svi = SVI(model, guide, adam, loss)

    for k in range(n_steps):
        svi.step()

    assert_equal(pyro.param("alpha_q"), alpha_n, prec=0.2)
    assert_equal(pyro.param("beta_q"), beta_n, prec=0.15)


# ------------------------------------------------------------------------- test_exponential_gamma


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize(
    "gamma_dist,n_steps",
    [
        (dist.Gamma, 5000),
        (fakes.NonreparameterizedGamma, 10000),
        (ShapeAugmentedGamma, 5000),
    ],
    ids=["reparam", "nonreparam", "rsvi"],
)
def test_exponential_gamma(request, gamma_dist, n_steps, Elbo):
    default_or_full(request, request.node.callspec.id.split("-")[0])
    pyro.clear_param_store()

    alpha0 = torch.tensor(1.0)
    beta0 = torch.tensor(1.0)
    n_data = 2
    data = torch.tensor([3.0, 2.0])  # two observations
    alpha_n = alpha0 + torch.tensor(float(n_data))  # posterior alpha
    beta_n = beta0 + torch.sum(data)  # posterior beta
    prec = 0.2 if gamma_dist.has_rsample else 0.25

    def model(alpha0, beta0, alpha_n, beta_n):
        lambda_latent = pyro.sample("lambda_latent", gamma_dist(alpha0, beta0))
        with pyro.plate("data", n_data):
            pyro.sample("obs", dist.Exponential(lambda_latent), obs=data)
        return lambda_latent

    def guide(alpha0, beta0, alpha_n, beta_n):
        alpha_q = pyro.param("alpha_q", alpha_n * math.exp(0.17), constraint=constraints.positive)
        beta_q = pyro.param("beta_q", beta_n / math.exp(0.143), constraint=constraints.positive)
        pyro.sample("lambda_latent", gamma_dist(alpha_q, beta_q))

    adam = optim.Adam({"lr": 0.0003, "betas": (0.97, 0.999)})
    elbo = Elbo(max_plate_nesting=1, strict_enumeration_warning=False)
    svi = SVI(model, guide, adam, loss=elbo)

    with xfail_if_not_implemented():
        for k in range(n_steps):
            svi.step(alpha0, beta0, alpha_n, beta_n)

    assert_equal(pyro.param("alpha_q"), alpha_n, prec=prec)
    assert_equal(pyro.param("beta_q"), beta_n, prec=prec)


# ----------------------------------------------------------------------------- BernoulliBetaTests


def do_bernoulli_beta_test(reparameterized, n_steps, loss):
    alpha0 = torch.tensor(1.0)
    beta0 = torch.tensor(1.0)  # beta prior hyperparameter
    data = torch.tensor([0.0, 1.0, 1.0, 1.0])
    n_data = len(data)
    batch_size = 4
    data_sum = data.sum()
    alpha_n = alpha0 + data_sum  # posterior alpha
    beta_n = beta0 - data_sum + torch.tensor(float(n_data))  # posterior beta
    log_alpha_n = torch.log(alpha_n)
    log_beta_n = torch.log(beta_n)

    pyro.clear_param_store()
    Beta = dist.Beta if reparameterized else fakes.NonreparameterizedBeta

    def model():
        p_latent = pyro.sample("p_latent", Beta(alpha0, beta0))
        with pyro.plate("data", batch_size):
            pyro.sample("obs", dist.Bernoulli(p_latent), obs=data)
        return p_latent

    def guide():
        alpha_q_log = pyro.param("alpha_q_log", log_alpha_n + 0.17)
        beta_q_log = pyro.param("beta_q_log", log_beta_n - 0.143)
        alpha_q, beta_q = torch.exp(alpha_q_log), torch.exp(beta_q_log)
        pyro.sample("p_latent", Beta(alpha_q, beta_q))

    adam = optim.Adam({"lr": 0.001, "betas": (0.97, 0.999)})
    svi = SVI(model, guide, adam, loss=loss)

    for k in range(n_steps):
        svi.step()

    alpha_error = param_abs_error("alpha_q_log", log_alpha_n)
    beta_error = param_abs_error("beta_q_log", log_beta_n)
    return alpha_error, beta_error  # Pyro's test asserts each is within 0.08 of zero


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize(
    "reparameterized,n_steps", [(True, 10000), (False, 10000)], ids=["reparam", "nonreparam"]
)
def test_bernoulli_beta_elbo(request, Elbo, reparameterized, n_steps):
    default_or_full(request, "reparam" if reparameterized else "nonreparam")
    alpha_error, beta_error = do_bernoulli_beta_test(reparameterized, n_steps, Elbo())
    assert_equal(0.0, alpha_error, prec=0.08)
    assert_equal(0.0, beta_error, prec=0.08)


# this is used to detect bugs related to https://github.com/pytorch/pytorch/issues/9521
@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize("reparameterized", [True, False], ids=["reparam", "nonreparam"])
def test_bernoulli_beta_elbo_vectorized(request, Elbo, reparameterized):
    default_or_full(request, "reparam" if reparameterized else "nonreparam")
    loss = Elbo(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    alpha_error, beta_error = do_bernoulli_beta_test(reparameterized, 5000, loss)
    assert_equal(0.0, alpha_error, prec=0.08)
    assert_equal(0.0, beta_error, prec=0.08)


# ------------------------------------------------------------------------------------ SafetyTests


def model_dup():
    pyro.param("loc_q", torch.ones(1, requires_grad=True))
    pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)))


def model_obs_dup():
    pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)))
    pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)), obs=torch.zeros(1))


def safety_model():
    pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)))


def safety_guide():
    p = pyro.param("p", torch.ones(1, requires_grad=True))
    pyro.sample("loc_q", dist.Normal(torch.zeros(1), p))
    pyro.sample("loc_q_2", dist.Normal(torch.zeros(1), p))


@pytest.mark.parametrize("Elbo", ELBOS)
def test_duplicate_names(Elbo):
    pyro.clear_param_store()
    adam = optim.Adam({"lr": 0.001})
    svi = SVI(model_dup, safety_guide, adam, loss=Elbo())
    with pytest.raises(RuntimeError):
        svi.step()


@pytest.mark.parametrize("Elbo", ELBOS)
def test_extra_samples(Elbo):
    pyro.clear_param_store()
    adam = optim.Adam({"lr": 0.001})
    svi = SVI(safety_model, safety_guide, adam, loss=Elbo())
    with pytest.warns(Warning):
        svi.step()


@pytest.mark.parametrize("Elbo", ELBOS)
def test_duplicate_obs_name(Elbo):
    pyro.clear_param_store()
    adam = optim.Adam({"lr": 0.001})
    svi = SVI(model_obs_dup, safety_guide, adam, loss=Elbo())
    with pytest.raises(RuntimeError):
        svi.step()


# ------------------------------------------------------------------------------ test_reparam_stable


@pytest.mark.parametrize("Elbo", ELBOS)
def test_reparam_stable(Elbo):
    data = dist.Poisson(torch.randn(8).exp()).sample()

    @poutine.reparam(config={"dz": LatentStableReparam(), "y": LatentStableReparam()})
    def model():
        stability = pyro.sample("stability", dist.Uniform(1.0, 2.0))
        trans_skew = pyro.sample("trans_skew", dist.Uniform(-1.0, 1.0))
        obs_skew = pyro.sample("obs_skew", dist.Uniform(-1.0, 1.0))
        scale = pyro.sample("scale", dist.Gamma(3, 1))

        # We use separate plates because the .cumsum() op breaks independence.
        with pyro.plate("time1", len(data)):
            dz = pyro.sample("dz", dist.Stable(stability, trans_skew))
        z = dz.cumsum(-1)
        with pyro.plate("time2", len(data)):
            y = pyro.sample("y", dist.Stable(stability, obs_skew, scale, z))
            pyro.sample("x", dist.Poisson(y.abs()), obs=data)

    guide = AutoDelta(model)
    svi = SVI(model, guide, optim.Adam({"lr": 0.01}), Elbo())
    losses = [svi.step() for step in range(100)]
    # beyond Pyro's smoke test: every loss is finite and the MAP point moved from its start
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] != losses[0]
