"""Tables of a sweep's trials: the plan (`--dry-run`) and where each trial stands (`scaling status`)."""

from __future__ import annotations

import collections
import dataclasses
import functools

from rich.table import Table

from scaling.sweep.spec import Sweep, Trial
from scaling.sweep.state import TrialState, trial_state


@dataclasses.dataclass(frozen=True)
class PlanRow:
    trial: Trial
    params_dense: int
    params_embedding: int
    gflops_per_example: float
    train_flops: float  # 3 x forward x examples


@functools.lru_cache(maxsize=256)
def _counts(model_config, spec):
    from scaling.models.base import abstract_param_counts

    return abstract_param_counts(model_config, spec)


def plan(sweep: Sweep) -> list[PlanRow]:
    """Parameter counts (without allocating) and FLOPs of every trial."""
    rows = []
    for t in sweep.trials:
        counts = _counts(t.config.model, t.feature_spec())
        rows.append(PlanRow(t, counts.dense, counts.embedding, t.gflops_per_example, t.train_flops))
    return rows


def _lr(trial: Trial) -> str:
    return f"{trial.config.optimizer.dense.learning_rate:.3g}"


def plan_table(sweep: Sweep, rows: list[PlanRow]) -> Table:
    table = Table(title=f"sweep {sweep.name}: {len(rows)} trials -> {sweep.directory}")
    for col, justify in [("#", "right"), ("trial id", "left"), ("family", "left"), ("size", "left"),
                         ("seed", "right"), ("lr", "right"), ("other axes", "left"), ("params dense", "right"),
                         ("params emb", "right"), ("GFLOP/ex", "right"), ("train FLOPs", "right")]:
        table.add_column(col, justify=justify)
    for r in rows:
        t = r.trial
        size = t.size
        if t.target_gflops is not None:  # how near the preset lands to the requested compute
            size += f" (target {t.target_gflops:.3g}, x{r.gflops_per_example / t.target_gflops:.2f})"
        table.add_row(str(t.index), t.trial_id, t.family, size, str(t.seed), _lr(t), t.axes_text(skip=("optimizer.dense.learning_rate",)),
                      f"{r.params_dense:,}", f"{r.params_embedding:,}", f"{r.gflops_per_example:.3g}",
                      f"{r.train_flops:.3g}")
    total = sum(r.train_flops for r in rows)
    table.caption = f"total estimated train compute {total:.3g} FLOPs (3 x forward x examples)"
    return table


def states(sweep: Sweep) -> dict[int, TrialState]:
    return {t.index: trial_state(t.run_dir) for t in sweep.trials}


def status_counts(st: dict[int, TrialState]) -> collections.Counter:
    return collections.Counter(s.status for s in st.values())


def status_line(st: dict[int, TrialState]) -> str:
    counts = status_counts(st)
    order = ["done", "running", "interrupted", "failed", "diverged", "oom", "pending"]
    return " · ".join(f"{name} {counts[name]}" for name in order if counts[name] or name in ("done", "pending"))


_COLOURS = {"done": "green", "running": "cyan", "interrupted": "yellow", "pending": "dim"}


def status_table(sweep: Sweep, st: dict[int, TrialState]) -> Table:
    table = Table(title=f"sweep {sweep.name} ({sweep.directory}): {status_line(st)}")
    for col, justify in [("#", "right"), ("trial", "left"), ("trial id", "left"), ("status", "left"),
                         ("step", "right"), ("logloss", "right"), ("reason", "left")]:
        table.add_column(col, justify=justify)
    for t in sweep.trials:
        s = st[t.index]
        colour = _COLOURS.get(s.status, "red")
        step = f"{s.step}/{t.config.train.steps}" if s.status != "pending" else ""
        table.add_row(str(t.index), t.label, t.trial_id, f"[{colour}]{s.status}[/]", step,
                      "" if s.metric is None else f"{s.metric:.4f}", s.reason[:80])
    return table
