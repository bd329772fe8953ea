"""HSTU's LayerNorm kernel (scaling/kernels/row_norm.py): LN(x) and gate * LN(x) against the jnp
reference, in interpret mode on CPU. Tolerances as in tests/test_kernels.py. Shapes cover several
programs with a row count that is not a whole number of them and d padded in registers (40)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.kernels.row_norm import gated_layer_norm
from tests.test_kernels import (_assert_same_loss_and_block_grads, _close, _cuda_lowering, _encoder_loss_and_grads,
                                _err, _hstu_batch, _hstu_model)

SHAPE = (5, 30, 40)  # 150 rows: 3 programs of 64 (bf16 and fp32 at d_p = 64), the last partial


def _inputs(dtype=jnp.float32, seed=0, gated=True):
    rng = np.random.default_rng(seed)
    x, gate, cot = (jnp.asarray(rng.normal(size=SHAPE), dtype) for _ in range(3))
    return x, (gate if gated else None), cot


def _vjp(impl, x, gate, cot):
    if gate is None:
        out, pullback = jax.vjp(jax.jit(lambda x: gated_layer_norm(x, impl=impl)), x)
    else:
        out, pullback = jax.vjp(jax.jit(lambda x, gate: gated_layer_norm(x, gate, impl=impl)), x, gate)
    return out, pullback(cot)


@pytest.mark.parametrize("gated", [False, True])
def test_row_layer_norm_matches_reference_fp32(gated):
    from scaling.kernels.row_norm import block_rows

    assert block_rows(64, 4) == 64 and 150 % 64  # several programs, the last one partial
    assert block_rows(1024, 2) == 16 and block_rows(1024, 4) == 8 and block_rows(32768, 4) == 1
    x, gate, cot = _inputs(gated=gated)
    (out, grads), (ref_out, ref_grads) = _vjp("pallas", x, gate, cot), _vjp("xla", x, gate, cot)
    _close(out, ref_out, name="out")
    for name, got, want in zip(("x", "gate"), grads, ref_grads):
        _close(got, want, name=name)


def test_row_layer_norm_bf16_within_the_xla_reference_error():
    x, gate, cot = _inputs(jnp.bfloat16, seed=1)
    exact = _vjp("xla", *(a.astype(jnp.float32) for a in (x, gate, cot)))
    kernel, xla = _vjp("pallas", x, gate, cot), _vjp("xla", x, gate, cot)
    assert kernel[0].dtype == jnp.bfloat16
    triples = zip(jax.tree.leaves(kernel), jax.tree.leaves(xla), jax.tree.leaves(exact), strict=True)
    for name, (got, base, ref) in zip(("out", "x", "gate"), triples):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


def test_hand_computed_rows():
    """A constant row normalizes to exactly 0; a row of +-a to +-a / sqrt(a^2 + eps), times the gate."""
    x = jnp.array([[7.0, 7.0, 7.0, 7.0], [3.0, -3.0, 3.0, -3.0]])
    gate = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    y = gated_layer_norm(x, gate, impl="pallas")
    np.testing.assert_array_equal(y[0], jnp.zeros(4))
    np.testing.assert_allclose(y[1], jnp.array([1.0, -2.0, 3.0, -4.0]), rtol=5e-6)
    with pytest.raises(ValueError, match="must have x's shape"):
        gated_layer_norm(x, gate[:, :2], impl="pallas")


def test_hstu_with_the_norm_kernel_equals_xla():
    """An HSTU encoder whose LayerNorms and output gate run through the kernel gives the xla
    model's output and every block gradient (the attention through xla in both)."""
    from flax import nnx

    run = nnx.jit(functools.partial(_encoder_loss_and_grads, batch=_hstu_batch()))
    got, want = (run(_hstu_model("xla", norm_impl=impl)) for impl in ("pallas", "xla"))
    _assert_same_loss_and_block_grads(got, want)


def test_row_layer_norm_lowers_to_triton():
    s = jax.ShapeDtypeStruct
    shape = s((4, 256, 1024), jnp.bfloat16)

    def loss(x, gate):
        return jnp.sum(gated_layer_norm(x, impl="auto").astype(jnp.float32) ** 2) + jnp.sum(
            gated_layer_norm(x, gate, impl="auto").astype(jnp.float32) ** 2)

    text = _cuda_lowering(jax.value_and_grad(loss, argnums=(0, 1)), shape, shape)
    assert text.count("row_layer_norm_fwd") >= 2 and text.count("row_layer_norm_bwd") >= 2
    assert text.count("__gpu$xla.gpu.triton") == 4
