"""Stress suite: right answers at the defaults on badly scaled, strongly correlated posteriors.

``python -m benchmarks.stress [--cases ...] [--quick]`` writes ``benchmarks/results/stress.json``
and ``stress.md``.  Every data set is generated here (fixed seeds):

* ``linreg_intercept``, ``linreg_raw``: :class:`pyro_elbo.conjugate.LinearRegression` oracles
  (float64) on uncentered raw-scale designs, N = 1000: columns with means 100 to 4000 and sds 1
  to 1000, posterior correlations above 0.999 and posterior sd ratios of 1e3 and more.  Exact:
  KL(q || p) is computed in closed form;
* ``schools_centered``, ``schools_noncentered``: an eight-schools-like hierarchical model with
  our own numbers (J = 8), in both parameterizations; NUTS reference (non-centered NUTS, the
  centered thetas derived from it);
* ``logistic``: logistic regression on raw-scale predictors (means 100 and 4000), N = 1000;
* ``poisson``: a Poisson GLM with an exposure offset and raw-scale predictors, N = 500;
* ``ar2``: an AR(2) series with mean 100, T = 300;
* ``mixture``: a two-component Gaussian mixture with ordered locations (OrderedTransform prior),
  the assignment marginalized, N = 400;
* ``funnel``: Neal's funnel in 10 dimensions (exact marginals); ``banana``: a twisted Gaussian
  (exact moments);
* ``gp_poisson``: Poisson counts under a latent GP with latent lengthscale and amplitude, N = 30;
  ``hier_logistic``: logistic regression with 50 centered group intercepts, N = 1000 (NUTS
  500 + 1000 draws for these two).

The NUTS cases are float32, as users' models usually are.  NUTS runs in the whitened
coordinates of the Laplace approximation (a linear reparameterization: the target is unchanged;
plain NUTS on raw-scale predictors spends its warm-up at tree depth 10), 1000 warm-up and 4000
kept draws; its minimum ESS and divergences are reported.

For each case and setting the table gives the max over scalar latents of |mean error| / ref sd,
the median of sd / ref sd (both in the model's constrained space, from 4000 guide draws), KL for
the exact cases, and PSIS k-hat of the fitted guide (Yao et al. 2018).  Settings:

* ``pyro_mf``, ``pyro_mvn``: Pyro's defaults: AutoNormal or AutoMultivariateNormal
  (``init_scale=0.1``), ``Adam(lr=0.01)``, 5,000 steps, ``Trace_ELBO``;
* ``fit``: ``pyro_elbo.fit(model, None, *args)``, every default (the escalating one: Gaussian,
  then a flow when k-hat >= 0.7); scored on its PSIS-resampled draws when ``result.resample``
  says so (the raw guide's scores under ``raw`` in the JSON);
* ``ours``: the stages ``pyro_elbo.fit`` runs by default, by hand for a fixed budget:
  :func:`pyro_elbo.init.recommended_guide`,
  :func:`pyro_elbo.init.laplace_init`, then :class:`pyro_elbo.init.WhitenedAdam` and the STL
  ELBO (:func:`pyro_elbo.init.recommended_objective`) for :data:`OURS_STEPS` steps;
* ``best``: the same with more particles and steps and iterate averaging (:data:`BEST`).

The package, one job per module: :mod:`.cases` (the models and their data, :data:`CASES`),
:mod:`.references` (exact and cached NUTS references), :mod:`.scoring` (mean errors, sd and IQR
ratios, KL, k-hat, PSIS), :mod:`.settings` (the settings above and :func:`run_case`),
:mod:`.experiments` (``--experiments``: conditioning, guides, funnel), :mod:`.report` (the
markdown), :mod:`.cli` (``python -m benchmarks.stress``).  Every name is re-exported here.
"""

from benchmarks.stress.cases import (  # noqa: F401
    CASES,
    FUNNEL_DIM,
    NORMAL_IQR,
    SCHOOLS_SIGMA,
    Case,
    _normal_mixture_iqr,
    _schools_data,
    ar2,
    ar2_model,
    banana,
    banana_model,
    funnel,
    funnel_model,
    gp_poisson,
    gp_poisson_model,
    hier_logistic,
    hier_logistic_model,
    linreg_intercept,
    linreg_raw,
    logistic,
    logistic_model,
    mixture,
    mixture_model,
    poisson,
    poisson_model,
    raw_design,
    schools_centered,
    schools_centered_model,
    schools_noncentered,
    schools_noncentered_model,
)
from benchmarks.stress.cli import (  # noqa: F401
    main,
)
from benchmarks.stress.experiments import (  # noqa: F401
    CHECKPOINTS,
    _coordinate_errors,
    _headline,
    _optimizers,
    _perturb,
    conditioning_experiment,
    funnel_experiment,
    guide_experiment,
    wide_design,
)
from benchmarks.stress.references import (  # noqa: F401
    REFERENCE_FILE,
    RESULTS,
    _summaries,
    exact_reference,
    load_references,
    nuts_reference,
)
from benchmarks.stress.report import (  # noqa: F401
    _fmt,
    _iqr,
    _label,
    markdown,
)
from benchmarks.stress.scoring import (  # noqa: F401
    _as_mvn,
    _gaussian_of,
    _importance,
    _moments,
    _psis,
    _weighted_quantile,
    khat,
    psis_score,
    score,
)
from benchmarks.stress.settings import (  # noqa: F401
    BEST,
    OURS_LR,
    OURS_STEPS,
    PYRO_STEPS,
    SETTINGS,
    fit_defaults,
    pipeline,
    pyro_defaults,
    run_case,
    run_svi,
)

