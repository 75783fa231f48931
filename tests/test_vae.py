"""The VAE example on scikit-learn's digits (issue 7), in its fast setting.

* MATH.md's closed-form Gaussian KL equals ``kl_divergence``, and ``ELBO(analytic_kl=True)`` uses
  exactly it on the VAE (per image, times the minibatch scale).
* Training lowers the loss for every objective, and the trained model's importance-sampled test
  log-likelihood is finite and beats the untrained model's by a wide margin (paired SE units).
* The importance-sampling estimate of log p(x_i) agrees with quadrature on a one-dimensional latent
  space (where log p(x_i) = log of a 1-d integral is computable on a grid).
* The figure and the command line write their files.
"""

import math

import pyro
import pytest
import torch
from torch.distributions import Normal, kl_divergence

pytest.importorskip("sklearn")

from pyro_elbo.engine.particles import run_particles  # noqa: E402
from pyro_elbo.examples import vae as V  # noqa: E402
from pyro_elbo.objectives.analytic_kl import analytic_kl_terms  # noqa: E402
from pyro_elbo.objectives.elbo import ELBO  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return V.load_digits(**{k: V.FAST[k] for k in ("num_test", "num_train")})


@pytest.fixture(scope="module")
def trained(data):
    return V.train_vae("vae", fast=True, data=data)


def test_gaussian_kl_is_the_closed_form_of_kl_divergence():
    torch.manual_seed(0)
    loc, scale = torch.randn(50, 6), torch.rand(50, 6) * 2 + 0.05
    expected = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(V.gaussian_kl(loc, scale), expected, rtol=1e-6, atol=1e-6)
    assert V.gaussian_kl(torch.zeros(3, 4), torch.ones(3, 4)).abs().max() == 0


def test_analytic_kl_elbo_uses_the_closed_form(data):
    vae = V.VAE(latent_dim=3, hidden=16)
    x = data.test[:20]
    particles = run_particles(
        vae.model, vae.guide, (x,), {"num_data": 80}, num_particles=1, plate_nesting=1
    )
    (term,) = analytic_kl_terms(particles)
    assert term.name == "z"
    loc, scale = vae.guide.encode(x)
    assert torch.allclose(term.kl.reshape(-1), 4.0 * V.gaussian_kl(loc, scale), rtol=1e-5)


def test_training_improves_the_test_log_likelihood(data, trained):
    assert trained.losses[-1] < trained.losses[0] - 3.0, trained.losses
    pyro.set_rng_seed(0)
    untrained = V.VAE(latent_dim=V.FAST["latent_dim"], hidden=V.FAST["hidden"])
    before = V.evaluate_log_likelihood(untrained, data.test, num_samples=1000)
    after = V.evaluate_log_likelihood(trained.vae, data.test, num_samples=1000)
    assert torch.isfinite(after.per_image).all() and after.mc_se < 0.05
    gain, gain_se = after.difference(before)
    assert gain > 5.0 and gain > 10 * gain_se, (before, after)
    # the importance-sampled estimate is at least the ELBO on the same images, and not far above
    elbo = -ELBO(200).loss(trained.vae.model, trained.vae.guide, data.test) / data.test.shape[0]
    assert elbo - 0.005 < after.mean < elbo + 2.0, (after.mean, elbo)


@pytest.mark.parametrize("objective", list(V.OBJECTIVES))
def test_every_objective_trains(objective, data):
    result = V.train_vae(objective, fast=True, data=data, epochs=12)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] < result.losses[0] - 2.0, result.losses


def test_importance_sampling_matches_quadrature(data):
    """With one latent dim, log p(x_i) = log int p(x_i | z) N(z; 0, 1) dz on a fine grid."""
    result = V.train_vae("iwae5", fast=True, data=data, latent_dim=1, epochs=15)
    vae, x = result.vae, data.test[:40]
    estimate = V.evaluate_log_likelihood(vae, x, num_samples=2000)
    grid = torch.linspace(-9, 9, 4001)
    with torch.no_grad():
        logits = vae.decoder(grid.unsqueeze(-1))  # (G, 64)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.unsqueeze(1).expand(-1, x.shape[0], -1),
            x.expand(grid.shape[0], -1, -1),
            reduction="none",
        ).sum(-1)  # (G, N)
        log_joint = log_lik + Normal(0.0, 1.0).log_prob(grid).unsqueeze(-1)
        exact = torch.logsumexp(log_joint, 0) + math.log(float(grid[1] - grid[0]))
    z = (estimate.per_image - exact) / estimate.per_image_mc_se.clamp_min(1e-6)
    assert (z.abs() < 5).all(), z
    assert abs(estimate.mean - float(exact.mean())) < 5 * estimate.mc_se + 1e-3


def test_plot_and_command_line(tmp_path, trained, data):
    path = V.plot(trained.vae, data.test, str(tmp_path / "figures"))
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 300

    out = tmp_path / "cli"
    code = V.main(
        ["--fast", "--objective", "vae", "iwae5", "--epochs", "3", "--samples", "200",
         "--out", str(out)]
    )
    assert code == 0
    table = (out / "vae_table.md").read_text()
    assert "IWELBO K=5, reparam (IWAE)" in table and "nan" not in table
    assert (out / "vae_vae.png").exists() and (out / "vae_iwae5.png").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="objective must be one of"):
        V.train_vae("vimco", fast=True)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        V.train_vae("vae", fast=True, epochs=0)
    with pytest.raises(ValueError, match="num_test must be between"):
        V.load_digits(num_test=0)
