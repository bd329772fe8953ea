"""NeuMF and LightGCN: forward against numpy re-implementations, the catalogue scorer against the
pairwise forward, one LightGCN propagation against the dense D^-1/2 A D^-1/2, FLOPs against XLA,
and a short training run of each through the real loop."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig, load_run_config
from scaling.config_schema import ConfigError, build
from scaling.data.spec import SequenceSpec, TrainingEvents
from scaling.flops import abstract_model, xla_flops_per_example
from scaling.models.registry import build_model
from scaling.train.loop import run_directory, train
from scaling.train.pairwise_losses import bce_loss
from scaling.train.step import split_model

# 3 users x 3 items (ids 1..3; item 0 is padding, no edges); (0, 1) appears twice: counts are ignored
EVENTS = TrainingEvents(users=np.array([0, 0, 0, 1, 1, 2], np.int32), items=np.array([1, 1, 2, 2, 3, 1], np.int32),
                        counts=np.array([1, 1, 1, 2, 1, 1], np.int32))
GRAPH_SPEC = SequenceSpec(num_items=3, num_negatives=2, num_users=3, training_events=EVENTS)


def _model(name: str, spec: SequenceSpec, **knobs):
    return build_model(build(ModelConfig, {"name": name, **knobs}), spec, rngs=nnx.Rngs(0))


def _jit(m, fn):
    """batch -> fn(m, batch), compiled once (eager calls would compile a kernel per op)."""
    graphdef, state = nnx.split(m)
    compiled = jax.jit(lambda s, batch: fn(nnx.merge(graphdef, s), batch))
    return lambda batch: compiled(state, batch)


def _batch(spec: SequenceSpec, b: int, l: int, seed: int = 0, shared: bool = False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, l + 1, b)
    targets = rng.integers(1, spec.num_items + 1, (b, l)) * (np.arange(l)[None] < lengths[:, None])
    negatives = rng.integers(1, spec.num_items + 1, (b, 1 if shared else l, spec.num_negatives))
    out = dict(users=rng.integers(0, spec.num_users, b), items=targets, targets=targets, lengths=lengths,
               negatives=negatives)
    return {k: jnp.asarray(v, jnp.int32) for k, v in out.items()}


# -- NeuMF -------------------------------------------------------------------------------------------

def _numpy_neumf(m, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """logit [B, N] = h_G . (p^G ⊙ q^G) + MLP([p^M ; q^M]), from the model's parameters."""
    P = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    gmf = (P(m.user_gmf)[users][:, None] * P(m.item_gmf)[items]) @ P(m.gmf_head.kernel)[:, 0]
    pm = np.broadcast_to(P(m.user_mlp)[users][:, None], (*items.shape, m.config.mlp_embed_dim))
    x = np.concatenate([pm, P(m.item_mlp)[items]], -1)
    for layer in m.tower.layers:
        x = np.maximum(x @ P(layer.kernel) + P(layer.bias), 0.0)
    return gmf + (x @ P(m.tower.out.kernel) + P(m.tower.out.bias))[..., 0]


@pytest.mark.parametrize("layers", [(4, 3, 2), (6,)])
def test_neumf_forward_and_catalogue_match_numpy(layers):
    spec = SequenceSpec(num_items=5, num_negatives=2, num_users=3)
    m = _model("neumf", spec, embed_dim=3, mlp_layers=list(layers), max_len=4, init_scale=0.5)
    batch = _batch(spec, 3, 4)
    cand = np.concatenate([np.asarray(batch["targets"])[..., None], np.asarray(batch["negatives"])], -1)
    want = _numpy_neumf(m, np.asarray(batch["users"]), cand.reshape(3, -1)).reshape(cand.shape)
    shared = dict(batch, negatives=batch["negatives"][:, :1])
    users = jnp.arange(3, dtype=jnp.int32)
    forward, loss, shared_forward, catalogue = _jit(m, lambda m, b: (
        m.training_forward(b), m.training_loss(b, 1.0), m.training_forward(shared), m.catalogue_scores({"users": users}, 1.0)))(batch)
    np.testing.assert_allclose(forward, want, rtol=1e-5, atol=1e-6)
    # shared negatives [B, 1, M] score like the same draw repeated at every position
    np.testing.assert_allclose(shared_forward[..., 1:], np.broadcast_to(want[:, :1, 1:], want[..., 1:].shape),
                               rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(bce_loss(jnp.asarray(want, jnp.float32), batch["targets"],
                                                       batch["negatives"], batch["lengths"])), rel=1e-5)
    # the split-first-layer catalogue scorer equals the pairwise forward at every (user, item)
    every = _numpy_neumf(m, np.arange(3), np.broadcast_to(np.arange(6), (3, 6)))
    np.testing.assert_allclose(catalogue, every, rtol=1e-5, atol=1e-6)


def test_neumf_config_checks():
    with pytest.raises(ConfigError, match="mlp_layers"):
        build(ModelConfig, {"name": "neumf", "mlp_layers": [7, 4]})
    cfg = build(ModelConfig, {"name": "neumf", "size": "d32"})
    assert (cfg.embed_dim, cfg.mlp_layers, cfg.mlp_embed_dim) == (32, (128, 64, 32), 64)


# -- LightGCN ----------------------------------------------------------------------------------------

def _dense_norm_adjacency() -> np.ndarray:
    """Â [U + V + 1, U + V + 1] over nodes (users 0..2, items 0..3), built densely for the test only."""
    a = np.zeros((7, 7))
    for u, i in zip(EVENTS.users, EVENTS.items):
        a[u, 3 + i] = a[3 + i, u] = 1.0
    d = a.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-12)), 0.0)
    return inv[:, None] * a * inv[None, :]


