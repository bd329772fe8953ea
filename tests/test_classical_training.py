"""The classical baselines' shared machinery: user-item train rows, BPR and sampled log losses,
BPR-MF, recent-window popularity, fitted baselines through `scaling train`/`sweep`/`compare`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis.records import load_local
from analysis.retrieval_table import retrieval_rows
from scaling.config import load_run_config
from scaling.config_schema import ConfigError
from scaling.data.interactions import Interactions
from scaling.data.leave_one_out import leave_one_out
from scaling.data.sequence_batches import SequenceBatches
from scaling.data.spec import SequenceSpec
from scaling.flops import xla_flops_per_example
from scaling.models.baselines.bpr_mf import BPRMF, BPRMFConfig
from scaling.models.baselines.popularity import PopularityConfig
from scaling.sweep.plan import plan
from scaling.sweep.spec import load_sweep
from scaling.train.loop import train
from scaling.train.pairwise_losses import bce_loss, bpr_loss
from tests.conftest import run_cli


def _log(histories: list[list[int]], times: list[list[int]] | None = None, timed: bool = True) -> Interactions:
    items = np.concatenate([np.asarray(h, np.int32) for h in histories])
    stamps = np.concatenate([np.asarray(t, np.int64) for t in times]) if times else np.concatenate(
        [np.arange(len(h), dtype=np.int64) for h in histories])
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    num_items = int(items.max())
    return Interactions(offsets=offsets, items=items, timestamps=stamps, ratings=np.full(len(items), np.nan, np.float32),
                        user_ids=tuple(str(u) for u in range(len(histories))),
                        item_ids=("",) + tuple(str(i) for i in range(1, num_items + 1)), source="toy", timed=timed)


def test_user_item_rows_hold_every_training_event_as_a_target():
    split = leave_one_out(_log([[1, 2, 3, 4, 5, 6], [7, 8, 9]]))  # training events: 1..4 and 7
    batch = SequenceBatches(split, max_len=3, targets="all").train_batch(0, 2)
    rows = {int(u): (batch["items"][b], int(batch["lengths"][b])) for b, u in enumerate(batch["users"])}
    assert rows[0][1] == 3 and rows[0][0].tolist() == [2, 3, 4]  # the most recent 3 of 1..4
    assert rows[1][1] == 1 and rows[1][0].tolist() == [7, 0, 0]  # one event is enough: it is a target
    np.testing.assert_array_equal(batch["targets"], batch["items"])
    nxt = SequenceBatches(split, max_len=3).train_batch(0, 2)  # "next": user 1 has no (input, target) pair
    assert set(nxt["users"].tolist()) == {0}


def test_bpr_and_sampled_log_loss_by_hand():
    scores = jnp.array([[[2.0, 1.0, 3.0], [0.5, 0.0, 0.0]]])  # [B=1, L=2, 1 + M=2]
    targets = jnp.array([[4, 5]])
    negatives = jnp.array([[[7, 4], [8, 9]]])  # position 0's second negative is an accidental hit
    lengths = jnp.array([2])
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731 - softplus
    want_bpr = (sp(1.0 - 2.0) + sp(0.0 - 0.5) + sp(0.0 - 0.5)) / 3
    np.testing.assert_allclose(bpr_loss(scores, targets, negatives, lengths), want_bpr, rtol=1e-6)
    want_bce = ((sp(-2.0) + sp(1.0)) + (sp(-0.5) + 2 * sp(0.0))) / 2
    np.testing.assert_allclose(bce_loss(scores, targets, negatives, lengths), want_bce, rtol=1e-6)
    # a padded position counts for nothing
    np.testing.assert_allclose(bpr_loss(scores, targets, negatives, jnp.array([1])), sp(-1.0), rtol=1e-6)


def test_bpr_mf_scores_are_biased_dot_products_and_flops_match_xla():
    spec = SequenceSpec(num_items=9, num_negatives=3, num_users=4)
    config = BPRMFConfig(embed_dim=5, max_len=6, l2=0.0)
    model = BPRMF(config, spec, rngs=nnx.Rngs(0))
    model.item_b[...] = jax.random.normal(jax.random.key(1), (10, 1))
    users = jnp.array([0, 3])
    batch = {"users": users, "items": jnp.ones((2, 6), jnp.int32), "lengths": jnp.array([6, 2]),
             "targets": jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0]]), "negatives": jnp.array([[[9, 1, 2]], [[3, 4, 5]]])}
    p, q, b = np.asarray(model.user_emb[...]), np.asarray(model.item_emb[...]), np.asarray(model.item_b[...])[:, 0]
    want = p[[0, 3]] @ q.T + b
    got = np.asarray(model.catalogue_scores(batch, temperature=0.05))  # no temperature: BPR scores are raw
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    forward = np.asarray(model.training_forward(batch))
    np.testing.assert_allclose(forward[1, 1, 0], want[1, 8], rtol=1e-5)
    np.testing.assert_allclose(forward[0, 2, 1:], want[0, [9, 1, 2]], rtol=1e-5)
    grads = nnx.grad(lambda m: m.training_loss(batch, 1.0))(model)
    assert float(jnp.abs(grads["user_emb"][...]).sum()) > 0
    for dim, negatives in ((16, 8), (64, 128)):
        spec = SequenceSpec(num_items=50, num_negatives=negatives, shared_negatives=True, num_users=10)
        config = BPRMFConfig(embed_dim=dim, max_len=20)
        xla = xla_flops_per_example(BPRMF(config, spec, rngs=nnx.Rngs(0)), spec, max_len=20)
        assert abs(config.flops_per_example(spec) / xla - 1) < 0.1, (dim, config.flops_per_example(spec), xla)


def test_recent_window_popularity_counts_the_window_before_each_request():
    day = 86400
    # user 0 and 1 train on items 1, 1, 2 early and 3 late; user 2's requests come at day 10 and 11
    log = _log([[1, 1, 3, 4, 5], [2, 3, 3, 4, 5], [1, 3, 9]],
               times=[[0, day, 9 * day, 20 * day, 21 * day], [0, 9 * day, 9 * day, 20 * day, 21 * day],
                      [0, 10 * day, 11 * day]])
    split = leave_one_out(log)
    fitted = PopularityConfig(window_days=2).fit(split, seed=0)
    batch, _ = SequenceBatches(split, max_len=5).eval_batch(np.array([2]), "test")  # request at day 11
    scores = fitted.score(batch)[0]
    # training events in [day 9, day 11): item 3 three times (users 0, 1, 1), nothing else
    assert np.argmax(scores) == 3 and 3 <= scores[3] < 4 and scores[1] < 1
    glob = PopularityConfig().fit(split, seed=0).score(batch)[0]
    assert glob[1] == 3 and glob[3] == 3  # training prefixes: 1,1,3 / 2,3,3 / 1
    with pytest.raises(ConfigError, match="window_days"):
        PopularityConfig(window_days=2).fit(leave_one_out(_log([[1, 2, 3, 4]], timed=False)), seed=0)


def _fitted_config(tmp_path, *extra):
    data = {"name": "fit_test", "data": {"name": "synthetic_sequences", "num_users": 300, "num_items": 120,
                                          "mean_length": 20.0},
            "model": {"name": "popularity"}, "train": {"output_dir": str(tmp_path / "runs"), "eval_batch_size": 128},
            "logging": {"progress": False, "wandb": {"mode": "disabled"}}}
    return load_run_config(None, list(extra), data=data)


def test_a_fitted_baseline_writes_the_run_record_of_a_trained_model(tmp_path):
    record = train(_fitted_config(tmp_path))
    assert record.status == "ok", record.reason
    assert record.flops_per_example_analytic == 0 and record.params_embedding == 121
    assert record.fit["fit_time_s"] >= 0 and record.fit["eval_time_s"] > 0 and "fit_peak_host_bytes" in record.fit
    # the same evaluation code as the sequence models: global popularity is the data's own popularity row
    assert record.best_eval["test_hr@10"] == record.data_reference["test_popularity_hr@10"]
    assert record.best_eval["hr@10"] == record.best_eval["test_hr@10"] and "valid_ndcg@10" in record.best_eval
    saved = json.load(open(os.path.join(tmp_path, "runs", "fit_test", record.run_id, "result.json")))
    assert saved["fit"]["parameters"] == 121


def test_sweep_of_baselines_and_its_retrieval_table(tmp_path):
    sweep_yaml = tmp_path / "baselines.yaml"
    sweep_yaml.write_text(f"""
