"""A variational autoencoder on real data: scikit-learn's handwritten digits.

The data are the 1,797 8x8 images of ``sklearn.datasets.load_digits`` (shipped with scikit-learn,
no download), with pixel intensities 0..16 read as Bernoulli probabilities ``v / 16``: training
images are binarized afresh every epoch (dynamic binarization), the held-out test images once,
with a fixed seed.

Model and guide (Kingma & Welling 2014; MATH.md §1-§3)::

    z_i ~ N(0, I_d),        x_i | z_i ~ Bernoulli(logits = decoder(z_i))       (64 pixels)
    q(z_i | x_i) = N(mu(x_i), diag sigma(x_i)^2)                (AmortizedNormal, an MLP encoder)

Objectives compared (Burda, Grosse & Salakhutdinov 2016; Roeder et al. 2017; Tucker et al. 2019):

* ``vae``:    ELBO, one particle, with the closed-form Gaussian KL of MATH.md (2),
  ``KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 2 log sigma - 1)`` per dimension
  (:func:`gaussian_kl`; ``ELBO(analytic_kl=True)`` takes it from ``kl_divergence``);
* ``stl``:    ELBO, one particle, sticking-the-landing gradient;
* ``iwae5``, ``iwae50``: IWELBO with K = 5 and 50, pathwise (IWAE) gradient;
* ``dreg5``, ``dreg50``: IWELBO with K = 5 and 50, doubly reparameterized gradient.

The test-set log-likelihood is estimated per image by importance sampling with the trained
encoder as proposal, ``log p(x_i) ~= log (1/S) sum_s p(x_i, z_s) / q(z_s | x_i)``, S >= 1000
(Burda et al. use S = 5000), a stochastic lower bound.  Two standard errors are reported: the
Monte Carlo SE of the estimate (delta method, per image, combined) and the SE of the test-set mean
over images.  Differences between models are in paired SE units (the same test images).

Entry points: :func:`train_vae`, :func:`evaluate_log_likelihood`, :func:`compare`, :func:`plot`,
and the command line ``pyro-elbo vae`` (:func:`main`).
"""

from pyro_elbo.examples.vae.cli import main
from pyro_elbo.examples.vae.comparison import compare, format_pairs, format_table
from pyro_elbo.examples.vae.data import Digits, load_digits
from pyro_elbo.examples.vae.evaluation import LogLikelihood, evaluate_log_likelihood
from pyro_elbo.examples.vae.figure import plot
from pyro_elbo.examples.vae.model import VAE, gaussian_kl
from pyro_elbo.examples.vae.training import FAST, FULL, OBJECTIVES, PAIRS, TrainResult, train_vae

__all__ = [
    "OBJECTIVES",
    "PAIRS",
    "VAE",
    "Digits",
    "LogLikelihood",
    "TrainResult",
    "FAST",
    "FULL",
    "compare",
    "format_pairs",
    "format_table",
    "evaluate_log_likelihood",
    "gaussian_kl",
    "load_digits",
    "main",
    "plot",
    "train_vae",
]