def test_lightgcn_propagation_matches_dense_normalised_adjacency():
    m = _model("lightgcn", GRAPH_SPEC, embed_dim=4, num_layers=2, max_len=3)
    # the graph is a static constant: only the two embedding tables are state
    assert set(nnx.to_pure_dict(nnx.state(m))) == {"user_emb", "item_emb"}
    split_model(m)
    e0 = np.concatenate([np.asarray(m.user_emb[...]), np.asarray(m.item_emb[...])]).astype(np.float64)
    a_hat = _dense_norm_adjacency()
    assert m.graph.num_edges == 5  # distinct pairs
    batch = {"users": jnp.arange(3, dtype=jnp.int32)}
    (u1, i1), (users, items), scores = _jit(m, lambda m, b: (
        m.graph.propagate(m.user_emb[...], m.item_emb[...]), m.propagate(), m.catalogue_scores(b, 1.0)))(batch)
    np.testing.assert_allclose(np.concatenate([u1, i1]), a_hat @ e0, rtol=1e-5, atol=1e-7)
    mean = (e0 + a_hat @ e0 + a_hat @ a_hat @ e0) / 3
    np.testing.assert_allclose(np.concatenate([users, items]), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores, mean[:3] @ mean[3:].T, rtol=1e-5, atol=1e-7)


def test_lightgcn_gradients_reach_the_embeddings():
    m = _model("lightgcn", GRAPH_SPEC, embed_dim=4, num_layers=2, max_len=3)
    batch = dict(_batch(GRAPH_SPEC, 4, 3, seed=1), users=jnp.zeros(4, jnp.int32))  # user 0 only
    graphdef, state = nnx.split(m)
    grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s).training_loss(batch, 1.0)))(state)
    for name in ("user_emb", "item_emb"):
        g = np.asarray(grads[name][...])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    # users 1 and 2 are not in the batch: their gradient comes through two hops of propagation
    assert np.all(np.abs(np.asarray(grads["user_emb"][...])).sum(1) > 0)


def test_lightgcn_builds_without_a_graph():
    m = _model("lightgcn", SequenceSpec(num_items=6, num_negatives=2), embed_dim=4)
    assert m.graph.num_edges == 0 and m.user_emb[...].shape == (1, 4)
    scores = _jit(m, lambda m, b: m.catalogue_scores(b, 1.0))({"users": jnp.zeros(2, jnp.int32)})
    assert scores.shape == (2, 7) and np.all(np.isfinite(scores))


# -- FLOPs -------------------------------------------------------------------------------------------

def _flop_spec() -> SequenceSpec:
    rng = np.random.default_rng(0)
    events = TrainingEvents(users=rng.integers(0, 20, 80).astype(np.int32),
                            items=rng.integers(1, 31, 80).astype(np.int32), counts=np.ones(80, np.int32))
    return SequenceSpec(num_items=30, num_negatives=4, num_users=20, training_events=events)


@pytest.mark.parametrize("name, size", [("neumf", "d8"), ("neumf", "d64"), ("lightgcn", "d16_k2"),
                                        ("lightgcn", "d64_k3")])
def test_analytic_flops_match_xla(name, size):
    spec = _flop_spec()
    extra = {"flops_batch_size": 8} if name == "lightgcn" else {}
    config = build(ModelConfig, {"name": name, "size": size, "max_len": 8, **extra})
    analytic = config.flops_per_example(spec)
    xla = xla_flops_per_example(abstract_model(config, spec), spec, batch_size=8, max_len=8)
    assert abs(analytic - xla) / xla < 0.10, (name, size, analytic, xla)
    if name == "lightgcn":  # the propagation is a real share of this tiny case, so the check covers it
        assert config.propagation_flops(spec) / 8 > 0.3 * config.scoring_flops(spec)


# -- training through the loop -----------------------------------------------------------------------

def _run(tmp_path, model: dict, negatives: int, lr: float):
    data = {
        "name": "gnn_test",
        "data": {"name": "synthetic_sequences", "num_users": 300, "num_items": 120, "mean_length": 20.0,
                 "num_negatives": negatives},
        "model": model,
        "optimizer": {"dense": {"name": "adam", "learning_rate": lr}, "embedding": {"name": "dense"},
                      "schedule": {"name": "constant", "warmup_fraction": 0.0}},
        "train": {"steps": 60, "batch_size": 32, "eval_every": 30, "eval_batch_size": 128, "checkpoint_every": 60,
                  "log_every": 10, "output_dir": str(tmp_path / "runs")},
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    config = load_run_config(None, [], data=data)
    record = train(config)
    assert record.status == "ok", record.reason
    rows = [json.loads(line) for line in open(os.path.join(run_directory(config), "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if r["split"] == "train"]
    return record, losses


@pytest.mark.parametrize("model, negatives, lr", [
    ({"name": "neumf", "size": "d16", "max_len": 32}, 4, 1e-2),
    ({"name": "lightgcn", "embed_dim": 32, "num_layers": 2, "max_len": 32, "flops_batch_size": 32}, 1, 1e-2),
])
def test_trains_through_the_loop(tmp_path, model, negatives, lr):
    record, losses = _run(tmp_path, model, negatives, lr)
    assert losses[-1] < 0.8 * losses[0], losses
    ref = record.data_reference
    assert record.best_eval["ndcg@10"] > ref["test_popularity_ndcg@10"], (record.best_eval, ref)
