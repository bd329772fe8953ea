"""Which trials a (re)launch runs: finished ones are skipped, unfinished ones resume, failed ones
rerun from scratch only with `--retry-failed`, and trials another live process holds are left alone."""

from __future__ import annotations

import dataclasses

from scaling.sweep.spec import Sweep, Trial
from scaling.sweep.state import FAILED, TrialState


@dataclasses.dataclass(frozen=True)
class Selection:
    run: tuple[Trial, ...]
    restart: tuple[int, ...]  # indexes (of `run`) that start over: failed trials being retried
    skipped_done: int
    skipped_failed: int
    skipped_running: int

    def describe(self) -> str:
        parts = [f"{len(self.run)} to run"]
        if self.restart:
            parts.append(f"{len(self.restart)} failed being retried from scratch")
        if self.skipped_done:
            parts.append(f"{self.skipped_done} done (skipped)")
        if self.skipped_failed:
            parts.append(f"{self.skipped_failed} failed (skipped; --retry-failed reruns them)")
        if self.skipped_running:
            parts.append(f"{self.skipped_running} running in another process (left alone)")
        return ", ".join(parts)


def select(sweep: Sweep, states: dict[int, TrialState], *, retry_failed: bool, largest_first: bool = False) -> Selection:
    """The trials to run now; `largest_first` orders them by estimated train FLOPs, largest first."""
    run, restart = [], []
    done = failed = running = 0
    for t in sweep.trials:
        status = states[t.index].status
        if status == "done":
            done += 1
        elif status == "running":
            running += 1
        elif status in FAILED:
            if retry_failed:
                run.append(t)
                restart.append(t.index)
            else:
                failed += 1
        else:  # pending or interrupted (resumes from its checkpoint)
            run.append(t)
    if largest_first:
        run.sort(key=lambda t: -t.train_flops)
    return Selection(tuple(run), tuple(restart), done, failed, running)
