"""SASRec: the next-item contract (causal, padding-blind, normalised), FLOPs vs XLA, the size ladder,
config errors, and a short overfitting run under the sampled softmax."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scaling.config import ModelConfig
from scaling.config_schema import ConfigError, build
from scaling.data.spec import SequenceSpec
from scaling.flops import flops_from_cost, sequence_training_forward
from scaling.models.embedding import EmbeddingTable
from scaling.models.registry import build_model, model_config_classes
from scaling.models.sasrec import SASRec, SASRecConfig
from scaling.sharding.annotate import LOGICAL_AXES, logical_axes
from scaling.train.sampled_softmax import sampled_softmax_loss

SPEC = SequenceSpec(num_items=20, num_negatives=5)
# The transformer tests' shapes (D 8, 2 heads, FFN 16), so a shared session compiles less.
TINY = {"name": "sasrec", "embed_dim": 8, "num_blocks": 2, "num_heads": 2, "ffn_dim": 16, "max_len": 6, "dropout": 0.0}


def tiny_config(**overrides) -> SASRecConfig:
    return build(ModelConfig, {**TINY, **overrides})


def counts(model: nnx.Module) -> tuple[int, int]:
    """(dense, embedding) parameter counts."""
    size = lambda state: int(sum(x.size for x in jax.tree.leaves(state)))
    embedding = size(nnx.state(model, EmbeddingTable))
    return size(nnx.state(model, nnx.Param)) - embedding, embedding


def batch_of(items, lengths, timestamps=None) -> dict:
    items = jnp.asarray(items, jnp.int32)
    ts = jnp.zeros_like(items) if timestamps is None else jnp.asarray(timestamps, jnp.int32)
    return {"items": items, "timestamps": ts, "next_timestamps": ts + 1, "lengths": jnp.asarray(lengths, jnp.int32)}


def test_registered_and_built_from_config():
    assert model_config_classes()["sasrec"] is SASRecConfig
    model = build_model(tiny_config(), SPEC, rngs=nnx.Rngs(0))
    assert isinstance(model, SASRec) and model.TASK == "next_item"
    assert isinstance(model.item_emb, EmbeddingTable) and model.item_emb[...].shape == (21, 8)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path
        assert all(a in LOGICAL_AXES for a in axes if a is not None), (path, axes)


def test_forward_contract_causal_padding_normalised_and_dropout():
    # an RBG dropout key: threefry's bit generator takes seconds to compile on a CPU
    rngs = nnx.Rngs(params=0, dropout=jax.random.key(0, impl="rbg"))
    model = SASRec(tiny_config(dropout=0.3, block_norm="pre"), SPEC, rngs=rngs)
    model.eval()
    forward = nnx.jit(lambda m, b: m(b))
    items = np.array([[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 0, 0], [0, 0, 0, 0, 0, 0]])
    lengths = [6, 4, 0]
    out = np.asarray(forward(model, batch_of(items, lengths)))
    assert out.shape == (3, 6, 8) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out[0], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[1, :4], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out[1, 4:], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)  # an empty history: finite zeros
    # causal: changing the last item leaves earlier queries alone
    later = items.copy()
    later[0, 5] = 17
    out_later = np.asarray(forward(model, batch_of(later, lengths)))
    np.testing.assert_allclose(out_later[0, :5], out[0, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out_later[0, 5], out[0, 5])
    # padding content and timestamps change nothing
    padded = items.copy()
    padded[1, 4:] = 19
    out_pad = np.asarray(forward(model, batch_of(padded, lengths, timestamps=np.arange(18).reshape(3, 6) * 1000)))
    np.testing.assert_allclose(out_pad[:, :4], out[:, :4], rtol=1e-6, atol=1e-6)
    # a shorter padded length (N < max_len) gives the same queries
    short = np.asarray(forward(model, batch_of(items[1:2, :4], [4])))
    np.testing.assert_allclose(short[0], out[1, :4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        model(batch_of(np.ones((1, 7)), [7]))
    # training mode: dropout draws fresh masks each call; padding stays zero
    model.train()
    a, b = np.asarray(forward(model, batch_of(items, lengths))), np.asarray(forward(model, batch_of(items, lengths)))
    assert not np.allclose(a[0], b[0]) and not np.allclose(a[0], out[0])
    np.testing.assert_array_equal(a[1, 4:], 0.0)
    np.testing.assert_array_equal(a[2], 0.0)


def test_item_table_and_embeddings():
    model = SASRec(tiny_config(), SPEC, rngs=nnx.Rngs(0))
    table = np.asarray(model.item_table())
    assert table.shape == (21, 8)
    np.testing.assert_array_equal(table[0], 0.0)  # padding row
    np.testing.assert_allclose(np.linalg.norm(table[1:], axis=-1), 1.0, rtol=1e-5)
    ids = jnp.array([[0, 3], [20, 7]])
    np.testing.assert_allclose(model.item_embeddings(ids), table[np.asarray(ids)], rtol=1e-6)
    raw = SASRec(tiny_config(l2_normalize=False), SPEC, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(raw.item_table(), raw.item_emb[...])
    out = nnx.jit(lambda m, b: m(b))(raw, batch_of([[1, 2, 3, 0, 0, 0]], [3]))
    assert not np.allclose(np.linalg.norm(out[0, :3], axis=-1), 1.0)  # not normalised


def test_overfits_a_tiny_batch_and_gradients_reach_every_parameter():
    spec = SequenceSpec(num_items=20, num_negatives=8)  # SPEC's table: no new init compiles
    model = SASRec(tiny_config(num_blocks=1), spec, rngs=nnx.Rngs(0))  # one block: half the compile time
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 21, size=(4, 7))
    lengths = jnp.array([6, 6, 5, 3])
    items = np.where(np.arange(6)[None] < np.asarray(lengths)[:, None], seqs[:, :6], 0)
    batch = batch_of(items, lengths)
    targets = jnp.asarray(np.where(items > 0, seqs[:, 1:], 0), jnp.int32)
    negatives = jnp.asarray(rng.integers(1, 21, size=(4, 6, 8)), jnp.int32)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return sampled_softmax_loss(model(batch), model.item_table(), targets, negatives, lengths)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    loss, grads = step(model, optimizer)
    for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).sum() > 0, path
    # the padding row of the item table gets no gradient (inputs zeroed, never a target)
    np.testing.assert_array_equal(np.asarray(grads.item_emb[...])[0], 0.0)
    losses = [float(loss)] + [float(step(model, optimizer)[0]) for _ in range(39)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.25 * losses[0], losses


def _xla_flops(config: SASRecConfig, spec: SequenceSpec, batch_size: int = 2) -> tuple[float, float]:
    """XLA's FLOPs per example of (encoder, encoder + scoring of 1 + M items per position),
    compiled on abstract shapes (nothing allocated)."""
    model = nnx.eval_shape(lambda: build_model(config, spec, rngs=nnx.Rngs(0)))
    model.eval()  # dropout off: the forward FLOPs are those of inference
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    shape = (batch_size, config.max_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("items", "timestamps", "next_timestamps")}
    batch["lengths"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    targets = jax.ShapeDtypeStruct(shape, jnp.int32)
    negatives = jax.ShapeDtypeStruct((*shape, spec.num_negatives), jnp.int32)

    def encode(state, batch):
        return nnx.merge(graphdef, state)(batch)

    def encode_and_score(state, batch, targets, negatives):  # as sampled_softmax_loss scores them
        return sequence_training_forward(nnx.merge(graphdef, state), {**batch, "targets": targets, "negatives": negatives})

    enc = jax.jit(encode).lower(state, batch).compile()
    full = jax.jit(encode_and_score).lower(state, batch, targets, negatives).compile()
    return (flops_from_cost(enc.cost_analysis()) / batch_size,
            flops_from_cost(full.cost_analysis()) / batch_size)


@pytest.mark.parametrize("size", ["s", "ml1m"])  # pre-LN ladder step; the reference-code block
def test_analytic_flops_match_xla(size):
    config = build(ModelConfig, {"name": "sasrec", "size": size})
    spec = SequenceSpec(num_items=100, num_negatives=128)
    xla_encoder, xla_example = _xla_flops(config, spec)
    encoder, example = config.encoder_flops(config.max_len), config.flops_per_example(spec)
    assert abs(encoder - xla_encoder) / xla_encoder < 0.10, (encoder, xla_encoder)
    assert abs(example - xla_example) / xla_example < 0.10, (example, xla_example)
    # scoring is 2 D per scored item: (1 + 128) per position
    assert example - encoder == 2 * config.max_len * 129 * config.embed_dim


def test_size_ladder_is_monotone_and_spans_orders_of_magnitude():
    spec = SequenceSpec(num_items=1000, num_negatives=128)
    ladder = [s for s in SASRecConfig.SIZES if s not in ("ml1m", "beauty")]
    assert ladder == ["xs", "s", "m", "l", "xl"]
    flops, dense = [], []
    for size in ladder:
        config = build(ModelConfig, {"name": "sasrec", "size": size})
        assert config.embed_dim % config.num_heads == 0
        flops.append(config.flops_per_example(spec))
        dense.append(counts(nnx.eval_shape(lambda config=config: build_model(config, spec, rngs=nnx.Rngs(0))))[0])
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(a < b for a, b in zip(dense, dense[1:])), dense
    assert flops[-1] / flops[0] >= 30


def test_ml1m_preset_is_the_published_model():
    config = build(ModelConfig, {"name": "sasrec", "size": "ml1m"})
    assert (config.num_blocks, config.num_heads, config.embed_dim, config.ffn_dim, config.max_len) == (2, 1, 50, 50, 200)
    assert config.dropout == 0.2 and config.activation == "relu" and config.l2_normalize
    assert dataclasses.replace(config, size="custom") == build(ModelConfig, {"name": "sasrec"})  # the defaults
    spec = SequenceSpec(num_items=3952, num_negatives=128)
    dense, embedding = counts(nnx.eval_shape(lambda: build_model(config, spec, rngs=nnx.Rngs(0))))
    # positions 200 x 50; per block: attention 4 x 50 x 50 + 4 x 50 biases, FFN 2 x 50 x 50 + 100, 2 LayerNorms;
    # final LayerNorm
    assert dense == 200 * 50 + 2 * ((4 * 2500 + 200) + (5000 + 100) + 200) + 100 == 41_100
    assert embedding == 3953 * 50


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"embed_dim": 50, "num_heads": 3}, "num_heads"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "swish"}, "activation"),
        ({"block_norm": "sandwich"}, "block_norm"),
        ({"size": "xxxl"}, "size"),
        ({"num_head": 2}, "num_head"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        build(ModelConfig, {**TINY, **overrides}, "model")
    assert err.value.path == f"model.{key}"
