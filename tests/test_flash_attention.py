"""The softmax attention kernel (scaling/kernels/flash_attention.py) against its jnp reference,
interpreted on CPU (compiled on a GPU): forward and the q, k, v gradients in fp32 and bf16,
hand-computed cases, the block ranges against the mask they stand for, the dispatcher, the Triton
lowering for a GPU, and OneTrans with the kernel on."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.triton_ir import flash_ttir
from scaling.kernels import flash_attention as fa
from scaling.kernels.dispatch import interpret_default
from scaling.kernels.flash_attention import FlashBlocks, flash_mha, pallas_flash_mha, reference_flash_mha

INTERPRET = interpret_default()  # compiled through Triton on a GPU (gpu_session.sh's test step)
SMALL = FlashBlocks.uniform(16)
# BQ != BK in every kernel, and the two backward kernels' tiles differ
MIXED = FlashBlocks(block_q=32, block_k=16, dkdv_block_q=16, dkdv_block_k=32, dq_block_q=32, dq_block_k=16)


def _inputs(b, nq, nk, h, d, dv, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, nq, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, nk, h, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, nk, h, dv)), dtype)
    return (q, k, v), jnp.asarray(rng.normal(size=(b, nq, h, dv)), dtype)


def _vjp(fn, key_start, key_end, cot, **static):
    """jit((q, k, v) -> (out, grads of <out, cot> w.r.t. q, k, v))."""

    def run(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, key_start, key_end, **static), q, k, v)
        return out, pullback(cot)

    return jax.jit(run)


def _kernel(blocks):
    def run(q, k, v, key_start, key_end, **static):
        return pallas_flash_mha(q, k, v, key_start, key_end, blocks=blocks, interpret=INTERPRET, **static)

    return run


def _err(x, ref) -> float:
    return float(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64)).max())


# (Nq, Nk, d, dv, q_offset, causal, key_start, key_end) with B = 4: empty key ranges, a range of
# one key, block boundaries, non-multiples of the blocks, OneTrans's head width 48.
CASES = [
    (40, 56, 48, 48, 16, True, (0, 10, 55, 56), (56, 56, 56, 56)),   # OneTrans: 16 past the last S query
    (33, 33, 16, 32, 0, True, (0, 1, 16, 33), (33, 33, 33, 33)),     # self-attention, dv != d
    (16, 48, 24, 24, 32, True, (0, 47, 48, 31), (48, 48, 48, 48)),   # NS queries only (keep 0)
    (37, 50, 8, 8, 0, False, (0, 5, 16, 7), (50, 17, 16, 7)),        # bidirectional, key_end < Nk, empty
    (1, 20, 16, 16, 19, True, (0, 19, 20, 3), (20, 20, 20, 20)),     # one query
    (30, 20, 16, 16, 4, True, (0, 2, 17, 0), (20, 20, 20, 9)),       # rows past the last key's position
]


@pytest.mark.parametrize("blocks", [SMALL, MIXED], ids=["16x16", "mixed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}d{c[2]}")
def test_kernel_matches_reference_fp32(case, blocks):
    nq, nk, d, dv, q_offset, causal, start, end = case
    (q, k, v), cot = _inputs(4, nq, nk, 2, d, dv)
    start, end = jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)
    static = dict(q_offset=q_offset, causal=causal)
    got = _vjp(_kernel(blocks), start, end, cot, **static)(q, k, v)
    want = _vjp(reference_flash_mha, start, end, cot, **static)(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5 * max(float(np.abs(np.asarray(w)).max()), 1e-6), err_msg=name)


def test_hand_computed_uniform_scores_average_the_visible_values():
    """q = 0: every visible key scores the same, so row i is the mean of the values it sees, and a
    row that sees none is 0. Nk = 6, keys valid from 2, queries at positions 3..5."""
    v = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 1, 16))
    q = jnp.zeros((1, 4, 1, 16))
    k = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 1, 16)), jnp.float32)
    out = pallas_flash_mha(q, k, v, jnp.asarray([3]), jnp.asarray([6]), q_offset=2, interpret=INTERPRET)
    # row 0 at position 2 sees nothing (keys start at 3); rows at 3, 4, 5 see keys 3..p
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 3.0, 3.5, 4.0], atol=1e-6)
    # a key with a score log(3) higher than the others gets weight 3/(3 + n - 1)
    k2 = jnp.zeros((1, 6, 1, 16)).at[0, 5, 0, 0].set(np.log(3.0) * 4.0)  # 1/sqrt(16) scale
    q2 = jnp.zeros((1, 1, 1, 16)).at[0, 0, 0, 0].set(1.0)
    out = pallas_flash_mha(q2, k2, v, jnp.asarray([3]), jnp.asarray([6]), q_offset=5, interpret=INTERPRET)
    np.testing.assert_allclose(out[0, 0, 0, 0], (3 + 4 + 3 * 5) / 5, rtol=1e-6)


def test_rows_that_see_no_key_are_zero_with_zero_gradients():
    (q, k, v), cot = _inputs(2, 24, 24, 1, 16, 16, seed=3)
    start, end = jnp.asarray([24, 12]), jnp.asarray([24, 24])
    out, (dq, dk, dv) = _vjp(_kernel(SMALL), start, end, cot)(q, k, v)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, :12], 0.0)  # queries before the first valid key
    for g in (dq[0], dk[0], dv[0], dq[1, :12], dk[1, :12], dv[1, :12]):
        np.testing.assert_array_equal(g, 0.0)
    assert float(jnp.abs(dk[1, 12:]).max()) > 0


def test_bf16_within_the_xla_reference_error():
    (q, k, v), cot = _inputs(4, 40, 56, 2, 48, 48, jnp.bfloat16, seed=2)
    start, end = jnp.asarray((0, 10, 55, 56), jnp.int32), jnp.full((4,), 56, jnp.int32)
    exact = _vjp(reference_flash_mha, start, end, cot.astype(jnp.float32), q_offset=16)(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    kernel = _vjp(_kernel(SMALL), start, end, cot, q_offset=16)(q, k, v)
    xla = _vjp(reference_flash_mha, start, end, cot, q_offset=16)(q, k, v)
    assert kernel[0].dtype == jnp.bfloat16 and kernel[1][0].dtype == jnp.bfloat16
    for name, got, base, ref in zip(("out", "dq", "dk", "dv"), *(jax.tree.leaves(x) for x in (kernel, xla, exact))):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


def _np_mask(nq, nk, q_offset, causal, start, end):
    rows, cols = np.arange(nq)[:, None], np.arange(nk)[None, :]
    seen = (cols >= start) & (cols < end)
    return seen & (cols <= q_offset + rows) if causal else seen


@pytest.mark.parametrize("causal", [True, False])
def test_block_ranges_cover_every_seen_pair_and_skip_masks_only_on_whole_tiles(causal):
    """For every query block, the key blocks outside [lo, hi) hold no seen pair and the unmasked
    range [f_lo, f_hi) only seen pairs; the same for every key block's query blocks (backward)."""
    nq, nk, bq, bk = 40, 72, 16, 8
    for q_offset, start, end in itertools.product((0, 5, 32, 45), (0, 3, 8, 40, 72), (72, 50, 8)):
        cfg = fa._Config(nq=nq, nk=nk, d=16, dv=16, d_p=16, dv_p=16, q_offset=q_offset, causal=causal,
                         block_q=bq, block_k=bk, dkdv_block_q=bq, dkdv_block_k=bk, dq_block_q=bq, dq_block_k=bk,
                         num_warps=4, num_stages=2, interpret=True)
        padded = np.zeros((-(-nq // bq) * bq, -(-nk // bk) * bk), bool)
        padded[:nq, :nk] = _np_mask(nq, nk, q_offset, causal, start, end)
        for qb in range(padded.shape[0] // bq):
            lo, f_lo, f_hi, hi = (int(x) for x in fa._key_ranges(jnp.int32(qb * bq), start, end, bq, bk, cfg))
            assert lo <= f_lo <= f_hi <= hi
            tiles = padded[qb * bq:(qb + 1) * bq].reshape(bq, -1, bk)
            live = [t for t in range(tiles.shape[1]) if tiles[:, t].any()]
            assert all(lo <= t < hi for t in live), (q_offset, start, end, qb)
            # a whole tile: every real row sees every key (rows past Nq are dropped)
            rows = min(bq, nq - qb * bq)
            assert all(tiles[:rows, t].all() for t in range(f_lo, f_hi)), (q_offset, start, end, qb)
        for kb in range(padded.shape[1] // bk):
            lo, f_lo, hi = (int(x) for x in fa._query_ranges(jnp.int32(kb * bk), start, end, bq, bk, cfg))
            assert lo <= f_lo <= hi
            tiles = padded[:, kb * bk:(kb + 1) * bk].reshape(-1, bq, bk)
            live = [t for t in range(tiles.shape[0]) if tiles[t].any()]
            assert all(lo <= t < hi for t in live), (q_offset, start, end, kb)
            for t in range(f_lo, hi):
                rows = min(bq, nq - t * bq)
                assert tiles[t, :rows].all(), (q_offset, start, end, kb, t)


def test_dispatch_runs_the_reference_off_gpu_and_the_kernel_when_asked():
    (q, k, v), _ = _inputs(2, 8, 8, 1, 16, 16)

    def loss(impl):
        return lambda q, k, v: jnp.sum(flash_mha(q, k, v, impl=impl, blocks=SMALL) ** 2)

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU lowering")
    lowered = jax.jit(jax.grad(loss("auto"), (0, 1, 2))).lower(q, k, v).as_text()  # both branches traced,
    assert "pallas" not in lowered and "triton" not in lowered  # only the CPU one lowered
    jaxpr = str(jax.make_jaxpr(jax.grad(loss("pallas"), (0, 1, 2)))(q, k, v))
    assert jaxpr.count("pallas_call") == 3  # forward, dK/dV, dQ
    for a, b in zip(jax.grad(loss("pallas"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_kernels_lower_to_triton_for_a_gpu(tmp_path):
    """`auto` lowers to three Triton kernels for CUDA (the Pallas -> Triton-IR step runs on CPU),
    with OneTrans's unpadded head width 48 read through masked loads."""
    try:
        paths = flash_ttir(40, 56, 48, str(tmp_path), heads=2, blocks=SMALL)
    except (AttributeError, TypeError) as err:
        pytest.skip(f"cannot cross-lower for CUDA on this JAX: {err}")
    assert sorted(paths) == ["flash_attention_dkdv", "flash_attention_dq", "flash_attention_fwd"]
    fwd = open(paths["flash_attention_fwd"]).read()
    assert fwd.count("tt.dot") >= 2 and "exp2" in fwd


def test_blocks_validate_and_warps_follow_the_head_dim():
    with pytest.raises(ValueError, match="block_k"):
        FlashBlocks(block_k=48)
    assert fa.launch_warps(48, 48, FlashBlocks()) == 4 and fa.launch_warps(128, 128, FlashBlocks()) == 8
    assert fa.launch_warps(96, 64, FlashBlocks()) == 8 and fa.launch_warps(64, 64, FlashBlocks(num_warps=2)) == 2
    assert fa.launch_warps(48, 48, FlashBlocks(), itemsize=4) == 8  # float32: 8 warps, half-size tiles
    # forward, dK/dV, dQ (BQ, BK): each kernel's held block (dK/dV's keys, the others' queries) at 64
    assert FlashBlocks().resolve(2) == (64,) * 6
    assert FlashBlocks().resolve(4, 48) == (64, 64, 32, 64, 64, 32)  # TF32
    assert FlashBlocks().resolve(4, 128) == (64, 64, 32, 32, 64, 32)  # 64 held keys spill at d = 128
    assert FlashBlocks(block_k=128, dq_block_k=16).resolve(4) == (64, 128, 32, 64, 64, 16)
    with jax.default_matmul_precision("highest"):  # IEEE fp32 dots: no tensor-core path
        assert FlashBlocks().resolve(4) == (32,) * 6
        assert FlashBlocks().resolve(2) == (64,) * 6
    assert FlashBlocks.uniform(16) == FlashBlocks(16, 16, 16, 16, 16, 16)
    assert fa.visible_pairs(3, 5, 2, True) == 3 + 4 + 5 and fa.visible_pairs(3, 5, 0, False) == 15


def test_onetrans_stack_with_the_kernel_equals_xla():
    """A two-layer pyramid stack (S queries shrinking 12 -> 4, then NS only), forward and every
    parameter's gradient, right-aligned sequences of lengths 12, 5 and 0."""
    from flax import nnx

    from scaling.models.onetrans_block import OneTransStack

    rng = np.random.default_rng(4)
    b, length, n, dim = 3, 12, 3, 16
    s = jnp.asarray(rng.normal(size=(b, length, dim)), jnp.float32)
    ns = jnp.asarray(rng.normal(size=(b, n, dim)), jnp.float32)
    valid = jnp.arange(length)[None, :] >= jnp.asarray([0, 7, 12])[:, None]
    s = jnp.where(valid[..., None], s, 0.0)
    probe = jnp.asarray(rng.normal(size=(b, n, dim)), jnp.float32)  # (a sum of squares of RMS-normed rows is flat)
    results = {}
    for impl in ("pallas", "xla"):
        stack = OneTransStack(3, dim, 2, 32, n, (12, 4, 3), attention_impl=impl, rngs=nnx.Rngs(0))
        loss = lambda model: jnp.sum(model(s, ns, valid) * probe)  # noqa: E731
        results[impl] = (stack(s, ns, valid), nnx.state(nnx.grad(loss)(stack), nnx.Param))
    np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5, atol=1e-5)
    got, want = jax.tree.leaves(results["pallas"][1]), jax.tree.leaves(results["xla"][1])
    assert len(got) == len(want) > 10
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(float(jnp.abs(w).max()), 1e-6))


def test_equals_jax_nn_dot_product_attention():
    """An independent reference: JAX's own attention (its XLA path), causal with key lengths,
    equals the kernel with key_end = the lengths, forward and gradients (every row sees key 0)."""
    (q, k, v), cot = _inputs(3, 40, 40, 2, 16, 16, seed=7)
    lengths = jnp.asarray([40, 23, 1], jnp.int32)

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                            implementation="xla")

    def ours(q, k, v):
        return pallas_flash_mha(q, k, v, jnp.zeros_like(lengths), lengths, blocks=SMALL, interpret=INTERPRET)

    def out_and_grads(fn):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(cot))

    for name, g, w in zip(("out", "dq", "dk", "dv"), out_and_grads(ours), out_and_grads(theirs)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(np.asarray(w)).max()), err_msg=name)
