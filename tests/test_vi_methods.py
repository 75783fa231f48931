"""Batch-and-Match and Pathfinder (pyro_elbo/vi/): exact on Gaussian targets, GSM as BaM's
B = 1 limit, the compact inverse-Hessian factors against dense BFGS, exact evaluation counts,
and the errors for bad input."""

import math
import os
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import pyro_elbo
from pyro_elbo import fit
from pyro_elbo.vi import bam
from pyro_elbo.vi import path as pf
from pyro_elbo.vi.target import Target

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
COV = torch.tensor(
    [[2.0, 0.8, 0.3], [0.8, 1.0, -0.4], [0.3, -0.4, 3.0]], dtype=torch.float64
)
TARGET = dist.MultivariateNormal(MEAN, covariance_matrix=COV)


def gaussian_model():
    pyro.sample("x", TARGET)


def _kl_to_target(guide):
    q = guide.get_posterior()
    q = dist.MultivariateNormal(q.loc.detach().double(), scale_tril=q.scale_tril.detach().double())
    return float(torch.distributions.kl_divergence(q, TARGET))


# ------------------------------------------------------------------------------------ BaM


def test_bam_exact_on_gaussian_target_in_five_iterations():
    """From the paper's start N(0, I), B = 32, lambda_t = B D / t: the error contracts by
    about 1 / (1 + lambda_t) per iteration; exact to 1e-6 (relative) after 5 iterations."""
    target = Target(gaussian_model)
    gen = torch.Generator().manual_seed(0)
    state = bam.init(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    for _ in range(5):
        z, eps = bam.sample(state, 32, gen)
        log_p, scores = target.batch_log_density_and_grad(z)
        state, info = bam.step(state, z, eps, log_p, scores)
    assert state.iteration == 5
    assert float((state.mu - MEAN).norm() / MEAN.norm()) < 1e-6
    assert float((state.cov - COV).norm() / COV.norm()) < 1e-6
    assert target.num_evaluations == 5 * 32


def _random_gaussian(dim, condition, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    cov = (Q * torch.logspace(0, math.log10(condition), dim, dtype=torch.float64)) @ Q.T
    return torch.randn(dim, generator=gen, dtype=torch.float64), 0.5 * (cov + cov.T)


def test_score_match_step_is_exact_on_a_gaussian_target_from_any_start():
    """BaM's lambda -> inf limit with B = D + 1 draws: one iteration gives the target's mean and
    covariance (Gamma = P C P), from a start 10 sds off and 100 times too wide; at D = 60 with
    condition number 1e4 too, where C of 61 draws is nearly singular (the QR/SVD form keeps
    the digits that forming C and Gamma loses).  With B <= D the limit does not exist."""
    target = Target(gaussian_model)
    gen = torch.Generator().manual_seed(0)
    state = bam.init(torch.full((3,), 10.0, dtype=torch.float64),
                     100 * torch.eye(3, dtype=torch.float64))
    z, eps = bam.sample(state, 4, gen)
    log_p, scores = target.batch_log_density_and_grad(z)
    new, info = bam.step(state, z, eps, log_p, scores, lr=math.inf)
    assert new.iteration == 1 and target.num_evaluations == 4
    assert float((new.mu - MEAN).norm() / MEAN.norm()) < 1e-10
    assert float((new.cov - COV).norm() / COV.norm()) < 1e-10
    assert bam.step(state, z[:3], eps[:3], log_p[:3], scores[:3], lr=math.inf)[0] is None

    mean, cov = _random_gaussian(60, 1e4, seed=1)
    precision = torch.linalg.inv(cov)
    state = bam.init(torch.zeros(60, dtype=torch.float64), torch.eye(60, dtype=torch.float64))
    z, eps = bam.sample(state, 61, gen)
    new, _ = bam.step(state, z, eps, torch.zeros(61, dtype=torch.float64),
                      -(z - mean) @ precision, lr=math.inf)
    assert float((new.mu - mean).norm() / mean.norm()) < 1e-6
    assert float((new.cov - cov).norm() / cov.norm()) < 1e-6


def test_fit_bam_is_exact_after_one_iteration_and_counts_every_evaluation():
    """fit(method="bam")'s start above 32 dimensions, on a 10-D correlated Gaussian: one
    Pathfinder path (its
    6-pair inverse Hessian is not the target's), one score match of max(D + 1, 32) = 32 draws,
    then the score-match test on 8 draws of the result passes: exact to 1e-6 in 1 iteration,
    and the count is the path's L-BFGS evaluations + 32 + 8, all of the model's gradient runs."""
    mean, cov = _random_gaussian(10, 100.0, seed=2)

    class Counted:
        def __init__(self):
            self.gradients = 0

        def __call__(self):
            x = pyro.sample("x", dist.MultivariateNormal(mean, covariance_matrix=cov))
            if x.requires_grad and torch.is_grad_enabled():
                self.gradients += 1

    setup = Counted()
    Target(setup)  # what the set-up costs (tracing, initialize_model), counted separately
    guide_setup = Counted()
    AutoMultivariateNormal(guide_setup)._setup_prototype()
    pyro.clear_param_store()
    model = Counted()
    guide = AutoMultivariateNormal(model)
    result = fit(model, guide, method="bam", seed=0, progress=False,
                 method_options={"init": "pathfinder"})  # the default above D = 32
    assert result.converged and result.reason.startswith("converged: score match"), result.reason
    assert result.num_steps == 1
    start = result.diagnostics["start_evaluations"]
    assert start > 0 and result.num_evaluations == start + 32 + 8
    assert result.num_evaluations == model.gradients - setup.gradients - guide_setup.gradients
    q = pyro_elbo.posterior_of(guide)
    torch.testing.assert_close(q.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.covariance_matrix.double(), cov, rtol=1e-6, atol=1e-6)
    fisher, se = result.diagnostics["score_match"][-1]
    assert fisher + 2 * se < 1e-3


def _gsm(mu, S, z, g):
    """GSM's update (Modi et al. 2023, Algorithm 1), written from the paper's formulas."""
    Sg = S @ g
    gSg = g @ Sg
    mu_g = (mu - z) @ g
    rho = 0.5 * math.sqrt(1 + 4 * (float(gSg) + float(mu_g) ** 2)) - 0.5
    eps0 = Sg - mu + z
    den = 1 + rho + mu_g
    mu_new = mu + (eps0 - torch.outer(mu - z, g) @ eps0 / den) / (1 + rho)
    S_new = S + torch.outer(mu - z, mu - z) - torch.outer(mu_new - z, mu_new - z)
    return mu_new, S_new


def test_bam_with_one_draw_and_infinite_step_is_gsm():
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(3, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    S = A @ A.T + 0.5 * torch.eye(3, dtype=torch.float64)
    target = Target(gaussian_model)
    state = bam.init(mu, S)
    for _ in range(3):  # three successive updates, each against GSM's from the same point
        z, eps = bam.sample(state, 1, gen)
        log_p, g = target.batch_log_density_and_grad(z)
        expected = _gsm(state.mu, state.cov, z[0], g[0])
        new, _ = bam.step(state, z, eps, log_p, g, lr=math.inf)
        torch.testing.assert_close(new.mu, expected[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(new.cov, expected[1], rtol=1e-10, atol=1e-10)
        # GSM's defining property: q' matches the score at z
        score_q = -torch.linalg.solve(new.cov, z[0] - new.mu)
        torch.testing.assert_close(score_q, g[0], rtol=1e-8, atol=1e-8)
        state = new


def test_fit_bam_full_and_diagonal_guides():
    pyro.clear_param_store()
    result = fit(gaussian_model, AutoMultivariateNormal(gaussian_model), method="bam",
                 method_options={"init": "prior"}, seed=0, progress=False)
    assert result.converged, result.reason
    assert _kl_to_target(result.guide) < 1e-10
    # the score match of 32 draws (exact on a Gaussian), then 8 draws that confirm it
    assert result.reason.startswith("converged: score match")
    assert result.num_steps == 1 and result.num_evaluations == 32 + 8
    assert len(result.losses) == result.num_steps
    # a diagonal target: the coordinate-wise update is exact there
    scales = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)

    def diagonal_model():
        pyro.sample("x", dist.Normal(MEAN, scales).to_event(1))

    for guide_class in (AutoNormal, AutoDiagonalNormal):
        pyro.clear_param_store()
        guide = guide_class(diagonal_model)
        result = fit(diagonal_model, guide, method="bam", seed=0, progress=False)
        assert result.converged, result.reason
        q = pyro_elbo.posterior_of(guide)
        torch.testing.assert_close(q.mean.double(), MEAN, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.stddev.double(), scales, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ Pathfinder


def test_pathfinder_exact_on_gaussian_target():
    pyro.clear_param_store()
    result = pyro_elbo.pathfinder(gaussian_model, num_paths=2, num_draws=200, seed=0)
    assert _kl_to_target(result.guide) < 1e-6
    assert result.draws["x"].shape == (200, 3)
    assert result.khat < 0.5 and result.converged
    assert len(result.paths) == 2 and all(p["converged"] for p in result.paths)
    assert result.num_evaluations > 0 and result.num_density_evaluations > 0
    data = result.to_inference_data()
    assert data["posterior"]["x"].shape[:2] == (1, 200)


def _dense_bfgs(alpha, S, Z):
    H = torch.diag_embed(alpha)
    eye = torch.eye(len(alpha), dtype=alpha.dtype)
    for s, z in zip(S, Z):
        rho = 1 / (s @ z)
        H = (eye - rho * torch.outer(s, z)) @ H @ (eye - rho * torch.outer(z, s))
        H = H + rho * torch.outer(s, s)
    return H


def test_inverse_hessian_factors_match_dense_bfgs_on_a_quadratic():
    gen = torch.Generator().manual_seed(1)
    D = 6
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    A = A @ A.T + torch.eye(D, dtype=torch.float64)
    x0 = 3 * torch.randn(D, generator=gen, dtype=torch.float64)

    def quadratic():
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(D, dtype=torch.float64),
                                                 precision_matrix=A))

    target = Target(quadratic)
    positions, grads, reason, converged = pf.lbfgs_path(target, x0, history_size=4)
    assert converged, reason
    # the pairs and alpha of the last iteration, as Algorithm 3 keeps them (J = 3 < D)
    S = (positions[1:] - positions[:-1])[-3:]
    Z = (grads[:-1] - grads[1:])[-3:]
    alpha = torch.rand(D, generator=gen, dtype=torch.float64) + 0.5
    beta, gamma = pf.inverse_hessian_factors(S, Z, alpha)
    H = torch.diag_embed(alpha) + beta @ gamma @ beta.T
    torch.testing.assert_close(H, _dense_bfgs(alpha, S, Z), rtol=1e-10, atol=1e-10)
    # and along the path: every q_l's H is the BFGS matrix of its own alpha and kept pairs
    approxes = pf.approximations(positions, grads, history_size=3)
    last = approxes[-1]
    kept = [(s, z) for s, z in zip(positions[1:] - positions[:-1], grads[:-1] - grads[1:])
            if float(s @ z) > 1e-12 * float(z @ z)][-3:]
    dense = _dense_bfgs(last.alpha, torch.stack([k[0] for k in kept]),
                        torch.stack([k[1] for k in kept]))
    torch.testing.assert_close(last.covariance(), dense, rtol=1e-10, atol=1e-10)
    # with J >= D pairs and the exact line search, the path's H is the inverse Hessian
    full = pf.approximations(positions, grads, history_size=D)[-1].covariance()
    torch.testing.assert_close(full, torch.linalg.inv(A), rtol=1e-6, atol=1e-8)


def funnel():
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)).expand([4]).to_event(1))


