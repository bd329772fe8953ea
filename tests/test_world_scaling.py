"""The synthetic world's model-size scaling is real: at a fixed example budget, the smallest size of
a ladder is clearly worse than a larger one, across seeds, by more than seed noise.

Each family trains its smallest size and a size 10-50x larger on the same 409,600 examples of the
default world, with two init seeds each (about two minutes on 2 CPU cores in all).
"""

from __future__ import annotations

import numpy as np
import pytest

from scaling.config import load_run_config
from scaling.train.loop import train

# The default world (data section left at its defaults) and the optimizer settings of its tuning runs.
BASE = {
    "optimizer": {
        "dense": {"name": "adamw", "learning_rate": 4e-3, "weight_decay": 0.0, "grad_clip_norm": 1.0},
        "embedding": {"name": "rowwise_adagrad", "learning_rate": 0.2},
        "schedule": {"name": "cosine", "warmup_fraction": 0.05, "final_fraction": 0.1},
    },
    "train": {"batch_size": 512},
}


@pytest.mark.parametrize("family, small, large", [("wukong", "xxs", "s"), ("dlrm", "xxs", "l")])
def test_larger_model_is_clearly_better_at_fixed_examples(tmp_path, family, small, large):
    losses: dict[str, list[float]] = {small: [], large: []}
    for size in (small, large):
        for seed in (0, 1):
            record = train(load_run_config(None, data={**BASE, "model": {"name": family}}, overrides=[
                f"model.name={family}", f"model.size={size}", f"seed={seed}", "train.steps=800",
                "train.eval_every=0", "train.checkpoint_every=0", "logging.progress=false",
                "logging.wandb.mode=disabled", f"train.output_dir={tmp_path}",
            ]))
            assert record.status == "ok", record.reason
            assert record.examples_seen == 800 * 512
            losses[size].append(record.final_eval["logloss"])
    small_l, large_l = np.array(losses[small]), np.array(losses[large])
    seed_noise = max(np.ptp(small_l), np.ptp(large_l))
    gap = small_l.mean() - large_l.mean()
    assert large_l.max() < small_l.min(), losses  # every seed of the larger model beats every seed of the smaller
    assert gap > 1.5 * seed_noise and gap > 0.004, (gap, seed_noise, losses)