name: bl
data: {{name: synthetic_sequences, num_users: 300, num_items: 120, mean_length: 20.0, num_negatives: 8}}
model: {{name: bpr_mf}}
optimizer: {{dense: {{learning_rate: 3.0e-3}}, embedding: {{name: dense}}}}
train: {{steps: 20, batch_size: 32, eval_every: 0, eval_batch_size: 128, log_every: 10, output_dir: {tmp_path / 'runs'}}}
sweep:
  scale:
    popularity:
    bpr_mf: [d8]
  grid:
    model.window_days: {{popularity: [0.0, 2.0]}}
  metric: ndcg@10
""")
    sweep = load_sweep(str(sweep_yaml))
    assert [(t.family, t.size) for t in sweep.trials] == [("popularity", "custom")] * 2 + [("bpr_mf", "d8")]
    done = run_cli("sweep", str(sweep_yaml), "--wandb", "disabled")
    assert done.returncode == 0, done.stderr
    runs = load_local(str(tmp_path / "runs" / "bl"))
    assert not runs.dropped
    rows = retrieval_rows(runs, "ndcg@10")
    labels = [r["label"] for r in rows]
    assert "popularity window_days=0.0" in labels and "popularity window_days=2.0" in labels and "bpr_mf:d8" in labels
    assert [r["ndcg@10"] for r in rows] == sorted((r["ndcg@10"] for r in rows), reverse=True)
    shown = run_cli("compare", str(tmp_path / "runs" / "bl"), env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "popularity window_days=2.0" in shown.stdout and "(popularity, from the data)" in shown.stdout
    # the plan (dry run) counts what the run measured: BPR-MF's user table needs the loaded data
    bpr_trial = sweep.trials[2]
    (row,) = [r for r in plan(sweep) if r.trial is bpr_trial]
    record = json.load(open(os.path.join(bpr_trial.run_dir, "result.json")))
    assert row.params_embedding == record["params_embedding"] > 300 * 8
    assert bpr_trial.gflops_per_example * 1e9 == pytest.approx(record["flops_per_example_analytic"])
