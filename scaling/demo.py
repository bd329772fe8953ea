"""`make demo`: train Wukong and DLRM on the embedded synthetic CTR data and print a result table.

Each run takes a minute or two on a 2-core CPU. Rerunning the demo reuses finished runs (the run
directory is the source of truth); `make clean` starts over.
"""

from __future__ import annotations

import os
import sys
import time

from analysis.curves import plot_learning_curves
from scaling.config import load_run_config
from scaling.train.loop import run_directory, train
from scaling.train.report import records_table, wide_console

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps", "quickstart.yaml")
DEMO_RUNS = (("wukong", "m"), ("dlrm", "m"))


def main(argv: list[str] | None = None) -> int:
    extra = list(argv if argv is not None else sys.argv[1:])
    console = wide_console()
    records, run_dirs = [], []
    t0 = time.time()
    for family, size in DEMO_RUNS:
        config = load_run_config(QUICKSTART, ["name=demo", f"model.name={family}", f"model.size={size}", *extra])
        run_dirs.append(run_directory(config))
        console.print(f"[bold]training {family}:{size}[/bold] -> {run_dirs[-1]}")
        records.append(train(config))
    console.print(records_table(records, title="demo: synthetic CTR, one pass"))
    if all(r.status == "ok" for r in records):
        plot = os.path.join(os.path.dirname(run_dirs[0]), "learning_curves.png")
        plot_learning_curves(run_dirs, plot, title="Wukong vs DLRM on the synthetic CTR world")
        console.print(f"learning curves: {plot}")
    ref = records[0].data_reference
    console.print(
        f"Bayes-optimal logloss {ref['bayes_logloss']:.4f} (NE {ref['bayes_ne']:.4f}); constant predictor "
        f"{ref['constant_logloss']:.4f}; 'excess' = eval logloss - Bayes. This invocation: {time.time() - t0:.0f} s (finished runs are reused)."
    )
    return 0 if all(r.status == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
