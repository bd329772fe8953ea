"""Local slopes between adjacent scales, plateau detection, and compute multipliers between two fitted curves.

Local slope s_i = (ȳ_{i+1} − ȳ_i) / (ln x_{i+1} − ln x_i): the gain per e-fold of compute, with no functional form.
Intervals come from the same within-group resampling of runs as `bootstrap.bootstrap_fit`. A curve is flagged as a
plateau when its last slope's interval includes 0, or the last slope has the wrong sign (>= 0 for a metric to
minimise): more compute stopped helping.

Compute multiplier of family b relative to family a at quality y: x_b(y) / x_a(y), each x(y) found by inverting the
fitted curve numerically (Brent's method on ln x over a bracket). A curve that never reaches y inside the bracket
(e.g. y below a saturating floor E) gives NaN, and so does the multiplier. > 1 means b needs more compute than a.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from analysis.bootstrap import BootstrapResult, GroupedRuns
from analysis.forms import FitResult, get_form

LN_X_BRACKET = (-69.0, 69.0)  # x in ~[1e-30, 1e30], whatever its unit


@dataclass(frozen=True)
class LocalSlopes:
    """Slopes dy/d ln x between adjacent groups. x_lo, x_hi, x_mid (geometric mean), slope, ci_lo, ci_hi: [G−1]
    (ci NaN where neither neighbouring group can vary: single runs and no sigma_seed); level of the interval;
    plateau and its reason; non_monotone: indices of slopes with the wrong sign; n_resamples."""

    x_lo: np.ndarray
    x_hi: np.ndarray
    x_mid: np.ndarray
    slope: np.ndarray
    ci_lo: np.ndarray
    ci_hi: np.ndarray
    level: float
    plateau: bool
    reason: str
    non_monotone: tuple[int, ...]
    n_resamples: int


def local_slopes(
    x: np.ndarray,
    y: np.ndarray,
    group: np.ndarray | None = None,
    *,
    minimize: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.8,
    sigma_seed: float | None = None,
) -> LocalSlopes:
    """Local slopes of per-run y [n] vs x [n] (runs grouped by group [n]) with bootstrap percentile intervals.

    minimize: the metric improves downwards (logloss, NE); False for AUC/HR. level: interval coverage.
    """
    grouped = GroupedRuns.from_runs(x, y, group, sigma_seed)
    if grouped.x.size < 2:
        raise ValueError("need at least two groups")
    lx = np.log(grouped.x)
    dlx = np.diff(lx)
    slope = np.diff(grouped.mean) / dlx
    means = grouped.resample_means(n_resamples, np.random.default_rng(seed))
    draws = np.diff(means, axis=1) / dlx
    tail = 50.0 * (1.0 - level)
    ci_lo, ci_hi = np.percentile(draws, [tail, 100.0 - tail], axis=0)
    varies = grouped.varies()
    fixed = ~(varies[:-1] | varies[1:])
    ci_lo, ci_hi = np.where(fixed, np.nan, ci_lo), np.where(fixed, np.nan, ci_hi)

    wrong_sign = slope >= 0 if minimize else slope <= 0
    non_monotone = tuple(int(i) for i in np.flatnonzero(wrong_sign))
    if wrong_sign[-1]:
        plateau, reason = True, "last slope has the wrong sign (no gain from the largest step)"
    elif np.isfinite(ci_lo[-1]) and ci_lo[-1] <= 0.0 <= ci_hi[-1]:
        plateau, reason = True, f"last slope's {level:.0%} interval includes 0"
    elif not np.isfinite(ci_lo[-1]):
        plateau, reason = False, "no interval for the last slope (single runs, no sigma_seed); sign only"
    else:
        plateau, reason = False, f"last slope's {level:.0%} interval excludes 0"
    return LocalSlopes(x_lo=grouped.x[:-1], x_hi=grouped.x[1:], x_mid=np.exp(lx[:-1] + dlx / 2), slope=slope,
                       ci_lo=ci_lo, ci_hi=ci_hi, level=level, plateau=plateau, reason=reason,
                       non_monotone=non_monotone, n_resamples=n_resamples)


def invert_curve(form_name: str, params: dict[str, float], y_target: float,
                 ln_x_bracket: tuple[float, float] = LN_X_BRACKET) -> float:
    """x at which the curve reaches y_target, or NaN if it does not inside the bracket (curves are monotone)."""
    form = get_form(form_name)

    def gap(t: float) -> float:
        return float(form.predict(params, np.exp(t))) - y_target

    lo, hi = gap(ln_x_bracket[0]), gap(ln_x_bracket[1])
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo * hi > 0:
        return float("nan")
    if lo == 0.0 or hi == 0.0:
        return float(np.exp(ln_x_bracket[0] if lo == 0.0 else ln_x_bracket[1]))
    return float(np.exp(brentq(gap, *ln_x_bracket, xtol=1e-13, rtol=4 * np.finfo(float).eps, maxiter=500)))


def invert_fit(fit: FitResult, y_target: float, ln_x_bracket: tuple[float, float] = LN_X_BRACKET) -> float:
    """x at which a fitted curve reaches y_target (NaN when never)."""
    return invert_curve(fit.form, fit.params, y_target, ln_x_bracket)


def compute_multiplier(fit_a: FitResult, fit_b: FitResult, y_target: float) -> float:
    """x_b(y) / x_a(y) at matched quality y_target; NaN when either curve never reaches it."""
    return invert_fit(fit_b, y_target) / invert_fit(fit_a, y_target)


@dataclass(frozen=True)
class Multiplier:
    """Compute multiplier x_b/x_a at quality y_target, with the x each family needs there."""

    y_target: float
    x_a: float
    x_b: float
    multiplier: float


def multiplier_at_common_best(fit_a: FitResult, fit_b: FitResult, x_max_a: float, x_max_b: float,
                              *, minimize: bool = True) -> Multiplier:
    """Multiplier at the best quality both families reach: each curve's value at its largest measured x
    (x_max_a, x_max_b), and the worse of the two (the larger for a metric to minimise) as the target."""
    best_a, best_b = float(fit_a.predict(x_max_a)), float(fit_b.predict(x_max_b))
    y_target = max(best_a, best_b) if minimize else min(best_a, best_b)
    x_a, x_b = invert_fit(fit_a, y_target), invert_fit(fit_b, y_target)
    return Multiplier(y_target=y_target, x_a=x_a, x_b=x_b, multiplier=x_b / x_a)


def multiplier_interval(boot_a: BootstrapResult, boot_b: BootstrapResult, y_target: float,
                        level: float = 0.8) -> tuple[float, float, int]:
    """Percentile interval of x_b/x_a at y_target over paired bootstrap samples (the two families' resamples are
    independent, so pairing by index is a valid joint draw). Returns (low, high, number of pairs where a curve
    never reaches y_target, which are left out)."""
    n = min(len(boot_a.samples), len(boot_b.samples))
    names_a, names_b = get_form(boot_a.form).param_names, get_form(boot_b.form).param_names
    ratios = np.array([
        invert_curve(boot_b.form, dict(zip(names_b, boot_b.samples[i])), y_target)
        / invert_curve(boot_a.form, dict(zip(names_a, boot_a.samples[i])), y_target)
        for i in range(n)
    ])
    finite = ratios[np.isfinite(ratios)]
    if finite.size == 0:
        return float("nan"), float("nan"), n
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi), int(n - finite.size)
