"""Runs of a sweep pulled from W&B (online) into the same `RunSet` the local files give.

Training mirrors each run to W&B with group = the sweep name, job_type = the family, the resolved
config plus `gflops_per_example`, params and size in `config`, and the whole run record in the
summary (`scaling/train/loggers.py`), so a W&B run carries everything `result.json` does:

    runs = load_wandb("my-team/recsys-scaling", group="quickstart")

Offline runs are invisible to the API until `wandb sync`; the local run directories stay the
source of truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from analysis.records import RunSet, infer_tuned, run_from_record, split_ok

# Summary keys that make a W&B run a run record of ours.
_REQUIRED = ("run_id", "family", "status", "final_eval", "flops_per_example_analytic")


def _plain(value: Any) -> Any:
    """W&B summary values can be SummarySubDict etc.; turn them into plain dicts/lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record_from_wandb(run: Any) -> dict[str, Any] | None:
    """A public-API run -> our record dict, or None when the run is not one of ours (or unfinished)."""
    summary = _plain(getattr(run, "summary_metrics", None) or dict(run.summary))
    if not all(key in summary for key in _REQUIRED):
        return None
    record = dict(summary)
    config = _plain(run.config)
    record.setdefault("config", {k: v for k, v in config.items() if not k.startswith("_")})
    record.setdefault("size", config.get("size", "custom"))
    return record


def load_wandb(path: str, group: str, api: Any = None) -> RunSet:
    """All runs of `entity/project` in W&B group `group` (the sweep name)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs, skipped = [], []
    for run in api.runs(path, filters={"group": group}):
        record = record_from_wandb(run)
        if record is None:
            skipped.append((getattr(run, "id", "?"), f"W&B state {getattr(run, 'state', '?')}: no run record in its summary"))
            continue
        runs.append(run_from_record(record))
    if not runs:
        raise FileNotFoundError(f"W&B {path}: no finished runs of ours in group {group!r}")
    tune = infer_tuned([r for r in runs if r.status == "ok"])  # W&B does not know the sweep's `tune`
    result = split_ok(runs, tune, f"wandb:{path}/{group}")
    return RunSet(result.ok, result.dropped + tuple(skipped), result.tune, result.source)
