"""Terminal tables of run records."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from scaling.train.run_record import RunRecord


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _is_retrieval(records: Sequence[RunRecord]) -> bool:
    return any("hr@10" in (r.best_eval or {}) for r in records)


def records_table(records: Sequence[RunRecord], title: str = "results") -> Table:
    """One row per run: size, params, MFLOP/ex, speed and quality. CTR: final eval logloss / NE /
    AUC / excess over Bayes. Next item: the test metrics of the evaluation picked on validation."""
    retrieval = _is_retrieval(records)
    quality = (["best step", "HR@10", "NDCG@10", "MRR", "cov@10"] if retrieval
               else ["logloss", "NE", "AUC", "excess"])
    table = Table(title=title)
    for col in ["run", "status", "params dense", "params emb", "MFLOP/ex", "examples", *quality, "ex/s", "wall s"]:
        table.add_column(col, justify="left" if col in ("run", "status") else "right")
    for r in records:
        if retrieval:
            ev = r.best_eval or {}
            cells = [str(r.best_eval_step), _fmt(ev.get("hr@10"), ".4f"), _fmt(ev.get("ndcg@10"), ".4f"),
                     _fmt(ev.get("mrr"), ".4f"), _fmt(ev.get("coverage@10"), ".3f")]
        else:
            ev = r.final_eval or {}
            cells = [_fmt(ev.get("logloss"), ".4f"), _fmt(ev.get("ne"), ".4f"), _fmt(ev.get("auc"), ".4f"),
                     _fmt(ev.get("excess_logloss"), ".4f")]
        table.add_row(
            f"{r.family}:{r.size}", r.status if r.status == "ok" else f"{r.status} ({r.reason[:40]})",
            f"{r.params_dense:,}", f"{r.params_embedding:,}", f"{r.flops_per_example_analytic / 1e6:.3f}",
            f"{r.examples_seen:,}", *cells, f"{r.examples_per_s:,.0f}", f"{r.wall_time_s:.0f}",
        )
    return table


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a file or CI log."""
    return Console(width=None if Console().is_terminal else 160)


def print_record(record: RunRecord) -> None:
    console = wide_console()
    console.print(records_table([record], title=f"run {record.run_id}"))
    ref = record.data_reference
    for name in ("popularity", "oracle"):
        if f"test_{name}_hr@10" in ref:
            console.print(f"data: {name} test HR@10 {ref[f'test_{name}_hr@10']:.4f}, "
                          f"NDCG@10 {ref[f'test_{name}_ndcg@10']:.4f}")
    if ref.get("bayes_logloss") is not None:
        console.print(f"data: Bayes-optimal logloss {ref['bayes_logloss']:.4f} (NE {ref.get('bayes_ne', float('nan')):.4f}), "
                      f"base rate {ref.get('base_rate', float('nan')):.4f}")
