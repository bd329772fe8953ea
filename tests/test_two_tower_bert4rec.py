"""Two-tower and BERT4Rec: the in-batch logQ loss and the causal mean by hand, an approximate index's
recall, BERT4Rec's bidirectional padding-blind encoder, its Cloze masks and evaluation input,
gradients, FLOPs vs XLA, and a short run of each through the training loop."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig, load_run_config
from scaling.config_schema import build
from scaling.data.spec import SequenceSpec, TrainingEvents
from scaling.flops import abstract_model, xla_flops_per_example
from scaling.models.baselines.bert4rec import BERT4Rec
from scaling.models.baselines.two_tower import IVFIndex, TwoTower, exact_top_k, recall_at_k
from scaling.models.registry import build_model
from scaling.train.loop import run_directory, train

# Six items with unequal training counts (item 2 is the most frequent): a non-trivial logQ.
EVENTS = TrainingEvents(users=np.array([0, 0, 0, 1, 1, 1], np.int32), items=np.array([1, 2, 3, 2, 4, 5], np.int32),
                        counts=np.array([1, 4, 2, 3, 1, 1], np.int32))
SPEC = SequenceSpec(num_items=6, num_negatives=2, shared_negatives=True, num_users=2, training_events=EVENTS)
TOWER = {"name": "two_tower", "embed_dim": 4, "hidden": [8], "max_len": 3}
BERT = {"name": "bert4rec", "embed_dim": 8, "num_blocks": 1, "num_heads": 2, "ffn_dim": 16, "max_len": 6, "dropout": 0.0}


def rngs() -> nnx.Rngs:
    """RBG keys: threefry's bit generator takes seconds to compile per eager init op on a CPU."""
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def two_tower(**overrides) -> TwoTower:
    return build_model(build(ModelConfig, {**TOWER, **overrides}), SPEC, rngs=rngs())


def bert4rec(spec: SequenceSpec = SPEC, **overrides) -> BERT4Rec:
    return build_model(build(ModelConfig, {**BERT, **overrides}), spec, rngs=rngs())


def toy_batch() -> dict:
    """Two rows; target 2 is in both (an accidental hit for row 1's position 1)."""
    return {"items": jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32), "targets": jnp.array([[2, 3, 4], [5, 2, 0]], jnp.int32),
            "lengths": jnp.array([3, 2], jnp.int32), "users": jnp.array([0, 1], jnp.int32),
            "negatives": jnp.array([[[1, 3]], [[4, 5]]], jnp.int32)}


# ------------------------------------------------------------------------------------- two-tower


@pytest.mark.parametrize("logq, uniform", [(True, False), (False, False), (True, True)])
def test_in_batch_softmax_with_logq_matches_numpy(logq, uniform):
    model = two_tower(logq_correction=logq, uniform_negatives=uniform, temperature=0.5)
    batch = toy_batch()
    tau = 0.5
    q = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
    v = np.asarray(nnx.jit(lambda m: m.item_embeddings(jnp.arange(7)))(model))
    share = np.bincount(EVENTS.items, weights=EVENTS.counts, minlength=7) / EVENTS.counts.sum()
    targets, negatives = np.asarray(batch["targets"]), np.asarray(batch["negatives"])
    losses = []
    for b, length in enumerate([3, 2]):
        pool = targets[1 - b][targets[1 - b] > 0]  # the other row's valid targets (R = 1)
        for t in range(length):
            y = targets[b, t]
            cands = [c for c in pool if c != y] + ([c for c in negatives[b, 0] if c != y] if uniform else [])
            items = [y, *cands]
            logits = v[items] @ q[b, t] / tau
            if logq:
                logits -= np.log(len(pool) * share[items] + (2 / 6 if uniform else 0.0))
            losses.append(np.log(np.exp(logits).sum()) - logits[0])
    loss = nnx.jit(lambda m, b: m.training_loss(b, tau))(model, batch)
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)


