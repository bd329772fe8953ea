"""The synthetic ranking view and the ranking families (OneTrans, DIN, HSTU-as-ranker), and CTR
families reading the history as pooled multi-hot fields."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig, load_run_config
from scaling.config_schema import ConfigError, build
from scaling.data.synthetic_ranking import EVAL_STREAM, SyntheticRankingConfig
from scaling.models.embedding import FieldEmbedding
from scaling.models.registry import build_model
from scaling.train.loop import train
from tests.conftest import ROOT

SMALL = dict(num_users=300, num_items=200, mean_length=30.0, max_length=120, seq_len=16, interest_window=16,
             eval_examples=512)
RANKERS = ("onetrans", "din", "hstu_ranker")


@pytest.fixture(scope="module")
def data():
    return SyntheticRankingConfig(**SMALL).build()


def _batch(data, n=8, stream=0):
    return {k: jnp.asarray(v) for k, v in data.examples(np.arange(n), stream=stream).items()}


def test_batches_are_pure_functions_of_their_index_and_match_the_spec(data):
    a, b = data.batch(3, 16), data.batch(3, 16)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    spec = data.spec
    S, L = spec.num_sequences, spec.seq_len
    assert a["sparse"].shape == (16, spec.num_sparse) and a["dense"].shape == (16, spec.num_dense)
    assert a["history"].shape == a["history_actions"].shape == a["history_times"].shape == (16, S, L)
    assert (a["sparse"] < np.asarray(spec.cardinalities)).all() and (a["sparse"][:, -1] >= 1).all()
    assert not np.array_equal(data.batch(4, 16)["sparse"], a["sparse"])


def test_sequences_are_right_aligned_split_by_action_and_before_the_request(data):
    ex = data.examples(np.arange(400))
    items, actions, times = ex["history"], ex["history_actions"], ex["history_times"]
    valid = items > 0
    # padding first: once a position is valid, every later one is
    assert (np.diff(valid.astype(int), axis=-1) >= 0).all()
    assert (np.where(valid[..., 1:] & valid[..., :-1], np.diff(times, axis=-1), 0) >= 0).all()
    assert (actions[:, 0][valid[:, 0]] == 0).all() and (actions[:, 1][valid[:, 1]] > 0).all()
    assert (times[valid] <= np.repeat(ex["request_time"][:, None, None], 2 * items.shape[-1]).reshape(times.shape)[valid]).all()
    assert valid.any(axis=(1, 2)).all()  # every request has history (position >= 1)


def test_the_teacher_reads_only_what_the_batch_holds(data):
    """The interest term recomputed from the batch's own sequences equals the teacher's: the click
    probability is a function of the features, so its logloss is the Bayes floor."""
    ex = data.examples(np.arange(64), with_prob=True)
    W = data.config.interest_window
    for b in range(64):
        valid = ex["history"][b] > 0
        items, acts, times = (ex[k][b][valid] for k in ("history", "history_actions", "history_times"))
        order = np.argsort(times, kind="stable")[-W:]  # the last W events of the merged timeline
        got = data.teacher.interest(ex["sparse"][b:b + 1, -1], items[order][None], acts[order][None],
                                    times[order][None].astype(np.int64), ex["request_time"][b:b + 1].astype(np.int64))
        # ties in time across the two sequences may pick a different last event; they are rare
        assert got[0] == pytest.approx(ex["interest"][b], rel=1e-5, abs=1e-6) or len(times) > W


def test_references_order_bayes_below_sequence_blind_below_constant(data):
    ref = data.reference_metrics()
    assert ref["bayes_logloss"] < ref["sequence_blind_logloss"] < ref["constant_logloss"]
    assert abs(ref["true_base_rate"] - data.config.base_rate) < 0.03


def test_held_out_requests_are_each_users_last_event(data):
    ev = data.examples(np.arange(200), stream=EVAL_STREAM)
    last_times = data.log.timestamps[data.log.offsets[1:] - 1]
    assert np.isin(ev["request_time"], last_times).all()


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="interest_window"):
        SyntheticRankingConfig(seq_len=8, interest_window=16).check()


def test_multi_hot_fields_are_mean_pooled_after_the_single_hot_ones():
    emb = FieldEmbedding((3, 4), 2, bags=(5,), rngs=nnx.Rngs(0))
    table = np.asarray(emb.table[...])
    sparse = jnp.array([[1, 2], [0, 3]])
    history = jnp.array([[[0, 1, 4]], [[0, 0, 0]]])
    out = np.asarray(emb(sparse, history))
    assert out.shape == (2, 3, 2)
    np.testing.assert_allclose(out[0, 0], table[1]) and np.testing.assert_allclose(out[0, 1], table[3 + 2])
    np.testing.assert_allclose(out[0, 2], (table[7 + 1] + table[7 + 4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1, 2], 0.0)  # an empty bag


@pytest.mark.parametrize("name", RANKERS + ("dlrm", "deepfm"))
def test_gradients_reach_every_parameter(data, name):
    config = build(ModelConfig, {"name": name, "size": "xs"})
    model = build_model(config, data.spec, rngs=nnx.Rngs(0))
    batch = _batch(data, 32)

    def loss(m):
        return jnp.mean(jax.nn.softplus(m(batch)) - batch["label"] * m(batch))

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        # padding rows of the item and action tables may stay untouched; every array gets a gradient
        assert np.abs(g).sum() > 0, path


@pytest.mark.parametrize("merge", ["time", "separators"])
def test_onetrans_kv_cache_scores_equal_full_recomputation(data, merge):
    """One request, many candidates: the S side once, each candidate's NS-tokens alone."""
    config = build(ModelConfig, {"name": "onetrans", "size": "m", "merge": merge})
    model = build_model(config, data.spec, rngs=nnx.Rngs(1))
    B, C = 3, 5
    requests = _batch(data, B)
    cand = data.examples(np.arange(100, 100 + B * C))
    candidates = {k: jnp.asarray(cand[k]).reshape(B, C, -1) for k in ("sparse", "dense")}
    cached = model.candidate_logits(model.sequence_cache(requests), candidates)
    full = model({
        **{k: jnp.repeat(requests[k], C, axis=0) for k in ("history", "history_actions", "history_times", "request_time")},
        "sparse": candidates["sparse"].reshape(B * C, -1), "dense": candidates["dense"].reshape(B * C, -1),
    }).reshape(B, C)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5)


