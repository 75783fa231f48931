"""Scores of a fitted guide against a case's reference: mean errors, sd and IQR ratios, KL for
the exact cases, PSIS k-hat, and the same from PSIS-reweighted draws."""

from __future__ import annotations

import statistics
import warnings

import torch

from benchmarks.stress.cases import Case
from pyro_elbo.engine.traces import forked_rng


def _as_mvn(q):
    """Any Gaussian over a vector as a MultivariateNormal (for the closed-form KL)."""
    if isinstance(q, torch.distributions.MultivariateNormal):
        return q
    cov = getattr(q, "covariance_matrix", None)
    if cov is None:
        cov = torch.diag_embed(q.variance)
    return torch.distributions.MultivariateNormal(q.mean, covariance_matrix=cov)


def _importance(case: Case, guide, num_draws: int, seed: int, model=None):
    """(log weights p(x, z) / q(z), model trace) for ``num_draws`` vectorized guide draws;
    ``model``: the model the guide was fitted to when not ``case.model`` (a non-centered
    rewrite, whose trace still holds the original sites as deterministic ones)."""
    from pyro.infer.importance import vectorized_importance_weights

    with forked_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        log_w, model_trace, _ = vectorized_importance_weights(
            model or case.model, guide, *case.args, num_samples=num_draws, max_plate_nesting=1)
    return log_w.detach().double(), model_trace


def _psis(log_w):
    """(normalized Pareto-smoothed weights, k-hat); k-hat is -inf when the weights are all
    equal (q is the posterior)."""
    import arviz as az

    if float(log_w.max() - log_w.min()) < 1e-9:
        return torch.full_like(log_w, 1 / len(log_w)), float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, k = az.psislw(log_w.numpy())
    weights = torch.as_tensor(smoothed).exp()
    return weights / weights.sum(), float(k)


def khat(case: Case, guide, num_particles: int = 2000, model=None) -> float:
    """PSIS k-hat of the guide's importance weights p(x, z) / q(z) (Yao et al. 2018)."""
    return _psis(_importance(case, guide, num_particles, 777, model)[0])[1]


def _weighted_quantile(flat, weights, q):
    """Quantile ``q`` of each column of ``flat`` under normalized ``weights`` (the first draw
    whose cumulative weight reaches q)."""
    order = flat.argsort(0)
    cum = weights[order].cumsum(0)
    index = (cum < q).sum(0).clamp(max=len(weights) - 1)
    return flat.gather(0, order.gather(0, index[None]))[0]


def _moments(case: Case, trace, num_draws: int, weights=None) -> dict:
    """Scores of the (weighted) draws in a model trace against ``case.reference``: max |mean
    error| / sd, sd ratios and, where the reference gives the exact IQR, IQR ratios."""
    if weights is None:
        weights = torch.full((num_draws,), 1 / num_draws, dtype=torch.float64)
    errors, ratios, iqr_ratios, sites = [], [], [], {}
    for name, ref in case.reference.items():
        flat = trace.nodes[name]["value"].detach().double().reshape(num_draws, -1)
        mean = (weights[:, None] * flat).sum(0)
        sd = ((weights[:, None] * (flat - mean).pow(2)).sum(0)).sqrt()
        ref_mean = torch.tensor(ref["mean"], dtype=torch.float64)
        ref_sd = torch.tensor(ref["sd"], dtype=torch.float64)
        site_errors = ((mean - ref_mean).abs() / ref_sd).tolist()
        site_ratios = (sd / ref_sd).tolist()
        sites[name] = {"max_mean_error": max(site_errors), "min_sd_ratio": min(site_ratios),
                       "max_sd_ratio": max(site_ratios)}
        if "iqr" in ref:
            iqr = (_weighted_quantile(flat, weights, 0.75)
                   - _weighted_quantile(flat, weights, 0.25))
            site_iqr = (iqr / torch.tensor(ref["iqr"], dtype=torch.float64)).tolist()
            sites[name].update(min_iqr_ratio=min(site_iqr), max_iqr_ratio=max(site_iqr))
            iqr_ratios += site_iqr
        errors += site_errors
        ratios += site_ratios
    out = {"max_mean_error": max(errors), "median_sd_ratio": statistics.median(ratios),
           "min_sd_ratio": min(ratios), "max_sd_ratio": max(ratios), "sites": sites}
    if iqr_ratios:
        out.update(median_iqr_ratio=statistics.median(iqr_ratios),
                   min_iqr_ratio=min(iqr_ratios), max_iqr_ratio=max(iqr_ratios))
    return out


def score(case: Case, guide, num_draws: int = 4000, with_khat: bool = True,
          model=None) -> dict:
    """max |mean error| / ref sd, median sd / ref sd (and IQR ratios where the reference has
    exact IQRs) over scalar latents, from ``num_draws`` guide draws; KL when exact."""
    from pyro_elbo.guides.posterior import posterior_of

    _, trace = _importance(case, guide, num_draws, 12345, model)
    out = _moments(case, trace, num_draws)
    if case.oracle is not None:
        q = _as_mvn(posterior_of(guide, *case.args))
        p = case.oracle.posterior()
        out["kl"] = float(torch.distributions.kl_divergence(q, p))
    if with_khat:
        out["khat"] = khat(case, guide, model=model)
    return out


def _gaussian_of(guide):
    """q as a MultivariateNormal, from the guide's own factors (posterior_of goes through
    the covariance, whose Cholesky fails at condition numbers past 1e13)."""
    from pyro.infer.autoguide import AutoContinuous

    from pyro_elbo.guides.posterior import posterior_of

    if isinstance(guide, AutoContinuous):
        with torch.no_grad():
            q = guide.get_posterior()
        if isinstance(q, torch.distributions.MultivariateNormal):
            return torch.distributions.MultivariateNormal(
                q.loc.detach(), scale_tril=q.scale_tril.detach())
        return _as_mvn(q)
    return _as_mvn(posterior_of(guide))


def psis_score(case: Case, guide, num_draws: int = 4000, model=None, seed: int = 54321) -> dict:
    """The same scores from guide draws reweighted by Pareto-smoothed importance sampling
    (Vehtari et al. 2015; Agrawal et al. 2020's importance-weighted sampling): self-normalized
    weights ``p(x, z) / q(z)``, smoothed by ``arviz.psislw``."""
    log_w, model_trace = _importance(case, guide, num_draws, seed, model)
    weights, k = _psis(log_w)
    return {**_moments(case, model_trace, num_draws, weights), "khat": k}