def test_candidates_are_the_targets_of_the_next_r_rows():
    model = two_tower(in_batch_rows=1)
    batch = {"items": jnp.array([[1, 2, 3], [4, 5, 0], [6, 0, 0]], jnp.int32),
             "targets": jnp.array([[2, 3, 4], [5, 2, 0], [1, 0, 0]], jnp.int32),
             "lengths": jnp.array([3, 2, 1], jnp.int32), "users": jnp.array([0, 1, 0], jnp.int32)}
    scores = np.asarray(nnx.jit(lambda m, b: m.training_forward(b))(model, batch))
    q = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
    v = np.asarray(nnx.jit(lambda m: m.item_embeddings(jnp.arange(7)))(model))
    assert scores.shape == (3, 3, 1 + 3)  # the target, then row b + 1's three target slots
    targets = np.asarray(batch["targets"])
    for b in range(3):
        np.testing.assert_allclose(scores[b, :, 0], np.sum(q[b] * v[targets[b]], -1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores[b, :, 1:], q[b] @ v[targets[(b + 1) % 3]].T, rtol=1e-5, atol=1e-6)


def test_user_tower_reads_the_causal_mean_and_only_the_past():
    model = two_tower()
    batch = toy_batch()
    table = np.asarray(model.item_emb[...])
    e = table[np.asarray(batch["items"])]
    means = np.cumsum(e, axis=1) / np.arange(1, 4)[None, :, None]
    features = np.asarray(model.user_features(batch))
    np.testing.assert_allclose(features[..., :4], means, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(features[..., 4:8], e, rtol=1e-6)
    np.testing.assert_allclose(features[..., 8:], np.asarray(model.user_emb[...])[[0, 1]][:, None].repeat(3, 1))
    q = np.asarray(model(batch))
    later = {**batch, "items": batch["items"].at[0, 2].set(6)}
    np.testing.assert_allclose(np.asarray(model(later))[0, :2], q[0, :2], rtol=1e-6)
    np.testing.assert_array_equal(q[1, 2], 0.0)  # padding
    np.testing.assert_allclose(np.linalg.norm(q[0], axis=-1), 1.0, rtol=1e-5)
    # evaluation: the last position's query against the exported item tower
    items = np.asarray(model.export_item_embeddings())
    assert items.shape == (7, 4) and np.all(items[0] == 0.0)
    scores = np.asarray(model.catalogue_scores(batch, 0.5))
    np.testing.assert_allclose(scores, q[[0, 1], [2, 1]] @ items.T / 0.5, rtol=1e-5, atol=1e-6)


def test_ivf_index_recall_against_exact_top_10():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 16))
    x = centres[rng.integers(0, 16, 2000)] + 0.3 * rng.normal(size=(2000, 16))
    items = np.vstack([np.zeros((1, 16)), x / np.linalg.norm(x, axis=1, keepdims=True)])
    queries = rng.normal(size=(100, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = exact_top_k(queries, items, 10)
    assert exact.min() >= 1  # padding is never returned
    index = IVFIndex(items, num_lists=16, seed=0)
    assert sorted(np.concatenate(index.lists).tolist()) == list(range(1, 2001))
    assert recall_at_k(index.search(queries, 10, num_probe=4), exact) > 0.9  # scores ~1/4 of the items
    assert recall_at_k(index.search(queries, 10, num_probe=16), exact) == 1.0  # every list: exact


# -------------------------------------------------------------------------------------- BERT4Rec


def test_bert4rec_encoder_is_bidirectional_and_ignores_padding():
    model = bert4rec()
    encode = nnx.jit(lambda m, items, lengths: m.encode(items, lengths))
    items, lengths = jnp.array([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0]], jnp.int32), jnp.array([4, 2], jnp.int32)
    out = np.asarray(encode(model, items, lengths))
    later = np.asarray(encode(model, items.at[0, 3].set(6), lengths))
    assert not np.allclose(later[0, 0], out[0, 0])  # position 0 sees position 3
    padded = np.asarray(encode(model, items.at[:, 4:].set(3).at[1, 2:4].set(7), lengths))
    np.testing.assert_allclose(padded, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[1, 2:], 0.0)
    assert model.item_emb[...].shape == (8, 8) and model.item_table().shape == (7, 8)  # V + 2 rows, V + 1 scored


def test_cloze_masks_rate_padding_and_at_least_one_per_row():
    spec = SequenceSpec(num_items=50, num_negatives=0)
    model = bert4rec(spec, max_len=20, mask_prob=0.3, max_predictions=20)
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 21, 500)
    items = np.where(np.arange(20)[None] < lengths[:, None], rng.integers(1, 51, (500, 20)), 0)
    cloze = nnx.jit(lambda m, items, lengths: m.cloze(items, lengths))
    inputs, slots, slot_valid = map(np.asarray, cloze(model, jnp.asarray(items, jnp.int32), jnp.asarray(lengths, jnp.int32)))
    masked = inputs == model.mask_id
    valid = np.arange(20)[None] < lengths[:, None]
    assert not np.any(masked & ~valid)  # never in padding
    np.testing.assert_array_equal(inputs[~masked], items[~masked])
    counts = masked.sum(1)
    assert np.all(counts[lengths > 0] >= 1) and np.all(counts[lengths == 0] == 0)
    # Bernoulli(p) per position plus one forced position in rows that drew none
    expected = (0.3 * lengths + (lengths > 0) * 0.7 ** lengths).sum() / lengths.sum()
    rate = masked.sum() / valid.sum()
    assert abs(rate - expected) < 0.02 and abs(rate - 0.3) < 0.03, (rate, expected)
    # the slots list exactly the masked positions
    assert slot_valid.sum() == masked.sum()
    np.testing.assert_array_equal(np.sort(slots[slot_valid]), np.flatnonzero(masked.reshape(-1)))
    # a fresh draw per call; a budget of one slot per row keeps one mask in each (non-empty) row
    again = np.asarray(cloze(model, jnp.asarray(items, jnp.int32), jnp.asarray(lengths, jnp.int32))[0])
    assert not np.array_equal(again, inputs)
    capped = bert4rec(spec, max_len=20, mask_prob=0.3, max_predictions=1)
    lengths = np.maximum(lengths, 1)
    inputs = np.asarray(cloze(capped, jnp.asarray(items, jnp.int32), jnp.asarray(lengths, jnp.int32))[0])
    np.testing.assert_array_equal((inputs == capped.mask_id).sum(1), 1)