def _swap_sequences(batch):
    return {k: (v[:, ::-1] if k.startswith("history") else v) for k, v in batch.items()}


def test_hstu_ranker_reads_one_time_ordered_stream(data):
    """HSTU merges the sequences by time: which sequence an event came in does not matter, its
    item, action and time do; the candidate matters."""
    model = build_model(build(ModelConfig, {"name": "hstu_ranker", "size": "xs"}), data.spec, rngs=nnx.Rngs(0))
    batch = _batch(data, 16)
    base = np.asarray(model(batch))
    np.testing.assert_allclose(np.asarray(model(_swap_sequences(batch))), base, rtol=1e-5, atol=1e-6)
    other = dict(batch, sparse=batch["sparse"].at[:, -1].set((batch["sparse"][:, -1] % 200) + 1))
    assert np.abs(np.asarray(model(other)) - base).max() > 1e-4


def test_history_padding_does_not_change_a_score(data):
    """Re-padding a history (fewer kept events, the rest padding) equals reading only those events."""
    batch = _batch(data, 16)
    short = {k: (jnp.where(jnp.arange(v.shape[-1]) < v.shape[-1] - 6, 0, v) if k.startswith("history") else v)
             for k, v in batch.items()}
    for name in ("onetrans", "din"):  # (HSTU's relative-position table is sized by the length it is built for)
        config = build(ModelConfig, {"name": name, "size": "xs", "seq_len": 6})
        cut = build(ModelConfig, {"name": name, "size": "xs"})
        a = build_model(config, data.spec, rngs=nnx.Rngs(0))
        b = build_model(cut, data.spec, rngs=nnx.Rngs(0))
        nnx.update(b, nnx.state(a))
        np.testing.assert_allclose(np.asarray(a(batch)), np.asarray(b(short)), rtol=1e-4, atol=1e-5, err_msg=name)


def test_ranking_models_need_ranking_data():
    with pytest.raises(ConfigError, match="model.name"):
        load_run_config(os.path.join(ROOT, "sweeps", "quickstart.yaml"), ["model.name=onetrans", "model.size=xs"])


@pytest.mark.parametrize("name", ["onetrans", "dlrm"])
def test_trains_through_the_loop(tmp_path, name):
    overrides = [f"model.name={name}", "model.size=xs", "train.steps=80", "train.batch_size=128",
                 "train.checkpoint_every=0", "logging.progress=false", "logging.wandb.mode=disabled",
                 f"train.output_dir={tmp_path}"] + [f"data.{k}={v}" for k, v in SMALL.items()]
    record = train(load_run_config(os.path.join(ROOT, "sweeps", "onetrans_synthetic.yaml"), overrides))
    assert record.status == "ok", record.reason
    assert record.final_eval["ne"] < 1.0  # better than predicting the base rate
    assert record.data_reference["bayes_logloss"] < record.final_eval["logloss"]
