"""The local launcher: trials run in N long-lived worker processes, each pinned to its own cores/GPUs.

A worker imports JAX once and trains trial after trial in-process (the data world is built once
per worker), so a small trial costs seconds, not an interpreter start. Workers are separate
processes so that a trial that crashes the interpreter (segfault, the kernel's OOM killer) takes
only its worker down: the launcher records that trial as failed, starts a new worker, and goes on.

Stopping: Ctrl-C (or SIGTERM to the launcher) asks every worker to checkpoint and exit; if the
launcher itself is SIGKILLed, the kernel sends its workers SIGTERM (Linux `PR_SET_PDEATHSIG`), so
they checkpoint too. Relaunching skips finished trials and resumes the others from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scaling.sweep.spec import Sweep, Trial
from scaling.sweep.state import last_row, trial_lock

_STOP_GRACE_S = 120.0


@dataclasses.dataclass
class LaunchSummary:
    done: list[int] = dataclasses.field(default_factory=list)
    failed: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (index, status, reason)
    interrupted: bool = False


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this worker when the launcher dies (Linux); elsewhere a no-op."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def device_slices(workers: int) -> list[tuple[list[int], list[str]]]:
    """(cpus, gpus) for each worker: contiguous CPU chunks; GPUs split evenly (shared if fewer)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    gpus = _visible_gpus()
    slices = []
    for w in range(workers):
        cpu_chunk = cpus[w * len(cpus) // workers : (w + 1) * len(cpus) // workers] or (cpus and [cpus[w % len(cpus)]])
        if len(gpus) >= workers:
            gpu_chunk = gpus[w * len(gpus) // workers : (w + 1) * len(gpus) // workers]
        else:
            gpu_chunk = [gpus[w % len(gpus)]] if gpus else []
        slices.append((list(cpu_chunk or []), gpu_chunk))
    return slices


def _worker(wid: int, cpus: list[int], gpus: list[str], shared_gpus: int, cache_dir: str, tasks, events) -> None:
    _die_with_parent()
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(cpus))))
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if shared_gpus > 1:  # workers sharing a GPU must not each preallocate most of it
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / shared_gpus:.2f}")
    from scaling.train.compile_cache import enable_compilation_cache
    from scaling.train.loop import Interrupted, request_stop, stop_requested, train
    from scaling.train.run_record import classify_failure, failure_record

    for sig in (signal.SIGINT, signal.SIGTERM):  # between trials too: finish nothing new after a stop
        signal.signal(sig, request_stop)
    enable_compilation_cache(cache_dir)

    while not stop_requested():
        item = tasks.get()
        if item is None or stop_requested():
            return
        index, config, run_dir, restart = item
        events.put(("start", wid, index, os.getpid()))
        try:
            with trial_lock(run_dir):
                record = train(config, restart=restart)
            events.put(("end", wid, index, record.status, record.reason, _headline(record), record.wall_time_s))
            if stop_requested():
                events.put(("interrupted", wid, index, stop_requested()))
                return
        except (Interrupted, KeyboardInterrupt) as stop:
            events.put(("interrupted", wid, index, str(stop)))
            return
        except BaseException as err:  # the loop records its own failures; this catches failures around it
            if stop_requested():  # e.g. the second Ctrl-C: leave the trial resumable, record nothing
                events.put(("interrupted", wid, index, stop_requested()))
                return
            status = classify_failure(err) if isinstance(err, Exception) else "failed"
            reason = f"{type(err).__name__}: {err}"
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "traceback.txt"), "w") as f:
                f.write(traceback.format_exc())
            failure_record(config, status, reason).write(run_dir)
            events.put(("end", wid, index, status, reason, None, 0.0))


def _headline(record) -> str:
    """The metric a finished trial's line shows: final logloss (CTR) or the picked test NDCG@10."""
    if "ndcg@10" in record.best_eval:
        return f"test ndcg@10 {record.best_eval['ndcg@10']:.4f} (step {record.best_eval_step})"
    logloss = record.final_eval.get("logloss")
    return f"logloss {logloss:.4f}" if logloss is not None else ""


