"""The Wukong FM block kernel (scaling/kernels/fm_block.py) against its jnp reference, in
interpret mode on CPU: forward and every gradient, fp32 and bf16, the column chunks it walks d in,
the envelope past which it falls back to XLA, and a Wukong model with the kernel on and off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.kernels.fm_block import chunk_width, kernel_fits, pallas_fm_block, reference_fm_block
from tests.test_kernels import _close, _err, _fm_inputs, _fm_vjp


def _assert_fm_matches_reference(args, cot):
    """The pallas path's output and four gradients equal the XLA reference's (fp32 tolerances)."""
    out, grads = _fm_vjp("pallas", cot)(*args)
    ref_out, ref_grads = _fm_vjp("xla", cot)(*args)
    _close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


def test_fm_block_matches_reference_fp32():
    _assert_fm_matches_reference(*_fm_inputs(10, 7, 5, 3, jnp.float32))  # 10 examples: a partial last tile of 4


def test_fm_block_bf16_within_the_xla_reference_error():
    args, cot = _fm_inputs(8, 26, 16, 8, jnp.bfloat16, seed=6)
    up = [a.astype(jnp.float32) for a in args]
    exact = _fm_vjp("xla", cot.astype(jnp.float32))(*up)
    kernel, xla = _fm_vjp("pallas", cot)(*args), _fm_vjp("xla", cot)(*args)
    pairs = [(kernel[0], xla[0], exact[0])] + list(zip(kernel[1], xla[1], exact[1]))
    for name, (got, base, ref) in zip(("out", "x", "y", "scale", "bias"), pairs):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_fm_block_walks_d_in_chunks(precision):
    # d = 100 -> d_p = 128: two column chunks of 64, the last 36 columns valid; under IEEE fp32
    # dots ('highest') four of 32, the last one three quarters masked
    with jax.default_matmul_precision(precision):
        _assert_fm_matches_reference(*_fm_inputs(6, 7, 100, 3, jnp.float32, seed=7))


def test_fm_block_chunk_widths():
    """64 columns (P_c with 64 rows: wgmma) where the tiles hold them, else 32 (fm_block.D_CHUNK)."""
    paper = (128, 256, 64)  # Wukong's paper shape, padded
    assert chunk_width(*paper) == 64 and chunk_width(*paper, backward=True) == 32  # 64 spilled 712 B there
    assert chunk_width(16, 128, 16, itemsize=4) == 64 == chunk_width(16, 128, 16, itemsize=4, backward=True)
    assert chunk_width(16, 32, 16) == 32  # never wider than the tile
    with jax.default_matmul_precision("highest"):  # IEEE fp32 dots: no tensor-core path, narrow chunks
        assert chunk_width(16, 128, 16, itemsize=4) == 32 == chunk_width(16, 128, 16, itemsize=4, backward=True)
        assert chunk_width(*paper) == 64  # bf16 dots are not affected


def test_fm_block_tiles_past_the_kernels_fall_back_to_the_reference():
    # The envelope measured with benchmarks/kernel_compile.py --op fm (sm_90a, no spills)
    assert kernel_fits(128, 64, 32) == (True, True) and kernel_fits(128, 256, 64) == (True, True)
    assert kernel_fits(256, 128, 32) == (True, False) and kernel_fits(256, 64, 64) == (False, False)
    assert kernel_fits(128, 1024, 32) == (True, True) and kernel_fits(64, 2048, 16) == (False, False)
    # float32 x: the forward alike (d walked in chunks), the backward up to n * k = 4096
    assert kernel_fits(128, 256, 64, itemsize=4) == (True, False)  # Wukong's paper shape
    assert kernel_fits(64, 256, 64, itemsize=4) == (True, True)
    # n = 150, d = 10, k = 9 -> tiles (256, 16, 16): the forward kernel, the backward through XLA
    args, cot = _fm_inputs(6, 150, 10, 9, jnp.float32)
    assert kernel_fits(256, 16, 16, itemsize=4) == (True, False)
    jaxpr = str(jax.make_jaxpr(_fm_vjp("pallas", cot))(*args))
    assert "wukong_fm_block_fwd" in jaxpr and "wukong_fm_block_bwd" not in jaxpr
    _assert_fm_matches_reference(args, cot)
    with pytest.warns(UserWarning, match="larger than the kernel holds"):  # tiles (256, 16, 64): all XLA
        wide, _ = _fm_inputs(2, 150, 10, 40, jnp.float32)
        np.testing.assert_array_equal(pallas_fm_block(*wide, interpret=True), reference_fm_block(*wide))


def test_wukong_forward_with_the_fm_kernel_equals_xla():
    from flax import nnx

    from scaling.config import ModelConfig
    from scaling.config_schema import build
    from scaling.data.spec import CTRFeatureSpec
    from scaling.models.registry import build_model

    spec = CTRFeatureSpec(cardinalities=(5, 7, 3, 11), num_dense=3)
    base = dict(name="wukong", embed_dim=4, num_layers=2, num_fm=2, num_lcb=3, fm_rank=3, fmb_mlp_width=8,
                fmb_mlp_depth=1, dense_mlp=(6,), top_mlp=(8,), fmb_out_init_scale=1.0)
    rng = np.random.default_rng(11)
    batch = {"sparse": jnp.asarray(rng.integers(0, 3, size=(6, 4)), jnp.int32),
             "dense": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
    forward = nnx.jit(lambda model, batch: model(batch))
    got, expected = (forward(build_model(build(ModelConfig, {**base, "fm_impl": impl}), spec, rngs=nnx.Rngs(0)), batch)
                     for impl in ("pallas", "xla"))
    _close(got, expected)
