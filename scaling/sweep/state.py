"""Where each trial of a sweep stands, read from its run directory alone (no launcher state).

    done         result.json with status ok
    failed / oom / diverged   result.json with that status (reason and traceback.txt beside it)
    running      a live process holds the trial's lock (same host: its pid is alive; another
                 host, e.g. a SLURM node: the trial wrote metrics in the last 15 minutes)
    interrupted  checkpoints or metrics exist but nothing holds the lock: resumable
    pending      nothing yet

The lock is `<run_dir>/.lock` (JSON: pid, host, started), written by whichever launcher runs the
trial and removed when it ends; a stale lock from a killed process reads as `interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Literal

TrialStatus = Literal["done", "failed", "oom", "diverged", "running", "interrupted", "pending"]
FAILED = ("failed", "oom", "diverged")
_REMOTE_HEARTBEAT_S = 15 * 60


@dataclasses.dataclass(frozen=True)
class TrialState:
    status: TrialStatus
    step: int = 0
    reason: str = ""
    metric: float | None = None  # final eval logloss when done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, ".lock")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def lock_is_live(run_dir: str) -> bool:
    lock = read_lock(run_dir)
    if lock is None:
        return False
    if lock.get("host") == socket.gethostname():
        return _pid_alive(int(lock.get("pid", -1)))
    heartbeat = max((_mtime(os.path.join(run_dir, name)) for name in (".lock", "metrics.jsonl")), default=0.0)
    return time.time() - heartbeat < _REMOTE_HEARTBEAT_S


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


@contextlib.contextmanager
def trial_lock(run_dir: str) -> Iterator[None]:
    """Mark a trial as running in this process for the duration of the block."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    try:
        yield
    finally:
        lock = read_lock(run_dir)
        if lock and lock.get("pid") == os.getpid() and lock.get("host") == socket.gethostname():
            with contextlib.suppress(OSError):
                os.remove(path)


def last_row(run_dir: str, split: str | None = None) -> dict:
    """The last row of metrics.jsonl (of `split`, e.g. 'train', if given); {} if none."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))  # the tail is enough: rows are short
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (split is None or row.get("split") == split):
            return row
    return {}


def last_step(run_dir: str) -> int:
    """The last step logged in metrics.jsonl (0 if none)."""
    return int(last_row(run_dir).get("step", 0))


def trial_state(run_dir: str) -> TrialState:
    """The status of the trial whose run directory is `run_dir`."""
    result = os.path.join(run_dir, "result.json")
    if os.path.exists(result):
        try:
            with open(result) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {"status": "failed", "reason": "unreadable result.json"}
        status = record.get("status", "failed")
        if status == "ok":
            metric = (record.get("final_eval") or {}).get("logloss")
            return TrialState("done", int(record.get("steps", 0)), "", metric)
        if status in FAILED:
            return TrialState(status, int(record.get("steps", 0)), str(record.get("reason", "")))
    if lock_is_live(run_dir):
        return TrialState("running", last_step(run_dir))
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) or os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return TrialState("interrupted", last_step(run_dir))
    return TrialState("pending")
