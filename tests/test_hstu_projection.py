"""HSTU's fused projection and attention (`projected_mha`, scaling/kernels/hstu_attention.py):
u, v, q, k = split(silu(pre)), q scaled by alpha, then the attention; the kernel backward writes
the pre-activation's gradient into one packed buffer (dK/dV the u, v, k sections, dQ the q
section in place). Interpret mode on CPU, tolerances as in tests/test_kernels.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.kernels.hstu_attention import Blocks, projected_mha, projection_fusable
from tests.test_kernels import (_abstract_mesh, _assert_same_loss_and_block_grads, _close, _cuda_lowering,
                                _encoder_loss_and_grads, _err, _hstu_batch, _hstu_model)

N, HEADS, DIM = 40, 2, 16
LENGTHS = (0, 1, 16, 37, 40)  # 0, 1, a block, a non-multiple, the full width (padded to 48)
SMALL = Blocks.uniform(16)


def _inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    pre = jnp.asarray(rng.normal(size=(b, N, 4 * HEADS * DIM)), dtype)
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 40_000, size=(b, N)), axis=1), jnp.int32)
    pos_w = jnp.asarray(rng.normal(size=2 * N - 1), jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=33), jnp.float32)
    cots = (jnp.asarray(rng.normal(size=(b, N, HEADS * DIM)), dtype),
            jnp.asarray(rng.normal(size=(b, N, HEADS, DIM)), dtype))
    return (pre, pos_w, ts_w), ts, cots


def _vjp(impl, blocks, ts, cots, *, alpha=1.0, bias=True):
    """jit((pre, pos_w, ts_w) -> ((u, attention), their gradients under the cotangents))."""
    lengths = jnp.asarray(LENGTHS, jnp.int32)

    def run(pre, pos_w, ts_w):
        def f(pre, pos_w, ts_w):
            extra = dict(pos_w=pos_w, ts_w=ts_w, timestamps=ts) if bias else {}
            return projected_mha(pre, lengths, heads=HEADS, norm=float(N), alpha=alpha, impl=impl, blocks=blocks,
                                 **extra)

        out, pullback = jax.vjp(f, pre, pos_w, ts_w)
        return out, pullback(cots)

    return jax.jit(run)


@pytest.mark.parametrize("blocks, alpha, bias", [
    (SMALL, 1.0, True),  # one head per program: a separate dbias kernel
    (Blocks.uniform(16, heads_per_program=2), 0.25, True),  # dK/dV also writes the bias gradient
    # BM != BN in every kernel, no bias
    (Blocks(block_q=32, block_k=16, dkdv_block_q=16, dkdv_block_k=32, dq_block_q=32, dq_block_k=16), 0.5, False),
    # dQ with both heads per program, dK/dV (the u, v, k sections) with one, then dbias
    (Blocks(16, 16, 16, 16, 32, 16, heads_per_program=2, dkdv_heads_per_program=1), 0.5, True),
])
def test_projected_kernel_matches_reference_fp32(blocks, alpha, bias):
    args, ts, cots = _inputs()
    (out, grads), (ref_out, ref_grads) = (_vjp(impl, blocks, ts, cots, alpha=alpha, bias=bias)(*args)
                                          for impl in ("pallas", "xla"))
    for name, got, want in zip(("u", "attention"), out, ref_out):
        _close(got, want, name=name)
    # the packed gradient: every section (u, v, q, k) and row, incl. rows past the lengths
    for name, got, want in zip(("pre", "pos_w", "ts_w"), grads, ref_grads):
        if bias or name == "pre":
            _close(got, want, name=name)


def test_each_section_of_the_packed_gradient_is_its_own():
    """A cotangent on u alone moves only the u section of d pre; on the attention alone, only v, q, k."""
    args, ts, (cot_u, cot) = _inputs(seed=3)
    sections = lambda g: np.asarray(g).reshape(len(LENGTHS), N, 4, HEADS * DIM)  # noqa: E731
    only_u = _vjp("pallas", SMALL, ts, (cot_u, jnp.zeros_like(cot)))(*args)[1][0]
    only_attn = _vjp("pallas", SMALL, ts, (jnp.zeros_like(cot_u), cot))(*args)[1][0]
    assert np.abs(sections(only_u)[:, :, 1:]).max() == 0 and np.abs(sections(only_u)[:, :, 0]).max() > 0
    assert np.abs(sections(only_attn)[:, :, 0]).max() == 0
    assert all(np.abs(sections(only_attn)[:, :, i]).max() > 0 for i in (1, 2, 3))


def test_projected_kernel_bf16_within_the_xla_reference_error():
    args, ts, cots = _inputs(jnp.bfloat16, seed=2)
    up = [a.astype(jnp.float32) for a in args]
    exact = _vjp("xla", SMALL, ts, tuple(c.astype(jnp.float32) for c in cots), alpha=0.5)(*up)
    kernel = _vjp("pallas", Blocks.uniform(16, heads_per_program=2), ts, cots, alpha=0.5)(*args)
    xla = _vjp("xla", SMALL, ts, cots, alpha=0.5)(*args)
    assert kernel[1][0].dtype == jnp.bfloat16
    triples = zip(jax.tree.leaves(kernel), jax.tree.leaves(xla), jax.tree.leaves(exact))
    for name, (got, base, ref) in zip(("u", "out", "pre", "pos_w", "ts_w"), triples):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


def test_a_width_that_is_not_four_sections_of_whole_heads_is_refused():
    with pytest.raises(ValueError, match="4 x 2 heads"):
        projected_mha(jnp.zeros((1, 4, 4 * 2 * 16 + 2)), jnp.ones((1,), jnp.int32), heads=2, norm=4.0, impl="xla")


def test_projection_fusable_needs_one_power_of_two_head_width_and_whole_heads():
    from scaling.sharding.rules import load_layout, use_rules

    assert projection_fusable(2, 16, 16) and projection_fusable(8, 128, 128)
    assert not projection_fusable(2, 16, 32)  # the packed view needs one head width
    assert not projection_fusable(1, 50, 50)  # would need padded sections (ML-1M's 50)
    mesh = _abstract_mesh((2, 2, 2))
    with jax.sharding.use_abstract_mesh(mesh):
        with use_rules(load_layout("fsdp_tp")):  # heads split over tensor
            assert not projection_fusable(4, 16, 16)
        with use_rules(load_layout("fsdp")):
            assert projection_fusable(4, 16, 16)


def test_hstu_model_trains_through_the_fused_projection_and_matches_xla():
    """With 16-wide heads the block runs `projected_mha`: its kernel backward (the dQ kernel writing
    in place into dK/dV's buffer) is in the program, and loss and every block gradient equal the
    xla path's."""
    from flax import nnx

    batch = _hstu_batch()
    run = functools.partial(_encoder_loss_and_grads, batch=batch)
    kernel, reference = (_hstu_model(impl, qk_dim=16, v_dim=16, attention_alpha=0.5) for impl in ("pallas", "xla"))
    graphdef, state = nnx.split(kernel)
    jaxpr = str(jax.make_jaxpr(lambda state: run(nnx.merge(graphdef, state)))(state))
    assert "hstu_attention_dq" in jaxpr and "input_output_aliases=((7, 0),)" in jaxpr
    _assert_same_loss_and_block_grads(nnx.jit(run)(kernel), nnx.jit(run)(reference))
    # the unfused block (what forward_with_kv, M-FALCON's cache, runs) gives the same block output
    items, ts, lengths = batch
    block, x = kernel.blocks[0], jnp.asarray(np.random.default_rng(10).normal(size=(3, 20, 16)), jnp.float32)
    _close(block(x, ts, lengths), block.forward_with_kv(x, ts, lengths)[0])


def test_projected_kernels_lower_to_triton_with_the_dq_kernel_in_place():
    s = jax.ShapeDtypeStruct
    b, n = 2, 128

    def loss(pre, pos_w, ts_w, lengths, ts):
        u, out = projected_mha(pre, lengths, heads=2, norm=float(n), pos_w=pos_w, ts_w=ts_w, timestamps=ts,
                               impl="auto")
        return jnp.sum(u.astype(jnp.float32) ** 2) + jnp.sum(out.astype(jnp.float32) ** 2)

    args = (s((b, n, 4 * 2 * 64), jnp.bfloat16), s((2 * n - 1,), jnp.float32), s((129,), jnp.float32),
            s((b,), jnp.int32), s((b, n), jnp.int32))
    text = _cuda_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
    for kernel in ("fwd", "dkdv", "dq"):
        assert f"hstu_attention_{kernel}" in text, kernel
    assert "output_operand_aliases" in text
