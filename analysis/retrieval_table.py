"""The results table of the retrieval track (`scaling compare` on a next-item sweep): one row per
method (family, size and any setting that tells two rows of a family apart), after the sweep's
tuned keys were picked on the validation metric, beside the data's popularity and oracle rows.

Columns: test HR@10, NDCG@10, MRR, coverage@10, novelty (seed means of the chosen runs), the fit
or training time, GFLOP/example (trained models' forward; '-' for fitted baselines, which have no
training forward pass) and parameters (dense + embedding; for fitted ones the numbers they keep).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.table import Table

from analysis.records import Run, RunSet, ScalePoint, higher_is_better, scale_points

COLUMNS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "novelty")


def _model_settings(run: Run) -> dict[str, str]:
    model = dict(run.config.get("model") or {})
    return {k: json.dumps(v) for k, v in model.items() if k not in ("name", "size")}


def _labels(points: Sequence[ScalePoint], runs: dict[str, Run]) -> list[str]:
    """family:size, plus the model settings that differ between rows of the same family and size."""
    labels = []
    for p in points:
        mine = _model_settings(runs[p.run_ids[0]])
        twins = [_model_settings(runs[q.run_ids[0]]) for q in points if (q.family, q.size) == (p.family, p.size)]
        differ = sorted(k for k in mine if any(t.get(k) != mine[k] for t in twins))
        extra = " ".join(f"{k}={mine[k]}" for k in differ)
        size = "" if p.size == "custom" else f":{p.size}"
        labels.append(f"{p.family}{size}" + (f" {extra}" if extra else ""))
    return labels


def retrieval_rows(runs: RunSet, metric: str = "ndcg@10") -> list[dict[str, object]]:
    """One dict per method (label, the COLUMNS' test means, time_s, gflops, params, seeds), best first."""
    by_id = {r.run_id: r for r in runs.ok}
    points = [p for p in scale_points(runs, metric) if p.run_ids]
    rows = []
    for p, label in zip(points, _labels(points, by_id)):
        chosen = [by_id[i] for i in p.run_ids]
        row: dict[str, object] = {"label": label, "family": p.family, "size": p.size, "seeds": len(chosen)}
        for key in COLUMNS:
            vals = [v for r in chosen if (v := r.metric(key, "test")) is not None]
            row[key] = sum(vals) / len(vals) if vals else float("nan")
        row["time_s"] = sum(r.fit.get("fit_time_s", r.wall_time_s) for r in chosen) / len(chosen)
        row["gflops"] = p.gflops_per_example
        row["params"] = p.params_dense + p.params_embedding
        row["fitted"] = bool(chosen[0].fit)
        rows.append(row)
    sign = -1.0 if higher_is_better(metric) else 1.0
    rows.sort(key=lambda r: sign * float(r.get(metric, float("nan")) if metric in r else 0.0))
    return rows


def reference_rows(runs: RunSet) -> list[dict[str, object]]:
    """The data's own rows (popularity; the oracle when the process is known), from any run's record."""
    ref = next((r.data_reference for r in runs.ok if r.data_reference), {})
    rows = []
    for name in ("oracle", "popularity"):
        if f"test_{name}_hr@10" in ref:
            rows.append({"label": f"({name}, from the data)", "hr@10": ref[f"test_{name}_hr@10"],
                         "ndcg@10": ref[f"test_{name}_ndcg@10"], "mrr": ref.get(f"test_{name}_mrr", float("nan"))})
    return rows


def retrieval_table(runs: RunSet, metric: str = "ndcg@10") -> Table:
    """A rich table of `retrieval_rows` and `reference_rows`."""
    table = Table(title=f"{runs.source}: {len(runs.ok)} finished runs, {len(runs.dropped)} dropped; "
                        f"test metrics, chosen on valid {metric}")
    for col in ("method", "HR@10", "NDCG@10", "MRR", "cov@10", "novelty", "fit/train s", "GFLOP/ex", "params", "seeds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731 - nan -> '-'
    for row in retrieval_rows(runs, metric):
        table.add_row(str(row["label"]), fmt(row["hr@10"], ".4f"), fmt(row["ndcg@10"], ".4f"), fmt(row["mrr"], ".4f"),
                      fmt(row["coverage@10"], ".3f"), fmt(row["novelty"], ".2f"), fmt(row["time_s"], ",.0f"),
                      "-" if row["fitted"] else fmt(row["gflops"], ".3g"), f"{row['params']:,}", str(row["seeds"]))
    for row in reference_rows(runs):
        table.add_row(str(row["label"]), fmt(row["hr@10"], ".4f"), fmt(row["ndcg@10"], ".4f"), fmt(row["mrr"], ".4f"),
                      "", "", "", "", "", "", style="dim")
    if runs.dropped:
        table.caption = "dropped: " + "; ".join(f"{rid} ({why[:60]})" for rid, why in runs.dropped[:5])
    return table
