"""Scaling-law fitting math: forms, bootstrap over runs, held-out checks, local slopes, compute multipliers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.bootstrap import GroupedRuns, PredictionBand, bootstrap_fit
from analysis.extrapolation import choose_form, holdout, holdout_all, leave_one_out
from analysis.forms import FORMS, LOGLINEAR, POWER, SATURATING, get_form
from analysis.slopes import (
    compute_multiplier,
    invert_fit,
    local_slopes,
    multiplier_at_common_best,
)

X = np.geomspace(0.5, 500.0, 7)  # three decades of GFLOP/example
TRUTH = {
    "saturating": {"E": 0.29, "A": 0.02, "alpha": 0.35},  # a logloss whose floor dominates
    "power": {"A": 0.5, "alpha": 0.12},
    "loglinear": {"a": 0.55, "b": -0.0053},  # HSTU's NE law
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_recovers_parameters_from_noiseless_data(name):
    form = get_form(name)
    fit = form.fit(X, form.predict(TRUTH[name], X))
    assert fit.ok, fit.message
    assert fit.n_points == X.size
    for key, value in TRUTH[name].items():
        assert fit.params[key] == pytest.approx(value, rel=1e-6), key
    assert np.allclose(fit.predict(X), form.predict(TRUTH[name], X), rtol=1e-9)


@pytest.mark.parametrize("name,noise", [("saturating", 4e-4), ("power", 1e-3), ("loglinear", 4e-4)])
def test_noisy_seeds_truth_inside_bootstrap_interval(name, noise):
    form = get_form(name)
    truth = TRUTH[name]
    rng = np.random.default_rng(0)
    x = np.repeat(X, 4)  # 4 seeds per scale
    group = np.repeat(np.arange(X.size), 4)
    y = form.predict(truth, x) + rng.normal(0.0, noise, x.size)
    boot = bootstrap_fit(form, x, y, group, x_grid=X, n_resamples=200, seed=1)
    assert boot.point.ok, boot.point.message
    assert boot.n_failed == 0 and boot.samples.shape == (200, form.n_params)
    assert boot.sigma_seed == pytest.approx(noise, rel=0.3)
    for key, value in truth.items():
        interval = boot.params[key]
        assert interval.p2_5 < interval.p10 < interval.p90 < interval.p97_5
        assert interval.contains(value, 0.95), (key, value, interval)
        assert 0 < interval.se < 0.2 * abs(value), (key, interval)  # informative, not degenerate
    band, point = boot.band, boot.point.predict(X)
    assert ((band.lo < point) & (point < band.hi)).all()
    # The 80 % band is pointwise and correlated along x; the truth is within one band width of its centre.
    assert (np.abs(form.predict(truth, X) - band.median) < band.hi - band.lo).all()


def test_power_law_forms_reject_non_positive_y():
    y = np.linspace(-0.5, -0.1, X.size)  # e.g. Wukong's relative logloss %
    for form in (SATURATING, POWER):
        with pytest.raises(ValueError, match="y > 0"):
            form.fit(X, y)
    assert LOGLINEAR.fit(X, y).ok  # the log-linear form takes a signed metric


def test_fit_that_cannot_converge_is_not_ok():
    y = SATURATING.predict(TRUTH["saturating"], X) * (1 + np.random.default_rng(0).normal(0, 1e-3, X.size))
    fit = SATURATING.fit(X, y, maxiter=1)
    assert not fit.converged and not fit.ok
    assert "LIMIT" in fit.message.upper()


def test_fit_that_does_not_move_from_its_start_is_not_ok():
    # Started exactly at the optimum of noiseless data, the optimiser has nothing to do: the returned
    # parameters are its initial point, which is what a failed fit looks like (Porian et al.'s grid guess).
    for name in ("saturating", "power"):
        form = get_form(name)
        fit = form.fit(X, form.predict(TRUTH[name], X), start=TRUTH[name])
        assert fit.converged and not fit.moved_from_start and not fit.ok, name


def test_loglinear_with_one_distinct_x_is_not_ok():
    fit = LOGLINEAR.fit(np.full(4, 3.0), np.array([0.3, 0.31, 0.29, 0.3]))
    assert not fit.ok and "rank" in fit.message


def test_weights_pull_the_fit_towards_precise_points():
    y = LOGLINEAR.predict(TRUTH["loglinear"], X)
    y_bad = y.copy()
    y_bad[1] += 0.01
    w = np.ones(X.size)
    w[1] = 1e-6  # the outlier has a huge sigma
    assert LOGLINEAR.fit(X, y_bad, w).params["b"] == pytest.approx(TRUTH["loglinear"]["b"], rel=1e-3)
    assert LOGLINEAR.fit(X, y_bad).params["b"] != pytest.approx(TRUTH["loglinear"]["b"], rel=1e-3)
    # Log-space Huber fit: a heavy weight on one point pulls the curve through it; rescaling weights does nothing.
    ys = SATURATING.predict(TRUTH["saturating"], X) * (1 + np.random.default_rng(1).normal(0, 2e-3, X.size))
    heavy = np.ones(X.size)
    heavy[2] = 1e3
    plain, pulled = SATURATING.fit(X, ys), SATURATING.fit(X, ys, heavy)
    assert plain.ok and pulled.ok
    assert abs(np.log(pulled.predict(X[2]) / ys[2])) < 0.1 * abs(np.log(plain.predict(X[2]) / ys[2]))
    assert SATURATING.fit(X, ys, 7 * heavy).params == pytest.approx(pulled.params, rel=1e-6)


def test_aic_prefers_the_true_form():
    y = SATURATING.predict({"E": 0.25, "A": 0.05, "alpha": 0.5}, X) + np.random.default_rng(3).normal(0, 2e-4, X.size)
    assert SATURATING.fit(X, y).aic < LOGLINEAR.fit(X, y).aic


def test_single_run_groups_get_pooled_seed_noise():
    rng = np.random.default_rng(5)
    sigma = 0.01
    x = np.array([1.0] * 6 + [2.0] * 6 + [4.0])
    y = np.concatenate([0.5 + rng.normal(0, sigma, 6), 0.4 + rng.normal(0, sigma, 6), [0.3]])
    group = np.array([0] * 6 + [1] * 6 + [2])
    runs = GroupedRuns.from_runs(x, y, group)
    assert runs.sigma_seed == pytest.approx(sigma, rel=0.5)
    assert runs.n_parametric == 1
    means = runs.resample_means(4000, np.random.default_rng(0))
    assert means[:, 2].std() == pytest.approx(runs.sigma_seed, rel=0.1)  # one run: sd of its mean = sigma
    assert means[:, 0].std() < means[:, 2].std()  # six runs: smaller
    alone = GroupedRuns.from_runs(x[[0, 6, 12]], y[[0, 6, 12]], group[[0, 6, 12]])
    assert np.isnan(alone.sigma_seed) and alone.n_parametric == 0
    assert np.ptp(alone.resample_means(50, np.random.default_rng(0)), axis=0).max() == 0.0


# ------------------------------------------------------------------------------------------ held-out checks

def test_holdout_errors_on_exact_and_perturbed_data():
    truth = TRUTH["loglinear"]
    y = LOGLINEAR.predict(truth, X)
    exact = holdout(LOGLINEAR, X, y, k=1)
    assert abs(exact.points[0].error) < 1e-12 and exact.fit.ok

    bump = 0.002
    y_pert = y.copy()
    y_pert[-1] += bump  # the largest scale is worse than the law by `bump`
    res = holdout(LOGLINEAR, X, y_pert, k=2)
    second, last = res.points
    assert second.x == X[-2] and abs(second.error) < 1e-12
    assert last.observed == pytest.approx(y[-1] + bump)
    assert last.predicted == pytest.approx(y[-1], abs=1e-12)
    assert last.error == pytest.approx(-bump, abs=1e-12)
    assert last.rel_error == pytest.approx(-bump / (y[-1] + bump))
    assert last.share_of_gain == pytest.approx(bump / (y[0] - (y[-1] + bump)))
    assert res.mean_abs_error == pytest.approx(bump / 2)
    # A band around the law excludes the bumped point; a wide band includes it; off-grid x gives None.
    law = LOGLINEAR.predict(truth, X)
    narrow = PredictionBand(x=X, lo=law - bump / 2, hi=law + bump / 2, median=law)
    wide = PredictionBand(x=X, lo=law - 2 * bump, hi=law + 2 * bump, median=law)
    assert holdout(LOGLINEAR, X, y_pert, 1, band=narrow).points[0].in_band is False
    assert holdout(LOGLINEAR, X, y_pert, 1, band=wide).points[0].in_band is True
    assert PredictionBand(x=X[:3], lo=law[:3], hi=law[:3], median=law[:3]).contains(X[-1], y[-1]) is None


def test_holdout_needs_enough_points_and_sorts_input():
    y = SATURATING.predict(TRUTH["saturating"], X[:5])
    assert holdout(SATURATING, X[:5], y, k=2) is None  # 3 points left < 4 for a 3-parameter form
    assert holdout(SATURATING, X[:5], y, k=1) is not None
    shuffled = np.array([3, 0, 4, 1, 2])
    res = holdout(SATURATING, X[:5][shuffled], y[shuffled], k=1)
    assert res.points[0].x == X[4] and abs(res.points[0].rel_error) < 1e-6
    ks = {(r.form, r.k) for r in holdout_all(["saturating", "loglinear"], X[:5], y)}
    assert ks == {("saturating", 1), ("loglinear", 1), ("loglinear", 2)}


def test_leave_one_out_on_exact_law():
    y = POWER.predict(TRUTH["power"], X)
    results = leave_one_out(POWER, X, y)
    assert len(results) == X.size
    for point, fit in results:
        assert fit.ok and abs(point.rel_error) < 1e-6


def test_choose_form_by_held_out_error():
    sat = SATURATING.predict({"E": 0.25, "A": 0.05, "alpha": 0.5}, X)
    choice = choose_form(X, sat)
    assert choice.chosen == "saturating" and choice.tied == ("saturating",)
    assert choice.held_out_mae["saturating"] < 0.1 * choice.held_out_mae["loglinear"]
    lin = LOGLINEAR.predict(TRUTH["loglinear"], X) + 0.3
    assert choose_form(X, lin).chosen == "loglinear"
    negative = LOGLINEAR.predict({"a": -0.1, "b": -0.05}, X)  # relative logloss %: power laws excluded
    choice = choose_form(X, negative)
    assert choice.chosen == "loglinear" and set(choice.excluded) == {"saturating", "power"}


# ------------------------------------------------------------------------------- slopes and multipliers

def test_local_slopes_of_loglinear_curve_equal_b():
    b = TRUTH["loglinear"]["b"]
    x = np.repeat(X, 3)
    group = np.repeat(np.arange(X.size), 3)
    y = LOGLINEAR.predict(TRUTH["loglinear"], x)
    exact = local_slopes(x, y, group, n_resamples=50)
    assert np.allclose(exact.slope, b, rtol=1e-9, atol=0)
    noisy = local_slopes(x, y + np.random.default_rng(2).normal(0, 2e-4, x.size), group, n_resamples=300, level=0.95)
    assert (noisy.ci_lo < b).all() and (b < noisy.ci_hi).all()
    assert not noisy.plateau and noisy.non_monotone == ()
    assert np.allclose(noisy.x_mid, np.sqrt(X[:-1] * X[1:]))


def test_plateau_flagged_on_flattening_curve():
    x = np.repeat(X, 3)
    group = np.repeat(np.arange(X.size), 3)
    noise = np.random.default_rng(4).normal(0, 5e-4, x.size)
    flat = SATURATING.predict({"E": 0.3, "A": 0.05, "alpha": 1.5}, x) + noise  # gains vanish after ~10 GFLOP
    res = local_slopes(x, flat, group, n_resamples=300)
    assert res.plateau, res.reason
    assert res.ci_lo[0] < res.ci_hi[0] < 0  # the first step still clearly helps
    steady = LOGLINEAR.predict(TRUTH["loglinear"], x) + noise
    assert not local_slopes(x, steady, group, n_resamples=300).plateau
    worse = LOGLINEAR.predict(TRUTH["loglinear"], X)
    worse[-1] = worse[-2] + 0.001  # the largest model is worse: wrong sign, no interval needed
    res = local_slopes(X, worse)
    assert res.plateau and res.non_monotone == (X.size - 2,) and np.isnan(res.ci_lo).all()


def test_compute_multiplier_of_power_laws_is_analytic():
    # b needs k = 40× the compute of a for the same quality (Wukong vs DCNv2 style), same exponent.
    k, a_coef, alpha = 40.0, 0.5, 0.12
    fit_a = POWER.fit(X, a_coef * X**-alpha)
    fit_b = POWER.fit(X, a_coef * (X / k) ** -alpha)
    for y_target in (0.3, 0.4, 0.55):
        assert compute_multiplier(fit_a, fit_b, y_target) == pytest.approx(k, rel=1e-6)
    # Different exponents: x(y) = (y/A)^(-1/alpha) for each.
    fit_c = POWER.fit(X, 0.6 * X**-0.2)
    y_target = 0.35
    expected = (y_target / 0.6) ** (-1 / 0.2) / (y_target / a_coef) ** (-1 / alpha)
    assert compute_multiplier(fit_a, fit_c, y_target) == pytest.approx(expected, rel=1e-6)
    common = multiplier_at_common_best(fit_a, fit_b, X[-1], X[-1])
    assert common.y_target == pytest.approx(fit_b.predict(X[-1])) and common.multiplier == pytest.approx(k, rel=1e-6)
    assert common.x_b == pytest.approx(X[-1], rel=1e-6)


def test_inverting_below_the_floor_gives_nan():
    fit = SATURATING.fit(X, SATURATING.predict(TRUTH["saturating"], X))
    assert np.isnan(invert_fit(fit, 0.28))  # below E = 0.29: never reached
    assert invert_fit(fit, 0.3) == pytest.approx((0.01 / 0.02) ** (-1 / 0.35), rel=1e-6)
    other = POWER.fit(X, 0.5 * X**-0.12)
    assert np.isnan(compute_multiplier(fit, other, 0.28))
