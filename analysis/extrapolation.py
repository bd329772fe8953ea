"""Held-out checks of fitted forms: extrapolation to the largest scales, leave-one-scale-out, model choice.

Input: one point per scale, x [G] ascending (sorted here if not), mean y [G], optional sem [G] (then the fits are
weighted by 1/sem²). For each held-out point:
- error = predicted − observed (signed), rel_error = error / observed;
- share_of_gain = |error| / |y_smallest − observed|, the error as a fraction of the improvement the sweep achieved
  from its smallest scale to that point (recsys gains are ~1 %, so relative errors always look tiny; this
  does not);
- in_band: whether the observed value lies in a given 80 % prediction band (None without one / off its grid).
A form is only fitted when enough points remain: n_params + 1 (3 for 2-parameter forms, 4 for 3-parameter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.bootstrap import PredictionBand
from analysis.forms import FitResult, Form, get_form


@dataclass(frozen=True)
class HeldOutPoint:
    """One held-out scale: x, observed, predicted, error (pred − obs), rel_error (error/obs), share_of_gain
    (|error| / |y at smallest x − obs|, NaN when that gain is 0), in_band (None when no band applies)."""

    x: float
    observed: float
    predicted: float
    error: float
    rel_error: float
    share_of_gain: float
    in_band: bool | None


@dataclass(frozen=True)
class HoldoutResult:
    """Fit of `form` on all but the k largest scales and its errors there. fit.ok must be True for the numbers
    to mean anything; mean_abs_error and mean_share_of_gain average over the held-out points."""

    form: str
    k: int
    fit: FitResult
    points: tuple[HeldOutPoint, ...]
    mean_abs_error: float
    mean_share_of_gain: float


def _prepare(x, y, sem) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x, kind="stable")
    sem = None if sem is None else np.asarray(sem, dtype=float)[order]
    if sem is not None and not (np.isfinite(sem).all() and (sem > 0).all()):
        raise ValueError("sem must be finite and > 0 at every point (or None for an unweighted fit)")
    return x[order], y[order], sem


def _held_out_point(fit: FitResult, x: float, observed: float, y_smallest: float,
                    band: PredictionBand | None) -> HeldOutPoint:
    predicted = float(fit.predict(x))
    error = predicted - float(observed)
    gain = abs(y_smallest - observed)
    return HeldOutPoint(x=float(x), observed=float(observed), predicted=predicted, error=error,
                        rel_error=error / observed if observed != 0 else float("nan"),
                        share_of_gain=abs(error) / gain if gain > 0 else float("nan"),
                        in_band=None if band is None else band.contains(float(x), float(observed)))


def min_points(form: Form) -> int:
    """Fewest points a form may be fitted on in a held-out check: one more than its parameter count."""
    return form.n_params + 1


def holdout(form: Form | str, x: np.ndarray, y: np.ndarray, k: int = 1, sem: np.ndarray | None = None,
            band: PredictionBand | None = None) -> HoldoutResult | None:
    """Fit on all but the k largest x, predict those k; None when fewer than min_points(form) would remain.

    band: an 80 % band from a bootstrap of the same form on the same training points (`bootstrap_fit` with
    x_grid covering the held-out x).
    """
    form = get_form(form) if isinstance(form, str) else form
    x, y, sem = _prepare(x, y, sem)
    if k < 1 or x.size - k < min_points(form):
        return None
    fit = form.fit(x[:-k], y[:-k], None if sem is None else 1.0 / sem[:-k] ** 2)
    points = tuple(_held_out_point(fit, x[i], y[i], y[0], band) for i in range(x.size - k, x.size))
    return HoldoutResult(form=form.name, k=k, fit=fit, points=points,
                         mean_abs_error=float(np.mean([abs(p.error) for p in points])),
                         mean_share_of_gain=float(np.mean([p.share_of_gain for p in points])))


def holdout_all(forms: Sequence[Form | str], x: np.ndarray, y: np.ndarray, ks: Sequence[int] = (1, 2),
                sem: np.ndarray | None = None) -> list[HoldoutResult]:
    """holdout() for every form and k where enough points remain (forms whose y is invalid, e.g. y <= 0 for a
    power law, are skipped)."""
    out = []
    for form in forms:
        for k in ks:
            try:
                res = holdout(form, x, y, k, sem)
            except ValueError:
                continue
            if res is not None:
                out.append(res)
    return out


def leave_one_out(form: Form | str, x: np.ndarray, y: np.ndarray,
                  sem: np.ndarray | None = None) -> tuple[tuple[HeldOutPoint, FitResult], ...]:
    """Leave each scale out in turn, fit the rest, predict it (interpolation inside, extrapolation at the ends).

    Returns (point, fit) pairs; empty when fewer than min_points(form) would remain. The "gain" reference of
    share_of_gain is the smallest scale, or the second smallest when the smallest itself is left out.
    """
    form = get_form(form) if isinstance(form, str) else form
    x, y, sem = _prepare(x, y, sem)
    if x.size - 1 < min_points(form):
        return ()
    out = []
    for i in range(x.size):
        keep = np.arange(x.size) != i
        fit = form.fit(x[keep], y[keep], None if sem is None else 1.0 / sem[keep] ** 2)
        y_ref = y[0] if i > 0 else y[1]
        out.append((_held_out_point(fit, x[i], y[i], y_ref, None), fit))
    return tuple(out)


@dataclass(frozen=True)
class FormChoice:
    """Result of choose_form. chosen: form name (None if no form qualified); held_out_mae, aic: per eligible
    form (k = 1 held-out mean absolute error; AIC of the fit to all points); tied: forms within the tolerance
    of the best held-out error; excluded: form -> why it was not eligible; reason: how the choice was made."""

    chosen: str | None
    held_out_mae: dict[str, float]
    aic: dict[str, float]
    tied: tuple[str, ...]
    excluded: dict[str, str]
    reason: str


def choose_form(x: np.ndarray, y: np.ndarray, forms: Sequence[str] = ("loglinear", "saturating", "power"),
                sem: np.ndarray | None = None, rel_tol: float = 0.1) -> FormChoice:
    """Pick the form with the smallest held-out error (k = 1, absolute error at the largest scale).

    Eligible: both the held-out fit and the fit to all points are ok. Forms whose held-out error is within
    tol = max(rel_tol·best, sem at the largest scale) of the best are tied (differences below seed noise or
    below 10 % are not evidence); ties go to the lowest AIC of the full fit, then to fewer parameters.
    """
    x_s, y_s, sem_s = _prepare(x, y, sem)
    mae, aic, excluded = {}, {}, {}
    for name in forms:
        form = get_form(name)
        try:
            held = holdout(form, x_s, y_s, 1, sem_s)
            full = form.fit(x_s, y_s, None if sem_s is None else 1.0 / sem_s**2)
        except ValueError as err:
            excluded[name] = str(err)
            continue
        if held is None:
            excluded[name] = f"needs {min_points(form) + 1} scales, has {x_s.size}"
        elif not held.fit.ok or not full.ok:
            excluded[name] = f"fit not ok: {held.fit.message if not held.fit.ok else full.message}"
        else:
            mae[name], aic[name] = held.mean_abs_error, full.aic
    if not mae:
        return FormChoice(None, mae, aic, (), excluded, "no eligible form")
    best = min(mae.values())
    tol = max(rel_tol * best, float(sem_s[-1]) if sem_s is not None else 0.0)
    tied = tuple(n for n in mae if mae[n] <= best + tol)
    chosen = min(tied, key=lambda n: (aic[n], get_form(n).n_params))
    reason = (f"smallest held-out error ({mae[chosen]:.3g})" if len(tied) == 1 else
              f"{len(tied)} forms within {tol:.3g} of the best held-out error; lowest AIC ({aic[chosen]:.3g})")
    return FormChoice(chosen, mae, aic, tied, excluded, reason)