def test_pathfinder_on_funnel_warns_with_khat_and_returns_draws():
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="k-hat"):
        result = pyro_elbo.pathfinder(funnel, num_paths=4, num_draws=400, seed=0)
    assert result.khat > 0.7 and not result.converged and "not converged" in result.reason
    assert result.draws["y"].shape == (400,) and result.draws["x"].shape == (400, 4)
    assert bool(torch.isfinite(result.draws["x"]).all())
    assert float(result.draws["y"].std()) > 0.3  # not collapsed onto one point


# ------------------------------------------------------------------------------ counting


class CountingModel:
    """Counts runs of ``gaussian_model`` whose latent value carries a gradient (a log-joint
    gradient evaluation) and runs without (a density evaluation)."""

    def __init__(self):
        self.gradients = self.densities = 0

    def __call__(self):
        x = pyro.sample("x", TARGET)
        if x.requires_grad and torch.is_grad_enabled():
            self.gradients += 1
        else:
            self.densities += 1


@pytest.mark.parametrize("method", ["bam", "pathfinder"])
def test_num_evaluations_counts_exactly(method):
    pyro.clear_param_store()
    setup = CountingModel()
    Target(setup)  # what the set-up costs (tracing, initialize_model), counted separately
    model = CountingModel()
    options = {"init": "prior", "batch_size": 8} if method == "bam" else {"num_paths": 2}
    kwargs = {"num_steps": 5} if method == "bam" else {}
    result = fit(model, AutoMultivariateNormal(model), method=method, method_options=options,
                 seed=0, progress=False, **kwargs)
    guide_setup = CountingModel()
    AutoMultivariateNormal(guide_setup)._setup_prototype()
    assert result.num_evaluations == model.gradients - setup.gradients - guide_setup.gradients
    if method == "bam":
        assert result.num_evaluations == 40
    else:
        assert result.diagnostics["num_density_evaluations"] == (
            model.densities - setup.densities - guide_setup.densities
        )


