"""Terminal tables of a sweep's results: the per-size points (`scaling compare`) and the fits (`scaling fit`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table

from analysis.records import RunSet, ScalePoint
from analysis.report import sig as _g
from analysis.scaling_fit import SweepFit


def points_table(runs: RunSet, points: Sequence[ScalePoint], metric: str) -> Table:
    """One row per (family, size): compute, params, seeds, the chosen tuned values, metric mean ± s.e."""
    table = Table(title=f"{runs.source}: {len(runs.ok)} finished runs, {len(runs.dropped)} dropped; test {metric}")
    for col, justify in [("family", "left"), ("size", "left"), ("GFLOP/ex", "right"), ("train FLOPs", "right"),
                         ("params dense", "right"), ("params emb", "right"), ("seeds", "right"),
                         ("chosen", "left"), (metric, "right"), ("s.e.", "right")]:
        table.add_column(col, justify=justify)
    for p in points:
        chosen = ""
        if p.choice is not None:
            chosen = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                               for k, v in p.choice.values) + (" (edge)" if p.choice.on_edge else "")
        table.add_row(p.family, p.size, f"{p.gflops_per_example:.4g}", f"{p.train_flops:.3g}", f"{p.params_dense:,}",
                      f"{p.params_embedding:,}", str(p.n), chosen, f"{p.mean:.5f}", _g(p.sem, 3))
    if runs.dropped:
        table.caption = "dropped: " + "; ".join(f"{rid} ({why[:60]})" for rid, why in runs.dropped[:5])
    return table


def print_fit_summary(fit: SweepFit) -> None:
    from scaling.train.report import wide_console

    table = Table(title=f"{fit.source}: test {fit.metric} vs {fit.axis}")
    for col in ("family", "form", "parameters", "exponent / slope 80% CI", "held-out err (k=1)", "share of gain",
                f"x vs {fit.reference_family}", "flags"):
        table.add_column(col)
    for name, fam in sorted(fit.families.items()):
        fit_ = fam.chosen
        params = ", ".join(f"{k}={_g(v)}" for k, v in fit_.params.items()) if fit_ else "-"
        slope = fam.slope()
        ci = slope[2] if slope else None
        h1 = next((h for h in fam.holdouts if h.k == 1), None)
        comp = fit.comparisons.get(name)
        table.add_row(name, fam.choice.chosen or "none", params, f"[{_g(ci.p10)}, {_g(ci.p90)}]" if ci else "-",
                      f"{h1.points[0].error:+.3g}" if h1 and h1.points else "-",
                      f"{h1.mean_share_of_gain:.0%}" if h1 and math.isfinite(h1.mean_share_of_gain) else "-",
                      f"{comp.multiplier:.3g}x" if comp else "-", str(len(fam.flags)))
    wide_console().print(table)