class _Display:
    """An overall bar plus one live line per running trial (plain lines when not a terminal)."""

    def __init__(self, total: int, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self.overall = self.progress.add_task("[bold]sweep", total=total, info="")
        self.rows: dict[int, int] = {}
        if self.live:
            self.progress.start()

    def started(self, trial: Trial) -> None:
        self.rows[trial.index] = self.progress.add_task(f"  {trial.label}", total=trial.config.train.steps, info="starting")
        if not self.live:
            self.console.print(f"start  {trial.label}  ({trial.trial_id})")

    def poll(self, trials: dict[int, Trial]) -> None:
        for index, task in self.rows.items():
            row = last_row(trials[index].run_dir, "train")
            if row:
                info = f"loss {row.get('train/loss', float('nan')):.4f}  {row.get('examples_per_s', 0):,.0f} ex/s"
                self.progress.update(task, completed=row.get("step", 0), info=info)

    def ended(self, trial: Trial, status: str, reason: str, headline: str, wall: float) -> None:
        task = self.rows.pop(trial.index, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.overall)
        if status == "ok":
            self.console.print(f"[green]done[/]   {trial.label}  {headline}  {wall:.0f}s")
        else:
            self.console.print(f"[red]{status}[/] {trial.label}  {reason[:120]}  (see {trial.run_dir})")

    def note(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def run_local(sweep: Sweep, trials: Sequence[Trial], *, workers: int = 1, restart: Sequence[int] = (),
              console: Console | None = None) -> LaunchSummary:
    """Run `trials` (a subset of `sweep.trials`) in `workers` processes; `restart` indexes start over."""
    console = console or Console(stderr=True, soft_wrap=True)
    summary = LaunchSummary()
    if not trials:
        return summary
    by_index = {t.index: t for t in trials}
    ctx = mp.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    for t in trials:
        tasks.put((t.index, t.config, t.run_dir, t.index in restart))
    workers = max(1, min(workers, len(trials)))
    for _ in range(workers):
        tasks.put(None)
    slices = device_slices(workers)
    shared = max(1, workers // max(1, len({g for _, gs in slices for g in gs}))) if any(gs for _, gs in slices) else 1

    procs: dict[int, mp.Process] = {}  # live workers by id
    holding: dict[int, int | None] = {}

    def spawn(wid: int) -> None:
        cpus, gpus = slices[wid % len(slices)]
        cache = os.path.join(sweep.directory, ".jax_cache")
        proc = ctx.Process(target=_worker, args=(wid, cpus, gpus, shared, cache, tasks, events), daemon=False)
        proc.start()
        procs[wid], holding[wid] = proc, None

    display = _Display(len(trials), console)
    next_wid = 0
    for _ in range(workers):
        spawn(next_wid)
        next_wid += 1
    remaining = set(by_index)

    def handle(event) -> None:
        kind, wid, index = event[:3]
        if kind == "start":
            holding[wid] = index
            display.started(by_index[index])
        elif kind == "end":
            _, _, _, status, reason, headline, wall = event
            holding[wid] = None
            remaining.discard(index)
            display.ended(by_index[index], status, reason, headline, wall)
            (summary.done.append(index) if status == "ok" else summary.failed.append((index, status, reason)))
        elif kind == "interrupted":
            holding[wid] = None
            summary.interrupted = True

    def drain(timeout: float) -> None:
        """Handle every queued event (waiting up to `timeout` for the first)."""
        while True:
            try:
                handle(events.get(timeout=timeout))
            except queue.Empty:
                return
            timeout = 0.05

    last_poll = 0.0
    try:
        while remaining and not summary.interrupted:
            drain(0.5)
            for wid, proc in list(procs.items()):
                if proc.exitcode is None:
                    continue
                procs.pop(wid)
                if proc.exitcode == 0:  # a normal exit: its events are already queued
                    continue
                drain(0.2)
                held = holding.pop(wid, None)
                if held is not None and held in remaining:
                    # The worker died mid-trial without reporting: record it, then replace the worker.
                    code = proc.exitcode
                    status = "oom" if code == -signal.SIGKILL else "failed"
                    reason = f"worker killed by {signal.Signals(-code).name}" if code < 0 else f"worker exited with {code}"
                    if status == "oom":
                        reason += " (the kernel's OOM killer is the usual cause)"
                    _record_dead_worker(by_index[held], status, reason)
                    remaining.discard(held)
                    display.ended(by_index[held], status, reason, "", 0.0)
                    summary.failed.append((held, status, reason))
                    if not summary.interrupted:
                        spawn(next_wid)
                        next_wid += 1
                elif held is None:
                    display.note(f"[red]worker {wid} exited with {proc.exitcode} before taking a trial[/]")
            if not procs:
                drain(0.2)
                break
            if time.time() - last_poll > 1.0:
                display.poll(by_index)
                last_poll = time.time()
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if remaining:
            summary.interrupted = True
            _stop_workers(procs, display)
        display.close()
        for proc in procs.values():
            proc.join(timeout=5)
    return summary


def _record_dead_worker(trial: Trial, status: str, reason: str) -> None:
    from scaling.train.run_record import failure_record

    os.makedirs(trial.run_dir, exist_ok=True)
    with open(os.path.join(trial.run_dir, "traceback.txt"), "w") as f:
        f.write(reason + "\n")
    failure_record(trial.config, status, reason).write(trial.run_dir)


def _stop_workers(procs: dict[int, mp.Process], display: _Display) -> None:
    """SIGTERM every worker (each checkpoints and exits), then wait; SIGKILL stragglers."""
    alive = [p for p in procs.values() if p.is_alive()]
    if alive:
        display.note("stopping: workers are saving checkpoints ...")
    for proc in alive:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + _STOP_GRACE_S
    for proc in alive:
        proc.join(timeout=max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
