"""Next-item training end to end: a small synthetic sequence world, HSTU through the same loop as CTR."""

from __future__ import annotations

import json
import os

import pytest

from scaling.config import load_run_config
from scaling.config_schema import ConfigError
from scaling.train.loop import run_directory, train
from tests.conftest import run_cli


def _config(tmp_path, *extra: str):
    data = {
        "name": "seq_test",
        "data": {"name": "synthetic_sequences", "num_users": 300, "num_items": 120, "mean_length": 20.0,
                 "num_negatives": 16},
        "model": {"name": "hstu", "size": "xs", "max_len": 32, "dropout": 0.1},
        "optimizer": {"dense": {"name": "adamw", "learning_rate": 3.0e-3, "b2": 0.98, "grad_clip_norm": 0.0},
                      "embedding": {"name": "dense"}, "schedule": {"name": "constant", "warmup_fraction": 0.0}},
        "train": {"steps": 40, "batch_size": 32, "eval_every": 10, "eval_batch_size": 128, "checkpoint_every": 20,
                  "log_every": 10, "output_dir": str(tmp_path / "runs")},
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    return load_run_config(None, list(extra), data=data)


def test_hstu_trains_and_reports_the_validation_picked_test_metrics(tmp_path):
    config = _config(tmp_path)
    record = train(config)
    assert record.status == "ok", record.reason
    run_dir = run_directory(config)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    for key in ("hr@1", "hr@5", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@200", "mrr", "coverage@10", "novelty"):
        assert f"eval/test_{key}" in evals[-1] and f"eval/valid_{key}" in evals[-1], key
    # the best evaluation is the one with the highest validation NDCG@10, and its test numbers are reported
    best = max(evals, key=lambda r: r["eval/valid_ndcg@10"])
    assert record.best_eval_step == best["step"]
    assert record.best_eval["hr@10"] == best["eval/test_hr@10"] == record.best_eval["test_hr@10"]
    # training learns: the sampled-softmax loss falls and the model beats a random ranking (10/120)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.2
    assert record.best_eval["hr@10"] > 2 * 10 / 120
    ref = record.data_reference
    assert ref["test_oracle_hr@10"] > ref["test_popularity_hr@10"] > 0
    assert record.params_embedding == 121 * 24 and record.flops_per_example_xla > 0
    assert abs(record.flops_per_example_analytic / record.flops_per_example_xla - 1) < 0.15
    # a finished run is found again, not retrained
    assert train(config).best_eval == record.best_eval


def test_same_seed_same_numbers_with_dropout(tmp_path):
    a = train(_config(tmp_path / "a", "train.steps=12", "train.eval_every=0"))
    b = train(_config(tmp_path / "b", "train.steps=12", "train.eval_every=0"))
    assert a.status == b.status == "ok"
    assert a.final_eval == b.final_eval


def test_kind_mismatch_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        load_run_config(None, ["model.name=hstu"])  # the default data set is CTR
    with pytest.raises(ConfigError, match="data.path"):
        load_run_config(None, ["model.name=hstu", "data.name=interactions", f"data.path={tmp_path}/none.txt"])
    result = run_cli("train", "--set", "model.name=hstu", "--set", "data.name=interactions",
                     "--set", "data.path=/nonexistent/Beauty.txt", os.devnull)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.path" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "Beauty.txt"  # a malformed line stops `scaling train` with the file and line, exit 2
    bad.write_text("1 1 2 3\n2 4 x 6\n")
    result = run_cli("train", "--set", "model.name=hstu", "--set", "data.name=interactions",
                     "--set", f"data.path={bad}", "--set", f"train.output_dir={tmp_path}/runs", os.devnull)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {bad}:2: expected integer ids in the `user item1 item2 ...` format, got 'x'"


@pytest.mark.parametrize("name, size, expected", [
    ("hstu_ml1m", "ml1m", dict(embed_dim=50, num_layers=2, num_heads=1, qk_dim=50, max_len=200, dropout=0.2)),
    ("hstu_ml1m", "ml1m_large", dict(embed_dim=50, num_layers=8, num_heads=2, qk_dim=25, max_len=200)),
    ("hstu_ml20m", "ml20m", dict(embed_dim=256, num_layers=4, num_heads=4, qk_dim=64, max_len=200)),
    ("hstu_ml20m", "ml20m_large", dict(embed_dim=256, num_layers=16, num_heads=8, qk_dim=32, max_len=200)),
    ("hstu_beauty", "beauty", dict(embed_dim=64, num_layers=2, max_len=50)),
])
def test_published_configurations_load(tmp_path, name, size, expected):
    from tests.conftest import ROOT

    ratings = tmp_path / "ratings.dat"
    ratings.write_text("1::10::5::300\n1::20::3::100\n1::30::4::200\n")
    config = load_run_config(os.path.join(ROOT, "sweeps", f"{name}.yaml"),
                             [f"data.path={ratings}", f"model.size={size}"])
    assert {k: getattr(config.model, k) for k in expected} == expected
    assert config.model.temperature == 0.05 and config.data.num_negatives == 128
    assert config.train.batch_size == 128 and config.optimizer.embedding.name == "dense"
    dense = config.optimizer.dense
    assert (dense.name, dense.learning_rate, dense.b1, dense.b2, dense.weight_decay) == ("adamw", 1e-3, 0.9, 0.98, 0.0)
