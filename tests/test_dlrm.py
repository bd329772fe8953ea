"""DLRM: hand-computed dot interaction, a numpy forward, model contract, ladder, config errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.config import ModelConfig
from scaling.config_schema import ConfigError, build
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import param_counts
from scaling.models.dlrm import DLRM, DLRMConfig, dot_interaction
from scaling.models.registry import build_model, model_class
from scaling.sharding.annotate import LOGICAL_AXES, logical_axes
from tests.conftest import random_ctr_batch as batch_for

SPEC = CTRFeatureSpec(cardinalities=(5, 7, 3, 11), num_dense=3)
TINY = dict(name="dlrm", embed_dim=4, bottom_mlp=(6,), top_mlp=(8, 5))


def tiny_config(**overrides) -> DLRMConfig:
    return build(ModelConfig, {**TINY, **overrides})


def params_of(model: nnx.Module) -> list[tuple[tuple, nnx.Param]]:
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]


def test_dot_interaction_hand_computed():
    z = jnp.asarray([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # F'=3, d=2
    # pairs (0,1), (0,2), (1,2): 0, 1, 2
    np.testing.assert_allclose(dot_interaction(z), [[0.0, 1.0, 2.0]], atol=1e-6)


def test_dot_interaction_against_loops():
    z = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    out = np.asarray(dot_interaction(jnp.asarray(z)))
    assert out.shape == (2, 10)  # F'(F'-1)/2
    expected = np.array([[float(z[b, i] @ z[b, j]) for i in range(5) for j in range(i + 1, 5)] for b in range(2)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _np_mlp(mlp, x: np.ndarray) -> np.ndarray:
    for layer in mlp.layers:
        x = np.maximum(x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0.0)
    return x @ np.asarray(mlp.out.kernel[...]) + np.asarray(mlp.out.bias[...])


def test_forward_matches_numpy():
    model = DLRM(tiny_config(), SPEC, rngs=nnx.Rngs(1))
    batch = batch_for(SPEC)
    table = np.asarray(model.embedding.table[...])
    offsets = np.concatenate([[0], np.cumsum(SPEC.cardinalities)[:-1]])
    expected = []
    for b in range(4):
        emb = [table[offsets[f] + int(batch["sparse"][b, f])] for f in range(SPEC.num_fields)]
        z = _np_mlp(model.bottom, np.asarray(batch["dense"][b]))
        rows = [z] + emb
        inter = [float(rows[i] @ rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
        expected.append(_np_mlp(model.top, np.concatenate([z, inter]))[0])
    np.testing.assert_allclose(model(batch), expected, rtol=1e-4, atol=1e-4)


def test_forward_shape_dtype_and_grads():
    config = tiny_config()
    model = build_model(config, SPEC, rngs=nnx.Rngs(0))
    assert isinstance(model, DLRM) and model_class("dlrm") is DLRM
    batch = batch_for(SPEC, 8)
    logits = model(batch)
    assert logits.shape == (8,) and logits.dtype == jnp.float32

    def loss_fn(m):
        z = m(batch)
        return jnp.mean(jnp.logaddexp(0.0, z) - batch["label"] * z)

    grads = nnx.state(nnx.jit(nnx.grad(loss_fn))(model), nnx.Param)
    flat = list(nnx.to_flat_state(grads))
    assert len(flat) == len(params_of(model))
    for path, g in flat:
        assert np.all(np.isfinite(g[...])), path
        assert np.any(np.asarray(g[...]) != 0), path


def test_no_dense_features():
    spec = CTRFeatureSpec(cardinalities=(5, 7, 3), num_dense=0)
    config = tiny_config()
    model = DLRM(config, spec, rngs=nnx.Rngs(0))
    assert model.bottom is None and config.top_in_features(spec) == 3
    assert model(batch_for(spec)).shape == (4,)


def test_all_params_carry_logical_axes():
    params = params_of(DLRM(tiny_config(), SPEC, rngs=nnx.Rngs(0)))
    assert len(params) >= 9
    for path, var in params:
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path
        named = [a for a in axes if a is not None]
        assert named and all(a in LOGICAL_AXES for a in named) and len(set(named)) == len(named), (path, axes)


def test_every_size_builds_and_flops_grow():
    spec = CTRFeatureSpec(cardinalities=(100,) * 26, num_dense=13)
    flops, dense = [], []
    for size in DLRMConfig.SIZES:
        config = build(ModelConfig, {"name": "dlrm", "size": size})
        assert config.top_mlp == DLRMConfig.SIZES[size]["top_mlp"]
        counts = param_counts(nnx.eval_shape(lambda: build_model(config, spec, rngs=nnx.Rngs(0))))
        assert counts.embedding == spec.total_vocab * config.embed_dim
        flops.append(config.flops_per_example(spec))
        dense.append(counts.dense)
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(a < b for a, b in zip(dense, dense[1:])), dense
    assert flops[0] < 1e5 and flops[-1] / flops[0] >= 100


def test_flops_formula_by_hand():
    # F'=5, d=4: Gram 2*25*4 = 200; bottom 3->6->4: 2*18+6+6 + 2*24+4 = 100;
    # top (10 + 4)=14 -> 8 -> 5 -> 1: (2*112+8+8) + (2*40+5+5) + (2*5+1) = 240 + 90 + 11 = 341
    assert tiny_config().flops_per_example(SPEC) == 200 + 100 + 341


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"embed_dim": 0}, "embed_dim"),
        ({"bottom_mlp": [4, 0]}, "bottom_mlp[1]"),
        ({"top_mlp": [-2]}, "top_mlp[0]"),
        ({"size": "xxxl"}, "size"),
        ({"top_mpl": [8]}, "top_mpl"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        build(ModelConfig, {**TINY, **overrides}, "model")
    assert err.value.path == f"model.{key}"