def test_svi_num_evaluations_are_steps_times_particles():
    pyro.clear_param_store()
    model = CountingModel()
    seen = []
    result = fit(model, AutoMultivariateNormal(model), loss=Trace_ELBO(num_particles=3),
                 init=None, num_steps=10, seed=0, progress=False,
                 callbacks=[lambda state: seen.append(model.gradients)])
    assert result.num_evaluations == 30
    assert seen[-1] - seen[0] == 27  # the model runs counted between steps 1 and 10


# ------------------------------------------------------------------------------ bad input


def discrete_model():
    z = pyro.sample("z", dist.Bernoulli(0.3))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
    pyro.sample("w", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize("method", ["bam", "pathfinder"])
def test_bad_input_errors(method):
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"discrete latent sites \['z'\].*method='svi'"):
        fit(discrete_model, AutoNormal(pyro.poutine.block(discrete_model, hide=["z"])),
            method=method, progress=False)
    with pytest.raises(ValueError, match="AutoDelta.*AutoMultivariateNormal.*method='svi'"):
        fit(gaussian_model, AutoDelta(gaussian_model), method=method, progress=False)
    with pytest.raises(ValueError, match="does not take loss="):
        fit(gaussian_model, None, method=method, loss=Trace_ELBO(), progress=False)
    with pytest.raises(ValueError, match="unknown method_options"):
        fit(gaussian_model, None, method=method, method_options={"nope": 1}, progress=False)


