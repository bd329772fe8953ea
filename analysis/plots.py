"""Scaling plots: quality vs compute per family, with fits, bands, held-out points and local slopes.

Top panel: seed means with standard-error bars (one colour and marker per family) on a log x-axis;
the fitted curve solid over the sizes it was fitted on and dashed where it extrapolates; by
default the curve is the refit *without the largest size*, so the open marker at that size shows
how well the law predicted it (`holdout=0` draws the fit to all sizes instead); the shaded band is
that fit's 80% bootstrap band. Families with fewer than 3 sizes (classical baselines without a
FLOP scale) are labelled horizontal lines, and the data's Bayes-optimal floor is a dotted line.
Bottom panel: local slopes dy/d ln x between adjacent sizes with 80% intervals; a slope near 0 at
the right end is a plateau.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from analysis.forms import get_form
from analysis.records import ScalePoint
from analysis.report import sig
from analysis.scaling_fit import AXES, FamilyFit, SweepFit

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def _transform(relative_to: float | None, upward: bool):
    """Metric -> plotted y: the metric itself, or % relative to a reference value (Wukong's y-axis)."""
    def to_metric(y):
        return 1.0 - np.asarray(y) if upward else np.asarray(y)

    if relative_to is None:
        return to_metric
    return lambda y: 100.0 * (to_metric(y) / relative_to - 1.0)


def _legend_text(fam: FamilyFit, k: int) -> str:
    name = fam.choice.chosen or "no fit"
    text = f"{fam.family}: {name}"
    slope = fam.slope()
    if slope is not None:
        key, value, ci = slope
        text += f", {'α' if key == 'alpha' else key} = {sig(value, 3)} [{sig(ci.p10, 3)}, {sig(ci.p90, 3)}]"
    held = next((h for h in fam.holdouts if h.k == max(k, 1)), None)
    if held is not None and held.points:
        text += f"; held-out err {held.mean_share_of_gain:.0%} of gain"
    return text


def _draw_family(ax, fam: FamilyFit, colour: str, marker: str, to_y, k: int) -> None:
    x = fam.x
    means = to_y(fam.y)
    sems = np.array([p.sem if math.isfinite(p.sem) else 0.0 for p in fam.points])
    sems = sems * abs(to_y(np.array(1.0)).item() - to_y(np.array(0.0)).item())  # the transform is linear
    held_out = np.zeros(x.size, bool)
    if k > 0 and x.size > k:
        held_out[-k:] = True
    ax.errorbar(x[~held_out], means[~held_out], yerr=sems[~held_out], fmt=marker, color=colour, ms=5, capsize=2,
                lw=1, zorder=3, label=_legend_text(fam, k))
    if held_out.any():
        ax.errorbar(x[held_out], means[held_out], yerr=sems[held_out], fmt=marker, color=colour, ms=6,
                    mfc="white", mew=1.3, capsize=2, lw=1, zorder=4)
    fit = next((h.fit for h in fam.holdouts if h.k == k), None) if k > 0 else fam.chosen
    band = fam.holdout_bands.get(k) if k > 0 else (fam.bootstrap.band if fam.bootstrap else None)
    if fit is None or not fit.ok:
        return
    form = get_form(fit.form)
    fitted_max = x[~held_out].max()
    grid = np.exp(np.linspace(math.log(x.min()), math.log(x.max() * 3.0), 200))
    inside = grid <= fitted_max * (1 + 1e-9)
    pred = to_y(form.predict(fit.params, grid))
    ax.plot(grid[inside], pred[inside], "-", color=colour, lw=1.5, zorder=2)
    ax.plot(grid[~inside], pred[~inside], "--", color=colour, lw=1.3, zorder=2)
    if band is not None:
        keep = (band.x >= x.min()) & (band.x <= x.max() * 3.0)
        lo, hi = to_y(band.lo[keep]), to_y(band.hi[keep])
        ax.fill_between(band.x[keep], np.minimum(lo, hi), np.maximum(lo, hi), color=colour, alpha=0.15, lw=0, zorder=1)


def _reference_lines(ax, fit: SweepFit, points: Sequence[ScalePoint], to_y) -> None:
    xs = [p for fam in fit.families.values() for p in fam.x]
    if fit.floor is not None:
        upward = fit.fitted_quantity.startswith("1 - ")
        floor = to_y(np.array(1.0 - fit.floor if upward else fit.floor)).item()
        name = "oracle" if upward else "Bayes-optimal"
        lo, hi = ax.get_ylim()
        near = floor <= hi + 0.5 * (hi - lo) if upward else floor >= lo - 0.5 * (hi - lo)
        if near:  # near the data: draw it
            ax.axhline(floor, color="0.35", ls=":", lw=1.2)
            ax.annotate(name, (min(xs) if xs else 1, floor), fontsize=7, color="0.35", va="bottom",
                        xytext=(2, 2), textcoords="offset points")
        else:  # far away: a note keeps the data readable
            where = "above" if upward else "below"
            ax.annotate(f"{name} {floor:.4g} ({where} the axis)", (0.99, 0.99 if upward else 0.01),
                        xycoords="axes fraction", fontsize=7, color="0.35", ha="right", va="top" if upward else "bottom")
    for p in points:
        y = to_y(np.array(1.0 - p.mean if fit.fitted_quantity.startswith("1 - ") else p.mean)).item()
        ax.axhline(y, color="0.55", ls="-.", lw=1.0)
        label = p.family if p.size == "custom" else f"{p.family} ({p.size})"
        ax.annotate(label, (max(xs) if xs else 1, y), fontsize=7, color="0.4", ha="right",
                    va="bottom", xytext=(-2, 2), textcoords="offset points")


def plot_sweep(fit: SweepFit, out_dir: str, *, holdout: int = 1, relative_to: tuple[str, float] | None = None,
               references: Sequence[ScalePoint] = (), title: str | None = None, basename: str = "scaling") -> list[str]:
    """Write `<out_dir>/<basename>.png` and `.svg`; returns their paths.

    relative_to: (label, value) to plot % relative to value (e.g. a DLRM run's logloss).
    references: points drawn as horizontal reference lines (families without a FLOP scale).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    upward = fit.fitted_quantity.startswith("1 - ")
    to_y = _transform(relative_to[1] if relative_to else None, upward)
    plt.rcParams.update({"font.size": 8.5, "axes.titlesize": 9, "legend.fontsize": 7})
    fig, (ax, ax_slope) = plt.subplots(2, 1, figsize=(5.6, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for i, (name, fam) in enumerate(sorted(fit.families.items())):
        colour, marker = _COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]
        _draw_family(ax, fam, colour, marker, to_y, holdout)
        if fam.slopes is not None:
            s = fam.slopes
            lo = np.where(np.isfinite(s.ci_lo), s.slope - s.ci_lo, 0.0)
            hi = np.where(np.isfinite(s.ci_hi), s.ci_hi - s.slope, 0.0)
            ax_slope.errorbar(s.x_mid * (1.0 + 0.04 * i), s.slope, yerr=[lo, hi], fmt=marker, color=colour, ms=4,
                              capsize=2, lw=1)
    _reference_lines(ax, fit, references, to_y)
    ax.set_xscale("log")
    metric = fit.metric if not relative_to else f"{fit.metric}, % relative to {relative_to[0]}"
    ax.set_ylabel(f"test {metric}")
    ax.grid(True, which="both", alpha=0.25, lw=0.5)
    # curves rise for ranking metrics: keep the legend clear of them and of the top-right notes
    ax.legend(loc="lower right" if fit.fitted_quantity.startswith("1 - ") else "upper right", frameon=False)
    heading = title or f"{os.path.basename(fit.source.rstrip('/'))}: {fit.metric} vs {AXES[fit.axis]}"
    note = ("solid: fit without the largest size; dashed: extrapolation; open: held out; band: 80%"
            if holdout else "solid: fit to all sizes; dashed: extrapolation; band: 80%")
    ax.set_title(f"{heading}\n{note}", fontsize=8)
    ax_slope.axhline(0.0, color="0.4", lw=0.8)
    ax_slope.set_xscale("log")
    ax_slope.set_ylabel(f"local slope\nd{fit.fitted_quantity}/d ln x", fontsize=7.5)
    ax_slope.set_xlabel(AXES[fit.axis])
    ax_slope.grid(True, which="both", alpha=0.25, lw=0.5)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{basename}.{ext}")
        fig.savefig(path, dpi=200 if ext == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths
