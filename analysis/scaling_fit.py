"""A sweep's runs -> per-family scaling fits: form choice, bootstrap CIs, held-out checks, slopes.

    fit = fit_sweep(load_local("runs/quickstart"), metric="logloss")
    fit.families["wukong"].bootstrap.params["alpha"]

For each family (on quality vs forward GFLOP/example, or vs total train FLOPs):
  1. points: per size, the tuned-lr choice and the seed mean (analysis/records.py);
  2. every form (saturating power law, plain power law, log-linear) fitted to all points; the form
     is chosen by held-out error at the largest size, then AIC (analysis/extrapolation.py);
  3. bootstrap over runs (seeds within a size; parametric seed noise where a size has one run)
     for parameter CIs and the 80% band;
  4. held-out extrapolation: refit without the largest 1 and 2 sizes, errors there (signed,
     relative, as a share of the improvement across the sweep), and whether each held-out point
     falls inside the band of that refit;
  5. local slopes with CIs and a plateau flag; flags for non-monotone points, lrs on the grid
     edge, failed fits;
  6. the compute multiplier vs the reference family (DLRM by default) at matched quality.
Metrics that improve upwards (AUC, HR@K, NDCG@K, MRR) are fitted as 1 - metric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.bootstrap import BootstrapResult, GroupedRuns, bootstrap_fit
from analysis.chinchilla import ChinchillaBootstrap, ChinchillaFit, bootstrap_chinchilla, fit_chinchilla
from analysis.extrapolation import FormChoice, HoldoutResult, choose_form, holdout, min_points
from analysis.forms import FORMS, FitResult, get_form
from analysis.records import RunSet, ScalePoint, higher_is_better, reference_floor, scale_points
from analysis.slopes import LocalSlopes, local_slopes, multiplier_at_common_best, multiplier_interval

AXES = {"gflops_per_example": "forward GFLOP/example", "train_flops": "total train FLOPs"}


@dataclasses.dataclass(frozen=True)
class FamilyFit:
    family: str
    points: tuple[ScalePoint, ...]
    x: np.ndarray  # [G] the axis value of each point
    y: np.ndarray  # [G] fitted quantity (metric, or 1 - metric for AUC)
    choice: FormChoice
    fits: dict[str, FitResult]  # every form on all points
    bootstrap: BootstrapResult | None  # the chosen form, with the 80% band on `band_x`
    holdouts: tuple[HoldoutResult, ...]  # chosen form, k = 1 and 2 (with in-band checks)
    holdout_bands: dict[int, Any]  # k -> PredictionBand of the refit without the k largest sizes
    holdouts_other_forms: dict[str, tuple[HoldoutResult, ...]]
    slopes: LocalSlopes | None
    flags: tuple[str, ...]

    @property
    def chosen(self) -> FitResult | None:
        return self.fits.get(self.choice.chosen) if self.choice.chosen else None

    def slope(self):
        """(name, estimate, ParamInterval) of the chosen form's exponent (or log-linear slope); None
        without a usable fit and bootstrap."""
        if self.chosen is None or self.bootstrap is None:
            return None
        name = get_form(self.chosen.form).slope_param
        return name, self.chosen.params[name], self.bootstrap.params[name]

    @property
    def improvement(self) -> float:
        """y at the smallest size minus y at the largest (positive = the family improved)."""
        return float(self.y[0] - self.y[-1]) if self.y.size else float("nan")


@dataclasses.dataclass(frozen=True)
class DataScalingFit:
    """L(N, D) = E + A/N^alpha + B/D^beta for a family swept over model and data size.

    N = forward multiply-adds per example (GFLOP/example x 1e9 / 2), D = training examples, so that
    train compute C = 3 x forward FLOPs x D = 6 N D as in the LLM convention; the compute-optimal
    allocation is N_opt ∝ C^a, D_opt ∝ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta).
    """

    family: str
    fit: ChinchillaFit
    bootstrap: ChinchillaBootstrap | None
    n_points: int
    data_sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Comparison:
    family: str
    reference: str
    y_target: float
    multiplier: float  # reference compute / family compute at matched quality
    interval80: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class SweepFit:
    source: str
    metric: str
    fitted_quantity: str
    axis: str
    families: dict[str, FamilyFit]
    data_scaling: dict[str, DataScalingFit]  # families swept over data size too
    skipped: dict[str, str]  # family -> why it has no fit
    floor: float | None  # Bayes-optimal value (ranking metrics: the oracle's) of the metric, in its own units
    reference_family: str
    comparisons: dict[str, Comparison]
    dropped: tuple[tuple[str, str], ...]
    tune: tuple[str, ...]
    n_runs: int
    n_resamples: int


def _per_run(points: Sequence[ScalePoint], axis: str, upward: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, groups = [], [], []
    for i, p in enumerate(points):
        for v in p.values:
            xs.append(getattr(p, axis))
            ys.append(1.0 - v if upward else v)
            groups.append(i)
    return np.array(xs, float), np.array(ys, float), np.array(groups)


def _flags(points: Sequence[ScalePoint], y: np.ndarray, fits: dict[str, FitResult], choice: FormChoice,
           slopes: LocalSlopes | None) -> list[str]:
    flags = []
    sigma = GroupedRuns.from_runs(*_per_run(points, "gflops_per_example", False)).sigma_seed
    for p in points:
        if p.choice and p.choice.on_edge:
            keys = ", ".join(k.rsplit(".", 1)[-1] for k in p.choice.on_edge)
            margin = p.choice.edge_margin
            if margin is not None and math.isfinite(sigma) and margin < sigma:
                flags.append(f"size {p.size}: best {keys} is on the edge of its grid, ahead of the next by "
                             f"{margin:.2g}, less than the seed noise ({sigma:.2g}): probably noise, but a wider grid would tell")
            else:
                flags.append(f"size {p.size}: best {keys} is on the edge of its grid"
                             + (f", ahead of the next by {margin:.2g}" if margin is not None else "")
                             + " (re-sweep with a wider grid before trusting this point)")
    worse = [points[i + 1].size for i in range(len(points) - 1) if y[i + 1] >= y[i]]
    if worse:
        flags.append(f"non-monotone: {', '.join(worse)} no better than the next smaller size")
    for name, fit in fits.items():
        if not fit.ok:
            flags.append(f"{name} fit not usable ({'did not converge' if not fit.converged else 'did not move off its start'})")
    if choice.chosen is None:
        flags.append(f"no form could be chosen: {choice.reason}")
    if slopes is not None and slopes.plateau:
        flags.append(f"plateau: {slopes.reason}")
    return flags


def fit_family(family: str, points: Sequence[ScalePoint], *, axis: str = "gflops_per_example",
               upward: bool = False, n_resamples: int = 1000, seed: int = 0) -> FamilyFit:
    """All fits of one family's points (sorted by x); needs >= 3 sizes for any form."""
    points = tuple(sorted(points, key=lambda p: getattr(p, axis)))
    x = np.array([getattr(p, axis) for p in points], float)
    y = np.array([1.0 - p.mean if upward else p.mean for p in points], float)
    xr, yr, gr = _per_run(points, axis, upward)
    fits = {}
    for name, form in FORMS.items():
        if x.size >= form.n_params + 1 and (not form.positive_y or (y > 0).all()):
            fits[name] = form.fit(x, y)
    choice = choose_form(x, y, forms=tuple(fits))
    band_x = np.exp(np.linspace(np.log(x.min()) - 0.5, np.log(x.max()) + math.log(10.0), 80)) if x.size else None
    boot, holdouts, bands, others = None, [], {}, {}
    if choice.chosen:
        form = get_form(choice.chosen)
        boot = bootstrap_fit(form, xr, yr, gr, x_grid=band_x, n_resamples=n_resamples, seed=seed,
                             point=fits[choice.chosen])
        for k in (1, 2):
            keep = x.size - k
            if keep < min_points(form):
                continue
            fitted = np.isin(gr, np.arange(keep))
            # The refit's band only answers "is the held-out point inside?": fewer resamples suffice.
            sub = bootstrap_fit(form, xr[fitted], yr[fitted], gr[fitted], x_grid=band_x,
                                n_resamples=max(200, n_resamples // 4), seed=seed + k)
            bands[k] = sub.band
            result = holdout(form, x, y, k, band=sub.band)
            if result is not None:
                holdouts.append(result)
    for name in fits:
        if name != choice.chosen:
            others[name] = tuple(h for k in (1, 2) if (h := holdout(get_form(name), x, y, k)) is not None)
    slopes = local_slopes(xr, yr, gr, n_resamples=n_resamples, seed=seed) if x.size >= 2 else None
    return FamilyFit(family, points, x, y, choice, fits, boot, tuple(holdouts), bands, others, slopes,
                     tuple(_flags(points, y, fits, choice, slopes)))


def fit_data_scaling(family: str, points: Sequence[ScalePoint], *, n_resamples: int = 1000, seed: int = 0,
                     upward: bool = False) -> DataScalingFit:
    """The Chinchilla form on every (size, data size) point of one family, with a bootstrap over points."""
    n = np.array([p.gflops_per_example * 1e9 / 2.0 for p in points])
    d = np.array([float(p.examples) for p in points])
    y = np.array([1.0 - p.mean if upward else p.mean for p in points])
    point = fit_chinchilla(n, d, y)
    boot = bootstrap_chinchilla(n, d, y, point, n_resamples=n_resamples, seed=seed) if point.ok else None
    return DataScalingFit(family, point, boot, len(points), tuple(sorted({p.examples for p in points})))


def fit_sweep(runs: RunSet, metric: str = "logloss", *, axis: str = "gflops_per_example", reference: str = "dlrm",
              n_resamples: int = 1000, seed: int = 0) -> SweepFit:
    """Fit every family of a run set that has >= 3 sizes; compare each with `reference` (if fitted)."""
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}")
    upward = higher_is_better(metric)
    points = scale_points(runs, metric)
    by_family: dict[str, list[ScalePoint]] = {}
    for p in points:
        by_family.setdefault(p.family, []).append(p)
    families, skipped, data_scaling = {}, {}, {}
    for family, pts in sorted(by_family.items()):
        sizes = sorted({p.examples for p in pts})
        if len(sizes) > 1:  # swept over data size too: the 2-D law on all points, 1-D at the most data
            data_scaling[family] = fit_data_scaling(family, pts, n_resamples=n_resamples, seed=seed, upward=upward)
            pts = [p for p in pts if p.examples == sizes[-1]]
        if len(pts) < 3:
            skipped[family] = f"{len(pts)} size(s); a fit needs at least 3"
            continue
        if any(p.gflops_per_example <= 0 for p in pts):  # fitted baselines: no training forward pass
            skipped[family] = "no FLOP scale (a fitted baseline)"
            continue
        families[family] = fit_family(family, pts, axis=axis, upward=upward, n_resamples=n_resamples, seed=seed)
    comparisons = {}
    ref = families.get(reference)
    if ref is not None and ref.chosen is not None and ref.chosen.ok:
        for name, fam in families.items():
            if name == reference or fam.chosen is None or not fam.chosen.ok:
                continue
            m = multiplier_at_common_best(fam.chosen, ref.chosen, float(fam.x.max()), float(ref.x.max()))
            lo, hi = (float("nan"), float("nan"))
            if fam.bootstrap is not None and ref.bootstrap is not None:
                lo, hi, _ = multiplier_interval(fam.bootstrap, ref.bootstrap, m.y_target)
            comparisons[name] = Comparison(name, reference, m.y_target, m.multiplier, (lo, hi))
    floor = reference_floor(runs, metric)
    return SweepFit(
        source=runs.source, metric=metric, fitted_quantity=f"1 - {metric}" if upward else metric, axis=axis,
        families=families, data_scaling=data_scaling, skipped=skipped, floor=floor, reference_family=reference,
        comparisons=comparisons, dropped=runs.dropped, tune=runs.tune, n_runs=len(runs.ok), n_resamples=n_resamples,
    )


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "samples"}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def sweep_fit_json(fit: SweepFit, command: str) -> dict[str, Any]:
    """fits.json: everything above, plus the command that reproduces it."""
    out = _jsonable(fit)
    out["command"] = command
    for name, fam in fit.families.items():
        fam_json = out["families"][name]
        fam_json["chosen_form"] = fam.choice.chosen
        fam_json["improvement"] = _jsonable(fam.improvement)
        if fam.chosen is not None:
            fam_json["equation"] = get_form(fam.choice.chosen).equation
    return out