def test_pathfinder_argument_errors():
    with pytest.raises(ValueError, match="num_paths must be an integer >= 1"):
        pyro_elbo.pathfinder(gaussian_model, num_paths=0)
    with pytest.raises(ValueError, match="num_draws"):
        pyro_elbo.pathfinder(gaussian_model, num_draws=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        fit(gaussian_model, None, method="advi")


def test_bam_nonfinite_batch_raises_naming_the_iteration():
    def broken():  # finite only for |x| < 1
        x = pyro.sample("x", dist.Normal(0.0, 0.01))
        pyro.factor("bad", torch.where(x.abs() < 1, -x * x, torch.tensor(float("nan"))))

    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pyro_elbo.NonFiniteError, match="iteration 1: [01] of 32 draws"):
            fit(broken, AutoNormal(broken), method="bam", progress=False, seed=0,
                method_options={"init": "prior", "init_scale": 1e4})


def test_bam_on_a_funnel_ends_unconverged_at_the_averaged_iterates():
    """The fixed point is never reached on a non-Gaussian posterior (the normalized step keeps
    the noise of B draws): the run says so and returns the average of the last half."""
    pyro.clear_param_store()
    result = fit(funnel, AutoMultivariateNormal(funnel), method="bam", seed=0, progress=False,
                 method_options={"max_iterations": 20, "batch_size": 8})
    assert not result.converged
    assert "average of the last 10 iterates" in result.reason
    assert result.num_steps == 20 and len(result.losses) == 20
    assert result.num_evaluations >= 20 * 8