def test_eval_appends_mask_after_the_history_unmasked_and_deterministic():
    model = bert4rec(max_len=4, dropout=0.3)
    items, lengths = jnp.array([[3, 4, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]], jnp.int32), jnp.array([2, 4, 0], jnp.int32)
    inputs, new_lengths, at = map(np.asarray, nnx.jit(lambda m, i, n: m.eval_inputs(i, n))(model, items, lengths))
    m = model.mask_id
    np.testing.assert_array_equal(inputs, [[3, 4, m, 0], [2, 3, 4, m], [m, 0, 0, 0]])  # full: oldest dropped
    np.testing.assert_array_equal(new_lengths, [3, 4, 1])
    np.testing.assert_array_equal(at, [2, 3, 0])
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    count = int(model.cloze_rngs.count[...])
    batch = {"items": items, "lengths": lengths}
    scores = nnx.jit(lambda m, b: m.catalogue_scores(b, 1.0))
    a, b = np.asarray(scores(view, batch)), np.asarray(scores(view, batch))
    assert a.shape == (3, 7) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert int(model.cloze_rngs.count[...]) == count  # no Cloze draw at evaluation


@pytest.mark.parametrize("family", ["two_tower", "bert4rec", "bert4rec_sampled"])
def test_gradients_are_finite_and_reach_every_parameter(family):
    if family == "two_tower":
        model, batch = two_tower(uniform_negatives=True), toy_batch()
    else:
        model = bert4rec(full_softmax=family == "bert4rec", mask_prob=0.5)
        items = jnp.array([[1, 2, 3, 4, 5, 6], [2, 4, 6, 0, 0, 0]], jnp.int32)
        batch = {"items": items, "lengths": jnp.array([6, 3], jnp.int32),
                 "negatives": jnp.array([[[1, 3, 5]], [[2, 2, 6]]], jnp.int32)}
    grads = nnx.jit(lambda m, b: nnx.grad(lambda m: m.training_loss(b, 0.5))(m))(model, batch)
    for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).sum() > 0, path


@pytest.mark.parametrize("family, overrides", [
    ("two_tower", {"size": "xs"}), ("two_tower", {"size": "s", "uniform_negatives": True}),
    ("bert4rec", {"size": "xs"}), ("bert4rec", {"size": "s", "full_softmax": False}),
])
def test_analytic_flops_match_xla(family, overrides):
    config = build(ModelConfig, {"name": family, **overrides})
    # negatives per position: scaling.flops' zero batch has [B, L, M] whatever shared_negatives says
    spec = SequenceSpec(num_items=500, num_negatives=32)
    xla = xla_flops_per_example(abstract_model(config, spec), spec, batch_size=16, max_len=config.max_len)
    assert abs(config.flops_per_example(spec) - xla) / xla < 0.10, (config.flops_per_example(spec), xla)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("model, lr", [
    ({"name": "two_tower", "size": "xs", "max_len": 32}, 3e-3),
    ({"name": "bert4rec", "size": "xs", "max_len": 32, "mask_prob": 0.3}, 1e-2),
])
def test_trains_through_the_loop_and_beats_popularity(tmp_path, model, lr):
    data = {
        "name": "tt_b4r_test",
        "data": {"name": "synthetic_sequences", "num_users": 300, "num_items": 120, "mean_length": 20.0,
                 "num_negatives": 16, "shared_negatives": True},
        "model": model,
        "optimizer": {"dense": {"name": "adamw", "learning_rate": lr, "b2": 0.98, "grad_clip_norm": 0.0},
                      "embedding": {"name": "dense"}, "schedule": {"name": "constant", "warmup_fraction": 0.0}},
        "train": {"steps": 120, "batch_size": 32, "eval_every": 60, "eval_batch_size": 128, "checkpoint_every": 0,
                  "log_every": 10, "output_dir": str(tmp_path / "runs")},
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    config = load_run_config(None, [], data=data)
    record = train(config)
    assert record.status == "ok", record.reason
    rows = [json.loads(line) for line in open(os.path.join(run_directory(config), "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.15, losses
    ref = record.data_reference
    assert record.best_eval["valid_ndcg@10"] > ref["valid_popularity_ndcg@10"], (record.best_eval, ref)
    assert record.best_eval["test_ndcg@10"] > ref["test_popularity_ndcg@10"], (record.best_eval, ref)
