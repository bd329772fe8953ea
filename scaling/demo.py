"""`make demo`: the quickstart sweep end to end: run the trials, fit the laws, draw the plot.

    scaling sweep sweeps/quickstart.yaml --workers N --largest-first
    scaling fit runs/quickstart
    scaling plot runs/quickstart

About 13 minutes on 2 CPU cores. Interrupt it at any point (Ctrl-C) and run it again: finished
trials are reused and unfinished ones resume from their checkpoints; `make clean` starts over.
"""

from __future__ import annotations

import os
import sys
import time

from scaling import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join("sweeps", "quickstart.yaml")
RUNS = os.path.join("runs", "quickstart")


def default_workers() -> int:
    """One worker per core, up to 4 (the quickstart's trials are small)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


def main(argv: list[str] | None = None) -> int:
    extra = list(argv if argv is not None else sys.argv[1:])
    os.chdir(ROOT)
    t0 = time.time()
    rc = cli.main(["sweep", QUICKSTART, "--workers", str(default_workers()), "--largest-first", *extra])
    if rc not in (0, 1):  # interrupted or bad input; 1 = some trials failed, the rest can still be fitted
        return rc
    swept = time.time() - t0
    for command in (["fit", RUNS], ["plot", RUNS]):
        if cli.main(command) != 0:
            return 1
    print(f"demo: sweep {swept:.0f} s, total {time.time() - t0:.0f} s. Report: {RUNS}/report.md; "
          f"plot: {RUNS}/plots/scaling.png (and .svg); `scaling status {QUICKSTART}` lists the trials.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
