"""The demo's table explains itself: legend, one verdict line, SEs with significant digits, and
the analytic-KL rows saying when the closed form did not apply and why."""

import pyro
import pytest
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_elbo.conjugate import GammaPoisson, NormalNormal
from pyro_elbo.demo import _sig, closed_form_sites, format_table, verdict


@pytest.mark.parametrize(
    "oracle, guide_class, closed, why",
    [
        (NormalNormal.simulate(20, seed=0), AutoNormal, True, ""),
        (NormalNormal.simulate(20, seed=0), AutoMultivariateNormal, False, "a joint guide"),
        (GammaPoisson.simulate(20, seed=0), AutoNormal, False, "constrained site(s) rate"),
    ],
)
def test_closed_form_sites_says_why_not(oracle, guide_class, closed, why):
    pyro.clear_param_store()
    sites, reason = closed_form_sites(oracle, guide_class(oracle.model))
    assert bool(sites) is closed
    assert reason.startswith(why)


def test_se_has_two_significant_digits():
    assert _sig(-71.234567, 0.000123) == "-71.23457 ± 0.00012"
    assert _sig(-71.234567, 0.0456) == "-71.235 ± 0.046"
    assert _sig(-71.234567, 1.5) == "-71.2 ± 1.5"


ROW = dict(model="M", guide="AutoNormal", objective="ELBO(4)", steps=300, converged=True,
           seconds=1.0, elbo=-70.0, elbo_se=0.0003, log_evidence=-69.99, kl=0.01,
           kl_kind="closed form", residual_se_units=0.5)


def test_table_has_legend_verdict_and_the_reason_a_row_was_not_refitted():
    skipped = dict(model="M", guide="AutoMultivariateNormal", objective="ELBO(4, analytic_kl)",
                   note="closed form did not apply (a joint guide): same fit as ELBO(4)")
    bad = dict(ROW, residual_se_units=-6.0)
    table = format_table([ROW, skipped, bad])
    assert "residual: (log p(x) - ELBO - KL) / SE" in table  # the legend
    assert "± 0.000 " not in table and "-70.00000 ± 0.00030" in table
    assert "closed form did not apply (a joint guide)" in table
    assert table.splitlines()[-1] == verdict([ROW, skipped, bad])
    assert verdict([ROW, skipped, bad]).startswith("FAIL: 1 of 2 fits have ELBO + KL(q‖p) "
                                                   "within 4 SE of the exact log p(x)")
    assert verdict([ROW]).startswith("PASS: 1 of 1 fits")


def test_figure_shows_each_fit_gap_and_residual():
    from pyro_elbo.demo import plot_identity

    rows = [ROW, dict(ROW, model="N", kl=0.05, elbo=-70.04, residual_se_units=-1.5),
            dict(ROW, objective="ELBO(4, analytic_kl)", note="skipped", elbo=None)]
    rows[-1].pop("elbo")
    fig = plot_identity(rows)
    left, right = fig.axes[:2]
    (crosses,) = [line for line in left.lines if line.get_marker() == "x"]
    assert list(crosses.get_xdata()) == [-0.01, -0.05]  # -KL of each fitted row
    (dots,) = [line for line in right.lines if line.get_marker() == "o"]
    assert list(dots.get_xdata()) == [0.5, -1.5]  # the residuals in SE
    assert {t.get_text() for t in left.get_yticklabels()} == {
        "M · Normal · ELBO(4)", "N · Normal · ELBO(4)"}
