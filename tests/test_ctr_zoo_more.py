"""The rest of the CTR zoo against its math: logistic regression, FM, Wide & Deep, FinalMLP and
serial MaskNet. Each forward pass is recomputed in numpy from the model's own parameters (embedding
rows gathered and bags mean-pooled by hand, on a spec with a multi-hot field), then: gradients
reach every parameter, config errors name their key, and a short run through the training loop
beats the base rate."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig
from scaling.config_schema import ConfigError, build
from scaling.data.spec import CTRFeatureSpec
from scaling.models.registry import build_model
from tests.conftest import random_ctr_batch
from tests.test_ctr_zoo import relu_mlp, train_briefly

# 3 single-hot fields, one multi-hot field (bags of up to 4 ids, 0 = padding), 2 dense features:
# N = 3 + 1 + 2 = 6 field vectors for the models that treat dense features as fields.
SPEC = CTRFeatureSpec(cardinalities=(5, 7, 3), num_dense=2, bag_cardinalities=(6,), bag_length=4)
N = 6


def batch_with_history(size: int = 4, seed: int = 0) -> dict:
    batch = random_ctr_batch(SPEC, size, seed)
    history = np.random.default_rng(seed + 1).integers(0, 6, (size, 1, 4))
    history[0] = 0  # an empty bag pools to 0
    history[1, 0] = (0, 4, 0, 0)  # a bag of one id: its row, padding skipped
    return {**batch, "history": jnp.asarray(history, jnp.int32)}


def build_ctr(values: dict, seed: int = 0):
    return build_model(build(ModelConfig, values), SPEC, rngs=nnx.Rngs(seed))


def randomize(module: nnx.Module, seed: int = 1) -> None:
    """Every parameter redrawn N(0, 0.5^2): zero-initialized tables, LayerNorm's ones and zeros and
    zero biases would hide a parameter that the forward pass forgot."""
    rng = np.random.default_rng(seed)
    for _, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param):
            param[...] = jnp.asarray(0.5 * rng.normal(size=param[...].shape), jnp.float32)


# --- numpy references, from the parameters alone --------------------------------------------------

def np_embed(embedding, batch) -> np.ndarray:
    """FieldEmbedding: row blocks in field order (single-hot, then bags); bags mean-pooled over ids > 0."""
    table = np.asarray(embedding.table[...])
    starts = np.concatenate([[0], np.cumsum(SPEC.cardinalities + SPEC.bag_cardinalities)[:-1]])
    out = table[np.asarray(batch["sparse"]) + starts[:3]]
    history = np.asarray(batch["history"])
    rows = table[history + starts[3:, None]]                                # [B, S, L, d]
    valid = (history > 0)[..., None]
    pooled = (rows * valid).sum(2) / np.maximum(valid.sum(2), 1)
    return np.concatenate([out, pooled], axis=1)


def np_field_vectors(fields, batch) -> np.ndarray:
    """FieldVectors: the embeddings, then x_j u_j per dense feature -> [B, N, d]."""
    dense = np.asarray(batch["dense"])
    return np.concatenate([np_embed(fields.embedding, batch), dense[:, :, None] * np.asarray(fields.dense_fields.vectors[...])], 1)


def np_first_order(linear, batch) -> np.ndarray:
    return (np_embed(linear.weights, batch)[..., 0].sum(1) + np.asarray(batch["dense"]) @ np.asarray(linear.dense[...])
            + np.asarray(linear.bias[...]))


def np_layer_norm(norm, x) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + norm.eps) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def np_linear(linear, x) -> np.ndarray:
    y = x @ np.asarray(linear.kernel[...])
    return y + np.asarray(linear.bias[...]) if linear.bias is not None else y


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- forward passes --------------------------------------------------------------------------------

def test_lr_is_the_first_order_term():
    model = build_ctr({"name": "lr", "size": "base"})
    randomize(model)
    batch = batch_with_history()
    np.testing.assert_allclose(model(batch), np_first_order(model.linear, batch), rtol=1e-5, atol=1e-5)


def test_fm_is_first_order_plus_every_pair_of_field_vectors():
    model = build_ctr({"name": "fm", "size": "d4"})
    randomize(model)
    batch = batch_with_history()
    e = np_field_vectors(model.terms.fields, batch)
    assert e.shape == (4, N, 4)
    pairs = [sum(e[b, i] @ e[b, j] for i, j in itertools.combinations(range(N), 2)) for b in range(4)]
    np.testing.assert_allclose(model(batch), np_first_order(model.terms.linear, batch) + pairs, rtol=1e-4, atol=1e-4)


def test_wide_and_deep_adds_the_linear_logit_to_a_dnn_over_embeddings_and_raw_dense():
    model = build_ctr({"name": "wide_deep", "embed_dim": 3, "dnn": [8, 5]})
    randomize(model)
    batch = batch_with_history()
    x = np.concatenate([np_embed(model.embedding, batch).reshape(4, -1), np.asarray(batch["dense"])], 1)
    assert x.shape == (4, 4 * 3 + 2)
    expected = np_first_order(model.wide, batch) + relu_mlp(model.dnn, x)[:, 0]
    np.testing.assert_allclose(model(batch), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context1, context2", [((0,), (1,)), ((3, 5), ()), ((), (4,))])
def test_finalmlp_gates_two_streams_and_fuses_them_bilinearly(context1, context2):
    """contexts: single fields, a bag and a dense field together, and the learned context vector."""
    model = build_ctr({"name": "finalmlp", "embed_dim": 3, "mlp1": [8, 6], "mlp2": [4], "gate_hidden": [5],
                       "num_heads": 2, "context1": list(context1), "context2": list(context2)})
    randomize(model)
    batch = batch_with_history()
    e = np_field_vectors(model.fields, batch)
    flat = e.reshape(4, -1)
    streams = []
    for gate, mlp, context in ((model.gate1, model.mlp1, context1), (model.gate2, model.mlp2, context2)):
        c = e[:, list(context)].reshape(4, -1) if context else np.asarray(gate.learned[...])[None]
        g = 2.0 * sigmoid(relu_mlp(gate.mlp, c))                          # [B or 1, N d]
        streams.append(np.maximum(relu_mlp(mlp, g * flat), 0.0))
    o1, o2 = streams                                                      # [B, 6], [B, 4]
    w = np.asarray(model.fusion.w12[...])                                 # [2 heads, 3, 2]
    bilinear = sum(o1[:, 3 * k:3 * (k + 1)] @ w[k] * o2[:, 2 * k:2 * (k + 1)] for k in range(2)).sum(1)
    expected = np_linear(model.fusion.w1, o1)[:, 0] + np_linear(model.fusion.w2, o2)[:, 0] + bilinear
    np.testing.assert_allclose(model(batch), expected, rtol=1e-4, atol=1e-4)


def test_serial_masknet_blocks_mask_the_previous_output_with_masks_of_the_raw_embeddings():
    model = build_ctr({"name": "masknet", "embed_dim": 3, "blocks": [7, 5], "reduction_ratio": 0.5})
    randomize(model)
    batch = batch_with_history()
    e = np_field_vectors(model.fields, batch)
    v_emb = e.reshape(4, -1)
    assert np.asarray(model.field_norm.scale[...]).shape == (N, 3)   # each field its own scale
    v = np_layer_norm(model.field_norm, e).reshape(4, -1)
    widths = [N * 3, 7]
    for block, width in zip(model.blocks, widths):
        assert block.mask.hidden == (int(width * 0.5),)                # the aggregation layer
        mask = relu_mlp(block.mask, v_emb)                              # [B, width]
        v = np.maximum(np_layer_norm(block.norm, (mask * v) @ np.asarray(block.hidden.kernel[...])), 0.0)
    np.testing.assert_allclose(model(batch), np_linear(model.head, v)[:, 0], rtol=1e-4, atol=1e-4)


# --- gradients, configs, the loop -----------------------------------------------------------------

@pytest.mark.parametrize("values", [
    {"name": "lr", "size": "base"}, {"name": "fm", "size": "d4"}, {"name": "wide_deep", "size": "xs"},
    {"name": "finalmlp", "size": "xs"}, {"name": "finalmlp", "size": "xs", "context1": [], "context2": []},
    {"name": "masknet", "size": "xs"},
], ids=lambda v: "-".join(str(x) for x in v.values()))
def test_gradients_reach_every_parameter(values):
    model = build_ctr(values)
    batch = batch_with_history(16)

    def loss(m):
        logits = m(batch)
        return jnp.mean(jax.nn.softplus(logits) - batch["label"] * logits)

    grads = nnx.grad(loss)(model)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert leaves
    for path, g in leaves:
        assert np.all(np.isfinite(g)), path
        # tables included: a batch of 16 touches every table (only untouched rows get 0)
        assert float(jnp.abs(g).max()) > 0, path


@pytest.mark.parametrize("values, key", [
    ({"name": "finalmlp", "mlp1": [64], "mlp2": [48], "num_heads": 5}, "num_heads"),
    ({"name": "finalmlp", "mlp2": []}, "mlp2"),
    ({"name": "finalmlp", "context2": [-1]}, "context2[0]"),
    ({"name": "finalmlp", "gate_hidden": [0]}, "gate_hidden[0]"),
    ({"name": "masknet", "blocks": []}, "blocks"),
    ({"name": "masknet", "reduction_ratio": 0.0}, "reduction_ratio"),
    ({"name": "wide_deep", "dnn": [16, 0]}, "dnn[1]"),
    ({"name": "fm", "embed_dim": 0}, "embed_dim"),
])
def test_bad_configs_name_the_key(values, key):
    with pytest.raises(ConfigError) as error:
        build(ModelConfig, values)
    assert key in str(error.value)


def test_finalmlp_context_outside_the_data_is_an_error_at_build():
    with pytest.raises(ConfigError, match="context1"):
        build_ctr({"name": "finalmlp", "size": "xs", "context1": [N]})


def test_lr_has_one_weight_per_id():
    config = build(ModelConfig, {"name": "lr"})
    assert config.embedding_bytes_per_example(SPEC) == (3 + 4) * 1 * 4   # 3 ids and 4 bag ids, float32


@pytest.mark.parametrize("name, size", [("lr", "base"), ("fm", "d8"), ("wide_deep", "xs"), ("finalmlp", "xs"),
                                        ("masknet", "xs")])
def test_trains_through_the_loop(tmp_path, name, size):
    record = train_briefly(tmp_path, name, size)
    assert record.status == "ok", record.reason
    assert record.final_eval["ne"] < 1.0  # better than predicting the base rate