def test_bam_writes_a_low_rank_guide():
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    pyro.clear_param_store()
    guide = AutoLowRankMultivariateNormal(gaussian_model, rank=2)
    result = fit(gaussian_model, guide, method="bam", seed=0, progress=False)
    assert result.converged
    q = pyro_elbo.posterior_of(guide)
    torch.testing.assert_close(q.mean.double(), MEAN, rtol=1e-6, atol=1e-6)
    # rank 2 + diagonal holds any 3 x 3 covariance: the KL-closest member is the target
    assert float(torch.distributions.kl_divergence(
        dist.MultivariateNormal(q.mean.double(), covariance_matrix=q.covariance_matrix.double()),
        TARGET)) < 1e-6


def test_low_rank_bam_matches_the_dense_computation():
    """vi/lowrank.py's factored update (no D x D matrix) against the dense BaM update, its
    Woodbury Fisher and KL against the dense ones, and the factor-analysis patch recovering a
    covariance that is rank 2 + diagonal from a redundant representation of it."""
    from pyro_elbo.vi import lowrank

    gen = torch.Generator().manual_seed(0)
    D, r, B = 8, 2, 5
    mu = torch.randn(D, generator=gen, dtype=torch.float64)
    psi = torch.rand(D, generator=gen, dtype=torch.float64) + 0.5
    factor = torch.randn(D, r, generator=gen, dtype=torch.float64)
    cov = torch.diag(psi) + factor @ factor.T
    z = torch.randn(B, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, D, generator=gen, dtype=torch.float64)
    for lr in (0.7, 50.0):
        dense_mu, dense_cov = bam.match(mu, cov, z, g, lr)
        new_mu, new_psi, F, G = lowrank.match(mu, psi, factor, z, g, lr)
        torch.testing.assert_close(new_mu, dense_mu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.diag(new_psi) + (F * G) @ F.T, dense_cov,
                                   rtol=1e-10, atol=1e-10)
    extra = torch.randn(D, 3, generator=gen, dtype=torch.float64)
    signs = torch.tensor([1.0] * 5 + [-1.0] * 3, dtype=torch.float64)
    fit_psi, fit_factor = lowrank.patch(psi, torch.cat([factor, extra, extra], 1), signs, r,
                                        sweeps=5000, tol=1e-14)
    torch.testing.assert_close(torch.diag(fit_psi) + fit_factor @ fit_factor.T, cov,
                               rtol=1e-8, atol=1e-8)
    state = lowrank.LowRankState(mu, psi, factor, 0)
    draws, _ = lowrank.sample(state, 4, gen)
    u = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), (draws - mu).T, upper=False).T
    torch.testing.assert_close(lowrank.fisher_per_draw(state, draws, g[:4]),
                               bam.fisher_per_draw(bam.init(mu, cov), u, g[:4]))
    other = lowrank.LowRankState(mu + 0.1, 1.3 * psi, 0.7 * factor, 1)
    dense_kl = bam._kl(other.mu, torch.diag(other.psi) + other.factor @ other.factor.T, mu, cov,
                       False)
    assert lowrank.kl(other, state) == pytest.approx(dense_kl, rel=1e-10)


