"""The Wukong layer's output kernel (scaling/kernels/residual_norm.py): LayerNorm(concat(first,
second) + res) against its jnp reference, in interpret mode on CPU. Tolerances as in
tests/test_kernels.py: fp32 rtol 1e-5; bf16 within twice the bf16 XLA reference's own error.
Shapes cover a batch that is not a whole number of programs (10 with 8 per program), parts whose
fields are not whole 16-row blocks (20 and 12), d padded in registers (40 -> 64), one part only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.kernels.residual_norm import residual_layer_norm
from tests.test_kernels import _close, _cuda_lowering, _err

B, N1, N2, D = 10, 20, 12, 40


def _inputs(dtype=jnp.float32, seed=0, two=True):
    rng = np.random.default_rng(seed)
    first = jnp.asarray(rng.normal(size=(B, N1, D)), dtype)
    second = jnp.asarray(rng.normal(size=(B, N2, D)), dtype) if two else None
    rows = N1 + (N2 if two else 0)
    res = jnp.asarray(rng.normal(size=(B, rows, D)), dtype)
    scale, bias = (jnp.asarray(rng.normal(size=D), jnp.float32) for _ in range(2))
    cot = jnp.asarray(rng.normal(size=(B, rows, D)), dtype)
    return (first, second, res, scale, bias), cot


def _vjp(impl, args, cot):
    """(output, gradients of <output, cot> w.r.t. every array argument) under jit."""
    first, second, res, scale, bias = args
    if second is None:
        f = jax.jit(lambda first, res, scale, bias: residual_layer_norm(first, None, res, scale, bias, impl=impl))
        arrays = (first, res, scale, bias)
    else:
        f = jax.jit(lambda *a: residual_layer_norm(*a, impl=impl))
        arrays = args
    out, pullback = jax.vjp(f, *arrays)
    return out, pullback(cot)


@pytest.mark.parametrize("two", [True, False])
def test_residual_layer_norm_matches_reference_fp32(two):
    args, cot = _inputs(two=two)
    (out, grads), (ref_out, ref_grads) = _vjp("pallas", args, cot), _vjp("xla", args, cot)
    _close(out, ref_out, name="out")
    names = ("first", "second", "res", "scale", "bias") if two else ("first", "res", "scale", "bias")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        _close(got, want, name=name)


def test_residual_layer_norm_bf16_within_the_xla_reference_error():
    args, cot = _inputs(jnp.bfloat16, seed=1)
    up = tuple(a.astype(jnp.float32) for a in args)
    exact = _vjp("xla", up, cot.astype(jnp.float32))
    kernel, xla = _vjp("pallas", args, cot), _vjp("xla", args, cot)
    assert kernel[0].dtype == jnp.bfloat16 and kernel[1][0].dtype == jnp.bfloat16
    triples = zip(jax.tree.leaves(kernel), jax.tree.leaves(xla), jax.tree.leaves(exact), strict=True)
    for name, (got, base, ref) in zip(("out", "first", "second", "res", "scale", "bias"), triples):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


def test_hand_computed_rows():
    """A constant row normalizes to 0 (y = bias exactly); a row of +-a (mean 0, variance a^2) to
    +-a / sqrt(a^2 + eps) (y = +-scale + bias up to eps). The sum with the residual is what is
    normalized."""
    first = jnp.zeros((1, 1, 4)).at[0, 0].set(jnp.array([5.0, 5.0, 5.0, 5.0]))
    second = jnp.array([[[2.0, -2.0, 2.0, -2.0]]])
    res = jnp.stack([jnp.full((4,), -1.0), jnp.array([1.0, -1.0, 1.0, -1.0])])[None]  # sums: 4s and +-3
    scale, bias = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([0.5, 0.5, 0.5, 0.5])
    y = residual_layer_norm(first, second, res, scale, bias, eps=1e-5, impl="pallas")
    np.testing.assert_array_equal(y[0, 0], bias)
    np.testing.assert_allclose(y[0, 1], jnp.array([1.5, -1.5, 3.5, -3.5]), rtol=5e-6)


def test_mismatched_parts_are_refused():
    first, res = jnp.zeros((2, 3, 8)), jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match="must stack along axis 1"):
        residual_layer_norm(first, jnp.zeros((2, 1, 8)), res, jnp.ones(8), jnp.zeros(8), impl="pallas")


def test_wukong_with_the_norm_kernel_equals_xla():
    """A Wukong model (two layers: a learned residual, then the identity) with the layer-output
    kernel gives the xla model's logits and every gradient."""
    from flax import nnx

    from scaling.config import ModelConfig
    from scaling.config_schema import build
    from scaling.data.spec import CTRFeatureSpec
    from scaling.models.registry import build_model

    spec = CTRFeatureSpec(cardinalities=(5, 7, 3, 11), num_dense=3)
    base = dict(name="wukong", embed_dim=8, num_layers=2, num_fm=4, num_lcb=2, fm_rank=3, fmb_mlp_width=8,
                fmb_mlp_depth=1, dense_mlp=(6,), top_mlp=(8,), fmb_out_init_scale=1.0, fm_impl="xla")
    rng = np.random.default_rng(11)
    batch = {"sparse": jnp.asarray(rng.integers(0, 3, size=(12, 4)), jnp.int32),
             "dense": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)}

    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(batch))))(model)

    models = [build_model(build(ModelConfig, {**base, "norm_impl": impl}), spec, rngs=nnx.Rngs(0))
              for impl in ("pallas", "xla")]
    layers = models[0].layers
    assert layers[0].residual is not None and layers[1].residual is None  # 5 inputs -> 6 outputs -> 6
    (value, grads), (ref_value, ref_grads) = (nnx.jit(loss_and_grads)(m) for m in models)
    _close(value, ref_value)
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    assert any("norm" in str(path) for path in ref_flat)
    for path in ref_flat:
        _close(flat[path][...], ref_flat[path][...], rtol=2e-5, name=str(path))


def test_residual_layer_norm_lowers_to_two_triton_kernels():
    s = jax.ShapeDtypeStruct
    shapes = (s((64, 48, 160), jnp.bfloat16), s((64, 48, 160), jnp.bfloat16), s((64, 96, 160), jnp.bfloat16),
              s((160,), jnp.float32), s((160,), jnp.float32))

    def loss(*args):
        return jnp.sum(residual_layer_norm(*args, impl="auto").astype(jnp.float32) ** 2)

    text = _cuda_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), *shapes)
    assert "residual_layer_norm_fwd" in text and "residual_layer_norm_bwd" in text
    assert text.count("__gpu$xla.gpu.triton") == 2
