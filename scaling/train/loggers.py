"""Where a run's numbers go: metrics.jsonl (the source of truth), a live progress bar, and W&B."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scaling.config import LoggingConfig, RunConfig
from scaling.config_schema import to_dict


class MetricsFile:
    """Append-only metrics.jsonl; on resume, lines past the restored step are dropped."""

    def __init__(self, run_dir: str, resume_step: int | None, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled  # one writer per run: process 0 of a multi-process run
        if not enabled:
            return
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


class WandbMirror:
    """Mirror of a run in W&B (offline by default). Never required: failures only warn."""

    def __init__(self, cfg: LoggingConfig, config: RunConfig, run_id: str, run_dir: str, extra_config: dict[str, Any],
                 enabled: bool = True):
        self.run = None
        if cfg.wandb.mode == "disabled" or not enabled:
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity or None,
                group=cfg.wandb.group or config.name,
                job_type=config.model.name,
                name=run_id,
                id=run_id,
                tags=list(cfg.wandb.tags),
                dir=cfg.wandb.dir or run_dir,
                mode=cfg.wandb.mode,
                resume="allow",
                config={**to_dict(config), **extra_config},
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        except Exception as err:  # W&B must never take a run down
            print(f"warning: W&B disabled for this run ({type(err).__name__}: {err})", file=sys.stderr)
            self.run = None

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k not in ("step", "split")}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish()


class ProgressBar:
    """A live bar: step, loss, examples/s and ETA (plain lines when not a terminal). Warnings are
    printed even without the bar (the first of a run only, then), unless `silent` (a process of a
    multi-process run other than process 0)."""

    def __init__(self, enabled: bool, total: int, start: int, description: str, silent: bool = False):
        self.enabled = enabled and not silent
        self.silent = silent
        self.warned = False
        self.console = Console(stderr=True)
        self.last_print = 0.0
        self.total = total
        self.description = description
        self.progress = None
        if self.enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("step {task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} ex/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(description, total=total, completed=start, loss="-", rate="-")
            self.progress.start()

    def update(self, step: int, loss: float | None, rate: float | None) -> None:
        if not self.enabled:
            return
        loss_s = f"{loss:.4f}" if loss is not None else "-"
        rate_s = f"{rate:,.0f}" if rate else "-"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=loss_s, rate=rate_s)
        elif time.time() - self.last_print > 10 or step == self.total:
            self.last_print = time.time()
            print(f"{self.description}: step {step}/{self.total} loss {loss_s} {rate_s} ex/s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def warn(self, text: str) -> None:
        """A warning line above the bar; without the bar, the run's first warning on stderr."""
        if self.silent or (not self.enabled and self.warned):
            return
        if not self.enabled:
            text += " (later warnings of this run are not printed: see metrics.jsonl)"
        self.warned = True
        self.console.print(f"warning: {text}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
