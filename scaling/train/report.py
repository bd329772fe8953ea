"""Terminal tables of run records."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from scaling.train.run_record import RunRecord


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def records_table(records: Sequence[RunRecord], title: str = "results") -> Table:
    """One row per run: size, params, GFLOP/ex, eval logloss / NE / AUC, excess over Bayes, speed."""
    table = Table(title=title)
    for col, justify in [("run", "left"), ("status", "left"), ("params dense", "right"), ("params emb", "right"),
                         ("MFLOP/ex", "right"), ("examples", "right"), ("logloss", "right"), ("NE", "right"),
                         ("AUC", "right"), ("excess", "right"), ("ex/s", "right"), ("wall s", "right")]:
        table.add_column(col, justify=justify)
    for r in records:
        ev = r.final_eval or {}
        table.add_row(
            f"{r.family}:{r.size}", r.status if r.status == "ok" else f"{r.status} ({r.reason[:40]})",
            f"{r.params_dense:,}", f"{r.params_embedding:,}", f"{r.flops_per_example_analytic / 1e6:.3f}",
            f"{r.examples_seen:,}", _fmt(ev.get("logloss"), ".4f"), _fmt(ev.get("ne"), ".4f"),
            _fmt(ev.get("auc"), ".4f"), _fmt(ev.get("excess_logloss"), ".4f"), f"{r.examples_per_s:,.0f}",
            f"{r.wall_time_s:.0f}",
        )
    return table


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a file or CI log."""
    return Console(width=None if Console().is_terminal else 160)


def print_record(record: RunRecord) -> None:
    console = wide_console()
    console.print(records_table([record], title=f"run {record.run_id}"))
    ref = record.data_reference
    if ref.get("bayes_logloss") is not None:
        console.print(f"data: Bayes-optimal logloss {ref['bayes_logloss']:.4f} (NE {ref.get('bayes_ne', float('nan')):.4f}), "
                      f"base rate {ref.get('base_rate', float('nan')):.4f}")
