"""Learning curves from run directories: eval logloss vs examples seen, with the data's Bayes floor."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_eval_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """(examples seen, eval logloss) at every evaluation of a run, from its metrics.jsonl."""
    with open(os.path.join(run_dir, "result.json")) as f:
        batch = json.load(f)["config"]["train"]["batch_size"]
    examples, losses = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "eval":
                examples.append(row["step"] * batch)
                losses.append(row["eval/logloss"])
    return examples, losses


def plot_learning_curves(run_dirs: Sequence[str], out_path: str, title: str = "") -> str:
    """Eval logloss vs examples for each run, labelled with family, size and MFLOP/example.

    The Bayes-optimal and constant-predictor loglosses of the first run's data are drawn as
    reference lines when the data reports them. Writes `out_path` (PNG or SVG) and returns it.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    reference = {}
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "result.json")) as f:
            record = json.load(f)
        reference = reference or record.get("data_reference", {})
        x, y = read_eval_curve(run_dir)
        label = f"{record['family']} {record['size']} ({record['flops_per_example_analytic'] / 1e6:.2f} MFLOP/ex)"
        ax.plot(x, y, marker="o", markersize=3, label=label)
    if "bayes_logloss" in reference:
        ax.axhline(reference["bayes_logloss"], color="k", linestyle="--", linewidth=1, label="Bayes-optimal")
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("eval logloss")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
