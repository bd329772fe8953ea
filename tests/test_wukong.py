"""Wukong: hand-computed FMB/LCB cases, layer composition, model contract, ladder, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig
from scaling.config_schema import ConfigError, build
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import param_counts
from scaling.models.registry import build_model, model_class
from scaling.models.wukong import (
    FactorizationMachineBlock,
    LinearCompressBlock,
    Wukong,
    WukongConfig,
    WukongLayer,
    fm_explicit,
    fm_low_rank,
)
from scaling.sharding.annotate import LOGICAL_AXES, logical_axes
from tests.conftest import random_ctr_batch as batch_for

SPEC = CTRFeatureSpec(cardinalities=(5, 7, 3, 11), num_dense=3)
TINY = dict(
    name="wukong",
    embed_dim=4,
    num_layers=2,
    num_fm=2,
    num_lcb=3,
    fm_rank=3,
    fmb_mlp_width=8,
    fmb_mlp_depth=1,
    dense_mlp=(6,),
    num_dense_embeddings=2,
    top_mlp=(8,),
)


def tiny_config(**overrides) -> WukongConfig:
    return build(ModelConfig, {**TINY, **overrides})


def np_layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def params_of(model: nnx.Module) -> list[tuple[tuple, nnx.Param]]:
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]


# ---------------------------------------------------------------- FM, FMB and LCB by hand

X_HAND = np.array([[[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]], np.float32)  # B=1, n=3, d=2
Y_HAND = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)  # n=3, k=2


def test_fm_hand_computed():
    # X X^T = [[5, 2, 1], [2, 1, -1], [1, -1, 10]];  (X X^T) Y = [[6, 3], [1, 0], [11, 9]].
    expected = np.array([[[6.0, 3.0], [1.0, 0.0], [11.0, 9.0]]])
    np.testing.assert_allclose(fm_low_rank(X_HAND, Y_HAND), expected, atol=1e-6)
    np.testing.assert_allclose(fm_explicit(X_HAND, Y_HAND), expected, atol=1e-6)


def test_fm_low_rank_equals_explicit_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)  # n > d: X X^T is rank-deficient
    y = rng.normal(size=(7, 4)).astype(np.float32)
    low, explicit = fm_low_rank(x, y), fm_explicit(x, y)
    assert low.shape == (3, 7, 4)
    np.testing.assert_allclose(low, explicit, rtol=1e-4, atol=1e-4)
    # and both against explicit loops
    loops = np.zeros((3, 7, 4))
    for b in range(3):
        for i in range(7):
            for c in range(4):
                loops[b, i, c] = sum(float(x[b, i] @ x[b, j]) * y[j, c] for j in range(7))
    np.testing.assert_allclose(low, loops, rtol=1e-4, atol=1e-4)


def test_fmb_hand_computed_against_numpy():
    # n=3, d=2, k=2, n_F=2, no hidden layer: FMB = reshape(LN(flatten(X X^T Y)) @ W + b).
    fmb = FactorizationMachineBlock(3, 2, 2, 2, mlp_width=5, mlp_depth=0, out_init_scale=1.0, rngs=nnx.Rngs(0))
    fmb.y[...] = jnp.asarray(Y_HAND)
    w = np.arange(24, dtype=np.float32).reshape(6, 4) / 10.0
    fmb.mlp.out.kernel[...] = jnp.asarray(w)
    fmb.mlp.out.bias[...] = jnp.asarray([1.0, 0.0, -1.0, 0.5])
    out = np.asarray(fmb(jnp.asarray(X_HAND)))

    flat = np.array([6.0, 3.0, 1.0, 0.0, 11.0, 9.0])  # flatten of the hand-computed FM above
    normed = (flat - flat.mean()) / np.sqrt(flat.var() + 1e-5)
    expected = np.zeros(4)
    for o in range(4):
        expected[o] = sum(normed[i] * w[i, o] for i in range(6)) + [1.0, 0.0, -1.0, 0.5][o]
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out.reshape(4), expected, rtol=1e-5, atol=1e-5)


def test_fmb_zero_init_emits_zeros():
    fmb = FactorizationMachineBlock(3, 2, 2, 2, mlp_width=5, mlp_depth=2, rngs=nnx.Rngs(0))  # default init 0
    np.testing.assert_array_equal(fmb(jnp.asarray(X_HAND)), np.zeros((1, 2, 2)))


def test_lcb_hand_computed():
    lcb = LinearCompressBlock(3, 2, rngs=nnx.Rngs(0))
    lcb.weight[...] = jnp.asarray([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])
    # row 0 = x0 + 2 x2 = (7, 0); row 1 = -x1 + x2 = (3, -2)
    np.testing.assert_allclose(lcb(jnp.asarray(X_HAND)), [[[7.0, 0.0], [3.0, -2.0]]], atol=1e-6)


@pytest.mark.parametrize("num_inputs", [6, 5])  # 5 == n_F + n_L: identity residual
def test_layer_composition(num_inputs):
    config = tiny_config(fmb_out_init_scale=0.7)
    layer = WukongLayer(num_inputs, config, rngs=nnx.Rngs(3))
    x = np.random.default_rng(2).normal(size=(2, num_inputs, 4)).astype(np.float32)
    out = np.asarray(layer(jnp.asarray(x)))
    assert out.shape == (2, config.num_fm + config.num_lcb, 4)
    fmb = np.asarray(layer.fmb(jnp.asarray(x)))
    w_l = np.asarray(layer.lcb.weight[...])
    lcb = np.einsum("ln,bnd->bld", w_l, x)
    if num_inputs == config.num_fm + config.num_lcb:
        assert layer.residual is None
        residual = x
    else:
        residual = np.einsum("on,bnd->bod", np.asarray(layer.residual[...]), x)
    scale, bias = np.asarray(layer.norm.scale[...]), np.asarray(layer.norm.bias[...])
    expected = np_layer_norm(np.concatenate([fmb, lcb], axis=1) + residual, scale, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)  # LN over d


def test_layer_without_fmb_or_lcb():
    for overrides in ({"num_fm": 0}, {"num_lcb": 0}):
        config = tiny_config(**overrides)
        layer = WukongLayer(6, config, rngs=nnx.Rngs(0))
        assert layer(jnp.ones((2, 6, 4))).shape == (2, config.num_outputs, 4)


# ---------------------------------------------------------------- the model contract


def test_forward_shape_dtype_and_determinism():
    config = tiny_config()
    model = build_model(config, SPEC, rngs=nnx.Rngs(0))
    assert isinstance(model, Wukong) and model_class("wukong") is Wukong
    batch = batch_for(SPEC)
    logits = model(batch)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    again = build_model(config, SPEC, rngs=nnx.Rngs(0))(batch)
    np.testing.assert_array_equal(logits, again)
    # X0: 4 sparse fields + 2 dense embeddings
    assert model.embed(batch).shape == (4, 6, 4)


def test_no_dense_features():
    spec = CTRFeatureSpec(cardinalities=(5, 7, 3), num_dense=0)
    model = Wukong(tiny_config(), spec, rngs=nnx.Rngs(0))
    assert model.dense_mlp is None
    assert model(batch_for(spec)).shape == (4,)
    assert tiny_config().num_inputs(spec) == 3


@pytest.mark.parametrize("init_scale", [0.0, 0.5])
def test_gradients_finite_for_all_params(init_scale):
    model = Wukong(tiny_config(fmb_out_init_scale=init_scale), SPEC, rngs=nnx.Rngs(0))
    batch = batch_for(SPEC, 8)

    def loss_fn(m):
        logits = m(batch)
        return jnp.mean(jnp.logaddexp(0.0, logits) - batch["label"] * logits)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == len(params_of(model))
    for g in leaves:
        assert np.all(np.isfinite(g))
    if init_scale > 0:  # with a non-zero FMB output layer every parameter gets a gradient
        for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
            assert np.any(np.asarray(g[...]) != 0), path


def test_bfloat16_compute_path():
    model = Wukong(tiny_config(fmb_out_init_scale=0.5), SPEC, rngs=nnx.Rngs(0))
    batch = batch_for(SPEC)
    graphdef, state = nnx.split(model)
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    batch16 = {**batch, "dense": batch["dense"].astype(jnp.bfloat16)}
    logits16 = nnx.merge(graphdef, state16)(batch16)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, model(batch), rtol=0.1, atol=0.1)


def test_all_params_carry_logical_axes():
    model = Wukong(tiny_config(), SPEC, rngs=nnx.Rngs(0))
    params = params_of(model)
    assert len(params) > 10
    for path, var in params:
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path
        assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
        named = [a for a in axes if a is not None]
        assert named and len(set(named)) == len(named), (path, axes)  # no axis named twice


# ---------------------------------------------------------------- ladder and configs


def test_every_size_builds_and_flops_grow():
    spec = CTRFeatureSpec(cardinalities=(100,) * 26, num_dense=13)
    assert list(WukongConfig.SIZES)[:1] == ["xxxs"] and len(WukongConfig.SIZES) >= 5
    flops, dense = [], []
    for size in WukongConfig.SIZES:
        config = build(ModelConfig, {"name": "wukong", "size": size})
        assert config.size == size and config.num_layers == WukongConfig.SIZES[size]["num_layers"]
        model = nnx.eval_shape(lambda: build_model(config, spec, rngs=nnx.Rngs(0)))
        counts = param_counts(model)
        assert counts.embedding == spec.total_vocab * config.embed_dim
        flops.append(config.flops_per_example(spec))
        dense.append(counts.dense)
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(a < b for a, b in zip(dense, dense[1:])), dense
    assert 1e4 <= flops[0] <= 1e5 and 5e6 <= flops[-1] <= 2e7 and flops[-1] / flops[0] >= 100


def test_size_preset_then_explicit_keys():
    config = build(ModelConfig, {"name": "wukong", "size": "m", "num_layers": 3})
    assert config.num_layers == 3 and config.num_fm == WukongConfig.SIZES["m"]["num_fm"] and config.size == "m"
    assert build(ModelConfig, {"name": "wukong"}).size == "custom"
    assert config.embedding_bytes_per_example(SPEC) == 4 * 16 * 4


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"fm_rank": 0}, "fm_rank"),
        ({"num_fm": 0, "num_lcb": 0}, "num_fm"),
        ({"top_mlp": [8, 0]}, "top_mlp[1]"),
        ({"dense_mlp": [-1]}, "dense_mlp[0]"),
        ({"size": "huge"}, "size"),
        ({"num_layer": 2}, "num_layer"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:  # as a run config's `model` section
        build(ModelConfig, {**TINY, **overrides}, "model")
    assert err.value.path == f"model.{key}"
    if key != "size":  # the concrete class directly (no preset resolution)
        with pytest.raises(ConfigError) as err:
            build(WukongConfig, {**TINY, **overrides})
        assert err.value.path == key


def test_unknown_size_names_the_ladder():
    with pytest.raises(ConfigError, match="xxs"):
        build(ModelConfig, {"name": "wukong", "size": "xxxl"})
