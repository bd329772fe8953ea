"""The CTR zoo against its math: the FM identity, dense fields, the first-order term, DCNv2's cross
layers (full and low rank), AutoInt's field attention, xDeepFM's CIN, the four models' forward
passes, gradients, config errors, and a short run through the training loop."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig, load_run_config
from scaling.config_schema import ConfigError, build
from scaling.data.spec import CTRFeatureSpec
from scaling.models.feature_interactions import CrossNetwork, DenseFields, FirstOrder, fm_pairwise
from scaling.models.registry import build_model
from scaling.train.loop import train
from tests.conftest import ROOT, random_ctr_batch

SPEC = CTRFeatureSpec(cardinalities=(5, 7, 3), num_dense=2)


def test_fm_identity_equals_the_explicit_pairwise_sum():
    e = np.random.default_rng(0).normal(size=(3, 6, 4))
    explicit = [sum(e[b, i] @ e[b, j] for i, j in itertools.combinations(range(6), 2)) for b in range(3)]
    np.testing.assert_allclose(fm_pairwise(jnp.asarray(e)), explicit, rtol=1e-5)


def test_first_order_and_dense_fields():
    batch = random_ctr_batch(SPEC, 4)
    lr = FirstOrder(SPEC, rngs=nnx.Rngs(0))
    lr.weights.table[...] = jnp.arange(15, dtype=jnp.float32)[:, None]   # w[row] = row
    lr.dense[...] = jnp.array([2.0, -1.0])
    lr.bias[...] = jnp.array(0.5)
    sparse, dense = np.asarray(batch["sparse"]), np.asarray(batch["dense"])
    rows = sparse + np.array([0, 5, 12])
    np.testing.assert_allclose(lr(batch["sparse"], batch["dense"]), rows.sum(1) + dense @ [2.0, -1.0] + 0.5, rtol=1e-5)
    fields = DenseFields(2, 3, rngs=nnx.Rngs(0))
    u = np.asarray(fields.vectors[...])
    np.testing.assert_allclose(fields(batch["dense"]), dense[:, :, None] * u[None], rtol=1e-6)


@pytest.mark.parametrize("rank", [0, 2])
def test_cross_network_layer_by_layer(rank):
    x0 = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    net = CrossNetwork(5, 2, rank, rngs=nnx.Rngs(0))
    net.b[...] = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5)), jnp.float32)
    x = x0.copy()
    for layer in range(2):
        w = (np.asarray(net.u[layer]) @ np.asarray(net.v[layer]).T).T if rank else np.asarray(net.w[layer])
        x = x0 * (x @ w + np.asarray(net.b[layer])) + x   # x_{l+1} = x0 * (W x_l + b) + x_l
    np.testing.assert_allclose(net(jnp.asarray(x0)), x, rtol=1e-5, atol=1e-6)


def relu_mlp(mlp, x):
    """numpy forward of an `MLP` (ReLU hidden layers, linear output) from its own parameters."""
    for layer in mlp.layers:
        x = np.maximum(x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0.0)
    return x @ np.asarray(mlp.out.kernel[...]) + np.asarray(mlp.out.bias[...])


def test_deepfm_is_first_order_plus_fm_plus_dnn():
    model = build_model(build(ModelConfig, {"name": "deepfm", "embed_dim": 3, "dnn": [8]}), SPEC, rngs=nnx.Rngs(0))
    batch = random_ctr_batch(SPEC, 4)
    e, first = model.terms(batch)
    e = np.asarray(e)
    assert e.shape == (4, 5, 3)  # 3 fields + 2 dense fields
    pairwise = [sum(e[b, i] @ e[b, j] for i, j in itertools.combinations(range(5), 2)) for b in range(4)]
    deep = relu_mlp(model.dnn, e.reshape(4, -1))[:, 0]
    np.testing.assert_allclose(model(batch), np.asarray(first) + pairwise + deep, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structure", ["parallel", "stacked"])
def test_dcnv2_forward(structure):
    config = build(ModelConfig, {"name": "dcnv2", "embed_dim": 3, "dnn": [8, 6], "cross_rank": 0, "structure": structure})
    model = build_model(config, SPEC, rngs=nnx.Rngs(0))
    batch = random_ctr_batch(SPEC, 4)
    e = np.asarray(model.embedding(batch["sparse"]))
    x0 = np.concatenate([e.reshape(4, -1), np.asarray(batch["dense"])], axis=1)
    assert x0.shape[1] == config.width(SPEC) == 11
    cross = np.asarray(model.cross(jnp.asarray(x0)))
    if structure == "parallel":
        h = np.concatenate([cross, np.maximum(relu_mlp(model.dnn, x0), 0.0)], axis=1)
    else:
        h = np.maximum(relu_mlp(model.dnn, cross), 0.0)
    logit = h @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(model(batch), logit[:, 0], rtol=1e-4, atol=1e-5)


def test_autoint_layer_is_multi_head_softmax_attention_over_fields_plus_a_residual_projection():
    from scaling.models.baselines.autoint import FieldSelfAttention

    layer = FieldSelfAttention(3, 2, 4, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    wq, wk, wv, wr = (np.asarray(w[...]) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_res))
    expected = np.zeros((2, 5, 2, 4), np.float32)
    for b, h in itertools.product(range(2), range(2)):
        q, k, v, r = x[b] @ wq[:, h], x[b] @ wk[:, h], x[b] @ wv[:, h], x[b] @ wr[:, h]
        scores = q @ k.T / np.sqrt(4)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        expected[b, :, h] = np.maximum(p @ v + r, 0.0)
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected.reshape(2, 5, 8), rtol=1e-4, atol=1e-5)
    # AutoInt+: the attention logit plus the DNN logit
    model = build_model(build(ModelConfig, {"name": "autoint", "embed_dim": 3, "attention_layers": 2, "num_heads": 2,
                                            "head_dim": 4, "dnn": [8]}), SPEC, rngs=nnx.Rngs(0))
    batch = random_ctr_batch(SPEC, 4)
    e = np.asarray(model.fields(batch["sparse"], batch["dense"]))
    h = np.asarray(model.layers[1](model.layers[0](jnp.asarray(e)))).reshape(4, -1)
    logit = h @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...]) + relu_mlp(model.dnn, e.reshape(4, -1))
    np.testing.assert_allclose(model(batch), logit[:, 0], rtol=1e-4, atol=1e-5)


def test_cin_layers_are_compressed_outer_products_and_xdeepfm_adds_three_logits():
    from scaling.models.baselines.xdeepfm import CompressedInteraction

    cin = CompressedInteraction(3, (4, 2), rngs=nnx.Rngs(0))
    x0 = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    pooled, x = [], x0
    for w in cin.weights:
        w = np.asarray(w[...])
        nxt = np.zeros((2, w.shape[0], 5), np.float32)
        for b, h, i, j in itertools.product(range(2), range(w.shape[0]), range(w.shape[1]), range(3)):
            nxt[b, h] += w[h, i, j] * x[b, i] * x0[b, j]   # X^k_h = sum_ij W_hij (X^{k-1}_i * X^0_j)
        x = nxt
        pooled.append(x.sum(-1))
    np.testing.assert_allclose(cin(jnp.asarray(x0)), np.concatenate(pooled, 1), rtol=1e-4, atol=1e-5)
    model = build_model(build(ModelConfig, {"name": "xdeepfm", "embed_dim": 3, "cin": [4], "dnn": [8]}), SPEC,
                        rngs=nnx.Rngs(0))
    batch = random_ctr_batch(SPEC, 4)
    e = np.asarray(model.fields(batch["sparse"], batch["dense"]))
    cin_logit = np.asarray(model.cin_head(model.cin(jnp.asarray(e))))[:, 0]
    expected = (np.asarray(model.linear(batch["sparse"], batch["dense"])) + cin_logit
                + relu_mlp(model.dnn, e.reshape(4, -1))[:, 0])
    np.testing.assert_allclose(model(batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "autoint", "xdeepfm"])
def test_gradients_reach_every_parameter(name):
    model = build_model(build(ModelConfig, {"name": name, "size": "xs"}), SPEC, rngs=nnx.Rngs(0))
    batch = random_ctr_batch(SPEC, 8)

    def loss(m):
        return jnp.mean(jax.nn.softplus(m(batch)) - batch["label"] * m(batch))

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(g)), path
        if "table" not in str(path):  # embedding tables: rows no id in the batch touched get 0
            assert float(jnp.abs(g).max()) > 0, path


@pytest.mark.parametrize("values, key", [
    ({"name": "dcnv2", "dnn": []}, "at least one hidden width"),
    ({"name": "dcnv2", "structure": "serial"}, "structure"),
    ({"name": "deepfm", "dnn": [0]}, "dnn[0]"),
])
def test_bad_configs_name_the_key(values, key):
    with pytest.raises(ConfigError) as error:
        build(ModelConfig, values)
    assert key in str(error.value)


def train_briefly(output_dir, name: str, size: str = "xs"):
    """60 steps of 256 on the quickstart's synthetic CTR world, evaluated once on 2048 examples:
    the run record (tests/test_ctr_zoo_more.py reuses this)."""
    return train(load_run_config(os.path.join(ROOT, "sweeps", "quickstart.yaml"), [
        f"model.name={name}", f"model.size={size}", "train.steps=60", "train.batch_size=256", "train.eval_every=0",
        "train.checkpoint_every=0", "data.eval_examples=2048", "logging.progress=false",
        "logging.wandb.mode=disabled", f"train.output_dir={output_dir}"]))


@pytest.mark.parametrize("name", ["dcnv2", "deepfm", "autoint", "xdeepfm"])
def test_trains_through_the_loop(tmp_path, name):
    record = train_briefly(tmp_path, name)
    assert record.status == "ok", record.reason
    assert record.final_eval["ne"] < 1.0  # better than predicting the base rate