def test_fit_low_rank_bam_is_exact_on_a_target_in_its_family():
    """fit(method="bam") with the O(D (r + B)^2) updates (low_rank=True; the default above 200
    dimensions) on a Gaussian whose covariance is rank 2 + diagonal: exact to 1e-6 after 5
    iterations of 32 draws, written into AutoLowRankMultivariateNormal."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(12, generator=gen, dtype=torch.float64)
    factor = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    cov = torch.diag(torch.rand(12, generator=gen, dtype=torch.float64) + 0.5) + factor @ factor.T

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, covariance_matrix=cov))

    pyro.clear_param_store()
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    result = fit(model, guide, method="bam", seed=0, progress=False, num_steps=5,
                 method_options={"low_rank": True, "init": "prior"})
    assert result.num_evaluations == 5 * 32
    q = pyro_elbo.posterior_of(guide)
    torch.testing.assert_close(q.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.covariance_matrix.double(), cov, rtol=1e-6, atol=1e-6)


def test_default_method_takes_bam_when_it_converges_and_svi_when_not():
    pyro.clear_param_store()
    result = fit(gaussian_model, None, seed=0, progress=False, escalate=False)
    assert result.reason.startswith("method='auto' chose BaM")
    assert _kl_to_target(result.guide) < 1e-10
    # up to 32 dimensions BaM starts from the Laplace stage, exact here: the score-match test
    # on 8 draws confirms it before any BaM iteration
    assert result.init.ran and result.num_steps == 0 and "score match" in result.reason
    assert result.num_evaluations == result.init.result.num_evaluations + 8
    pyro.clear_param_store()
    result = fit(funnel, None, seed=0, progress=False, max_steps=100, escalate=False)
    assert "BaM passed neither of its stopping tests in 30 iterations" in result.reason
    assert result.diagnostics["bam"]["residual"]
    bam_count = result.diagnostics["bam_evaluations"]
    assert bam_count >= 30 * 32
    assert result.num_evaluations == (
        bam_count + result.init.result.num_evaluations + 4 * result.num_steps
    )
    # a guide, or any setting of the stochastic-gradient loop, keeps "svi"
    pyro.clear_param_store()
    result = fit(gaussian_model, AutoMultivariateNormal(gaussian_model), num_steps=3,
                 progress=False)
    assert result.num_steps == 3 and result.loss is not None


def test_bam_checkpoint_resumes_bit_for_bit(tmp_path):
    calls = []

    def counted():
        calls.append(1)
        funnel()

    def run(num_steps, path):
        pyro.clear_param_store()
        calls.clear()
        guide = AutoMultivariateNormal(counted)
        result = fit(counted, guide, method="bam", seed=0, progress=False, num_steps=num_steps,
                     checkpoint=path, checkpoint_every=2, method_options={"batch_size": 8})
        return result, guide.loc.detach().clone(), guide.scale.detach().clone(), len(calls)

    whole, loc, scale, whole_calls = run(6, tmp_path / "a.pt")
    run(3, tmp_path / "b.pt")
    resumed, loc2, scale2, resumed_calls = run(6, tmp_path / "b.pt")
    assert torch.equal(loc, loc2) and torch.equal(scale, scale2)
    # it continued from iteration 3: no Laplace stage, 3 batches of 8 instead of 6
    assert resumed_calls <= whole_calls - 3 * 8
    assert resumed.num_evaluations == whole.num_evaluations
    assert list(resumed.losses) == list(whole.losses)


def test_bam_checkpoint_path_is_locked_like_fits(tmp_path):
    """A second writer on BaM's checkpoint path is refused before any iteration, naming the
    holder (fit's lock); the lock is released when the run ends."""
    from pyro_elbo.fit import CheckpointLockedError
    from pyro_elbo.fit.location import acquire_lock

    path = tmp_path / "bam.pt"

    def run():
        pyro.clear_param_store()
        return fit(funnel, AutoMultivariateNormal(funnel), method="bam", seed=0, progress=False,
                   num_steps=2, checkpoint=path, method_options={"batch_size": 8})

    with acquire_lock(path):
        with pytest.raises(CheckpointLockedError, match=rf"in use by process {os.getpid()}"):
            run()
        assert not path.exists()
    assert run().num_steps == 2 and path.exists()  # released, then taken and released again
    assert run().num_steps == 2


# ------------------------------------------------- Pathfinder: progress, checkpoints, NaN guard

PF_OPTIONS = {"num_paths": 4, "num_draws": 100, "draws_per_path": 50}


def _pathfinder_fit(model, seed=1, **settings):
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pathfinder: PSIS k-hat")  # the funnel's, expected
        result = fit(model, guide, method="pathfinder", seed=seed, method_options=PF_OPTIONS,
                     **settings)
    return result, guide.loc.detach().clone(), guide.scale_tril.detach().clone()


def test_pathfinder_progress_bar_does_not_change_the_answer(capsys):
    quiet, loc, tril = _pathfinder_fit(funnel, progress=False)
    assert "pathfinder" not in capsys.readouterr().err
    shown, loc2, tril2 = _pathfinder_fit(funnel, progress=True)
    err = capsys.readouterr().err
    assert "pathfinder" in err and "path 4/4" in err
    assert torch.equal(loc, loc2) and torch.equal(tril, tril2)
    assert list(quiet.losses) == list(shown.losses)
    assert quiet.num_evaluations == shown.num_evaluations


def test_pathfinder_checkpoint_resumes_bit_for_bit(tmp_path, monkeypatch):
    from pyro_elbo.fit import CheckpointMismatchError
    from pyro_elbo.vi import multipath

    whole, loc, tril = _pathfinder_fit(funnel, progress=False)
    calls, real = [], multipath.single.single_path

    def crash_on_third_path(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(multipath.single, "single_path", crash_on_third_path)
    path = tmp_path / "pf.pt"
    with pytest.raises(RuntimeError, match="killed"):
        _pathfinder_fit(funnel, progress=False, checkpoint=path)
    calls.clear()
    resumed, loc2, tril2 = _pathfinder_fit(funnel, progress=False, checkpoint=path)
    assert len(calls) == 2  # paths 1 and 2 came from the checkpoint
    assert torch.equal(loc, loc2) and torch.equal(tril, tril2)
    assert list(resumed.losses) == list(whole.losses)
    assert resumed.num_evaluations == whole.num_evaluations
    assert resumed.diagnostics["paths"] == whole.diagnostics["paths"]
    assert resumed.diagnostics["khat"] == whole.diagnostics["khat"]
    pyro.clear_param_store()
    with pytest.raises(CheckpointMismatchError, match="options"):
        fit(funnel, AutoMultivariateNormal(funnel), method="pathfinder", seed=1,
            progress=False, checkpoint=path, method_options={**PF_OPTIONS, "num_draws": 99})
    with pytest.raises(CheckpointMismatchError, match="seed: checkpoint 1, this run 2"):
        fit(funnel, AutoMultivariateNormal(funnel), method="pathfinder", seed=2,
            progress=False, checkpoint=path, method_options=PF_OPTIONS)


def test_pathfinder_nan_guard_drops_paths_and_names_the_problem():
    from pyro_elbo.fit import NonFiniteError

    def walled():  # log joint -inf for x > 1; the posterior sits near -1.8, sd 0.29
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(x > 1.0, -math.inf, 0.0))
        pyro.sample("y", dist.Normal(x, 0.3), obs=torch.tensor(-2.0))

    result, loc, _ = _pathfinder_fit(walled, seed=0, progress=False)  # path 0 starts at x > 1
    dropped = [p for p in result.diagnostics["paths"] if "error" in p]
    kept = [p for p in result.diagnostics["paths"] if "error" not in p]
    assert dropped and kept
    assert all("not finite at the start point" in p["reason"] for p in dropped)
    assert abs(float(loc) - (-2.0 / 0.09) / (1 + 1 / 0.09)) < 1e-4

    def finite_only_near_zero():  # the paths start at x ~ U(-2, 2): every one is dropped
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(x.abs() > 0.01, -math.inf, 0.0))

    with pytest.raises(NonFiniteError, match="no path gave a usable approximation.*path 3"):
        _pathfinder_fit(finite_only_near_zero, progress=False)
