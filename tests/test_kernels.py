"""Pallas kernels (scaling/kernels/) against their jnp references, in interpret mode on CPU.

Tolerances: fp32, forward and every gradient within rtol 1e-5 of the reference (atol 1e-5 of the
tensor's largest entry: the kernels sum in a different order). bf16: both the kernel and the bf16
XLA reference are measured against an fp32 reference on the same bf16-rounded inputs, and the
kernel's max error must be at most 2x the XLA reference's own plus 1e-3 of the scale (the kernel
accumulates in fp32 where XLA's bf16 einsums round intermediates, so it is usually the smaller).
Lengths cover 0, 1, exactly a block (16), a non-multiple of the block and the full padded width;
candidates cover none, a lone candidate and several.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.triton_ir import abstract_h100
from scaling.kernels.dispatch import selected_impl
from scaling.kernels.fm_block import fm_block
from scaling.kernels.hstu_attention import Blocks, candidate_mha, hstu_mha
from scaling.models.hstu_attention import candidate_attention, candidate_bias

N, HEADS, DIM, NUM_BUCKETS = 40, 2, 8, 32
LENGTHS = (0, 1, 16, 37, 40)
SMALL = Blocks.uniform(16)
# BM != BN in every kernel
MIXED = Blocks(block_q=32, block_k=16, dkdv_block_q=16, dkdv_block_k=32, dq_block_q=32, dq_block_k=16)


def _hstu_inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    q, k, v = (jnp.asarray(rng.normal(size=(b, N, HEADS, DIM)), dtype) for _ in range(3))
    gaps = rng.integers(0, 40_000, size=(b, N))  # spans buckets 0..35: several are clamped to 32
    ts = jnp.asarray(1_600_000_000 + np.cumsum(gaps, axis=1), jnp.int32)
    pos_w = jnp.asarray(rng.normal(size=2 * N - 1), jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=NUM_BUCKETS + 1), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, N, HEADS, DIM)), dtype)
    return (q, k, v, pos_w, ts_w), ts, cot


def _vjp(impl, blocks, lengths, ts, cot, candidates=None, bias=True):
    """jit(inputs -> (out, grads of <out, cot> w.r.t. q, k, v, pos_w, ts_w))."""

    def run(q, k, v, pos_w, ts_w):
        def f(q, k, v, pos_w, ts_w):
            extra = dict(pos_w=pos_w, ts_w=ts_w, timestamps=ts) if bias else {}
            return hstu_mha(q, k, v, lengths, norm=float(N), num_candidates=candidates, impl=impl,
                            blocks=blocks, **extra)

        out, pullback = jax.vjp(f, q, k, v, pos_w, ts_w)
        return out, pullback(cot)

    return jax.jit(run)


def _close(actual, expected, rtol=1e-5, name=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(np.abs(expected).max(), 1e-6),
                               err_msg=name)


@pytest.mark.parametrize("candidates, blocks", [(None, SMALL), ((0, 1, 3, 5, 2), MIXED)])
def test_hstu_kernel_matches_reference_fp32(candidates, blocks):
    args, ts, cot = _hstu_inputs()
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    cands = None if candidates is None else jnp.asarray(candidates, jnp.int32)
    out, grads = _vjp("pallas", blocks, lengths, ts, cot, cands)(*args)
    ref_out, ref_grads = _vjp("xla", blocks, lengths, ts, cot, cands)(*args)
    _close(out, ref_out)
    for name, g, r in zip(("q", "k", "v", "pos_w", "ts_w"), grads, ref_grads):
        assert np.abs(np.asarray(r)).max() > 0, name  # every input really receives a gradient
        _close(g, r, name=name)
    # rows past a length are zero, as the reference's
    valid = np.arange(N)[None, :] < np.asarray(LENGTHS)[:, None]
    assert np.all(np.asarray(out)[~valid] == 0)


@pytest.mark.parametrize("blocks", [
    Blocks.uniform(16, heads_per_program=1),
    Blocks.uniform(16, heads_per_program=2),
    Blocks.uniform(16, heads_per_program=4),  # every head in one program: dK/dV writes d rab
    # dK/dV with fewer heads per program than the forward and dQ (so dbias runs), and the dbias
    # kernel on its own 32-key tile (the widest block) beside dK/dV's 16
    Blocks(32, 16, 16, 16, 16, 16, heads_per_program=4, dkdv_heads_per_program=2),
    Blocks(16, 16, 16, 16, 32, 16, heads_per_program=2, dkdv_heads_per_program=1),
], ids=["g1", "g2", "g4", "g4-kv2", "g2-kv1"])
def test_head_groups_share_the_bias_and_match_the_reference(blocks):
    """4 heads, G per program: the bias tile is computed once per program for its heads. With
    dK/dV's G below 4 the dbias kernel sums dS over all 4 heads; with 4 (every head in one
    program) dK/dV writes the bias gradient itself."""
    rng = np.random.default_rng(7)
    b, n, h, d = 3, 40, 4, 8
    q, k, v, cot = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(4))
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 40_000, size=(b, n)), axis=1), jnp.int32)
    pos_w, ts_w = (jnp.asarray(rng.normal(size=m), jnp.float32) for m in (2 * n - 1, NUM_BUCKETS + 1))
    lengths, cands = jnp.asarray((40, 17, 1), jnp.int32), jnp.asarray((3, 0, 1), jnp.int32)

    def vjp(impl):
        def f(q, k, v, pos_w, ts_w):
            return hstu_mha(q, k, v, lengths, norm=float(n), pos_w=pos_w, ts_w=ts_w, timestamps=ts,
                            num_candidates=cands, impl=impl, blocks=blocks)

        out, pullback = jax.vjp(f, q, k, v, pos_w, ts_w)
        return out, pullback(cot)

    (out, grads), (ref_out, ref_grads) = jax.jit(lambda: vjp("pallas"))(), jax.jit(lambda: vjp("xla"))()
    _close(out, ref_out)
    for name, g, r in zip(("q", "k", "v", "pos_w", "ts_w"), grads, ref_grads):
        _close(g, r, name=name)


def test_blocks_resolve_heads_per_program_and_tiles():
    # (forward BQ, BK, dK/dV BQ, BK, dQ BQ, BK, G, dK/dV's G): the stationary side of each kernel
    # (forward and dQ: BQ, dK/dV: BK) at 64 wherever that fits (Blocks' table)
    assert Blocks().resolve(4, 64, has_bias=False) == (64, 64, 64, 64, 64, 64, 1, 1)
    assert Blocks().resolve(4, 128, has_bias=False) == (64, 64, 32, 64, 64, 32, 1, 1)
    assert Blocks().resolve(4, 64, has_bias=True) == (64, 32, 16, 64, 64, 32, 2, 2)  # G = 2: smaller tiles
    # two heads of 128 fit dK/dV only on mma.sync tiles: dK/dV takes one head per program...
    assert Blocks().resolve(8, 128, has_bias=True) == (64, 32, 32, 64, 64, 16, 2, 1)
    # ... unless G is every head (dK/dV then writes the bias gradient: no dbias kernel)
    assert Blocks().resolve(2, 128, has_bias=True) == (64, 32, 32, 32, 64, 16, 2, 2)
    assert Blocks(dkdv_heads_per_program=2).resolve(8, 128, has_bias=True) == (64, 32, 32, 32, 64, 16, 2, 2)
    assert Blocks().resolve(2, 32, has_bias=True) == (64, 64, 64, 64, 64, 64, 1, 1)  # G = 1 at d <= 32
    assert Blocks(heads_per_program=2).resolve(2, 32, has_bias=True) == (64, 32, 16, 64, 64, 16, 2, 2)
    assert Blocks().resolve(3, 128, has_bias=True).heads_per_program == 1  # 2 does not divide 3
    assert Blocks(heads_per_program=3).program_heads(8, 16, has_bias=False) == 2
    assert Blocks(16, heads_per_program=1).resolve(2, 32, has_bias=True) == (16, 64, 64, 64, 64, 64, 1, 1)
    assert Blocks(dq_block_k=16).resolve(4, 64, has_bias=False) == (64, 64, 64, 64, 64, 16, 1, 1)  # one field
    # float32 inputs: one head per program and narrower streamed blocks (the bf16 tiles spill in fp32)
    assert Blocks().resolve(8, 128, has_bias=True, itemsize=4) == (64, 32, 32, 16, 64, 16, 1, 1)
    assert Blocks().resolve(8, 64, has_bias=True, itemsize=4) == (64, 32, 16, 64, 64, 16, 1, 1)
    assert Blocks(64, heads_per_program=2).resolve(8, 64, has_bias=True, itemsize=4) == (64, 32, 32, 16, 32, 16, 2, 2)
    with jax.default_matmul_precision("highest"):  # IEEE fp32 dots: no tensor-core path, small tiles
        assert Blocks().resolve(8, 64, has_bias=True, itemsize=4) == (32, 32, 32, 16, 32, 16, 1, 1)
    assert Blocks.uniform(32, heads_per_program=2) == Blocks(32, 32, 32, 32, 32, 32, heads_per_program=2)
    with pytest.raises(ValueError, match="dq_block_k"):
        Blocks(dq_block_k=48)
    with pytest.raises(ValueError, match="dkdv_heads_per_program"):
        Blocks(dkdv_heads_per_program=0)
    with pytest.raises(ValueError, match="heads_per_program"):
        Blocks(heads_per_program=0)


def test_hstu_kernel_without_bias():
    args, ts, cot = _hstu_inputs(seed=1)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    out, grads = _vjp("pallas", SMALL, lengths, ts, cot, bias=False)(*args)
    ref_out, ref_grads = _vjp("xla", SMALL, lengths, ts, cot, bias=False)(*args)
    _close(out, ref_out)
    for g, r in zip(grads[:3], ref_grads[:3]):
        _close(g, r)


def _err(x, ref):
    return float(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64)).max())


@pytest.mark.parametrize("group", [1, 2])  # 2: both heads in one program, dK/dV writes the bias gradient
def test_hstu_kernel_bf16_within_the_xla_reference_error(group):
    args, ts, cot = _hstu_inputs(jnp.bfloat16, seed=2)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    cands = jnp.asarray((0, 0, 2, 1, 0), jnp.int32)
    up = [a.astype(jnp.float32) for a in args]
    exact = _vjp("xla", SMALL, lengths, ts, cot.astype(jnp.float32), cands)(*up)
    kernel = _vjp("pallas", dataclasses.replace(SMALL, heads_per_program=group), lengths, ts, cot, cands)(*args)
    xla = _vjp("xla", SMALL, lengths, ts, cot, cands)(*args)
    assert kernel[0].dtype == jnp.bfloat16 and kernel[1][0].dtype == jnp.bfloat16
    pairs = [(kernel[0], xla[0], exact[0])] + list(zip(kernel[1], xla[1], exact[1]))
    for name, (got, base, ref) in zip(("out", "q", "k", "v", "pos_w", "ts_w"), pairs):
        scale = float(np.abs(np.asarray(ref, np.float64)).max())
        assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3 * scale, name


@pytest.mark.parametrize("log_error", [0.0, 1e-5, -1e-5, 3e-6])
def test_in_kernel_time_bucket_equals_the_reference_at_every_edge(monkeypatch, log_error):
    """The kernel's bucket (a cheap log estimate, biased low, + one edge check) is `time_buckets`
    exactly at every edge gap -1, 0, +1 and at 1, also when the log estimate is off by 1e-5 either
    way (the GPU's lg2.approx.f32 is within ~2^-22 relative; an error past the 1.5e-5 bias in the
    upward direction, e.g. +1e-4, gives wrong buckets: checked by hand)."""
    from scaling.kernels import hstu_bias
    from scaling.models.hstu_attention import BUCKET_EDGES, time_buckets

    if log_error:
        monkeypatch.setattr(hstu_bias, "_log2", lambda x, interpret: jnp.log2(x) * (1 + log_error))
    gaps = np.unique(np.clip(np.concatenate([[0, 1], *[[e - 1, e, e + 1] for e in BUCKET_EDGES]]), 0, 2**31 - 2))
    num_buckets = 128  # no clamping: every bucket index shows
    ts_w = jnp.arange(num_buckets + 1, dtype=jnp.float32)
    got = hstu_bias.tile_bias(jnp.zeros(1, jnp.float32), ts_w, hstu_bias.edges_table(), jnp.zeros((1, 1), jnp.int32),
                              jnp.zeros((1, 1), jnp.int32), jnp.asarray(gaps, jnp.int32)[:, None],
                              jnp.zeros((1, 1), jnp.int32), num_pos=1, num_buckets=num_buckets, interpret=True)
    # the reference on [1, 2] timelines: query time = the gap, key time = 0
    timelines = np.stack([np.zeros_like(gaps), gaps], axis=1).astype(np.int32)
    want = time_buckets(jnp.asarray(timelines), num_buckets)[:, 0, 0]
    np.testing.assert_array_equal(np.asarray(got)[:, 0].astype(np.int32), np.asarray(want))


def test_candidates_see_the_history_and_themselves_as_mfalcon_does():
    """The kernel's candidate rows equal M-FALCON's reference `candidate_attention`."""
    rng = np.random.default_rng(3)
    b, hist, m, max_len = 3, 24, 5, 32
    n = np.array([24, 1, 16])
    kh, vh = (jnp.asarray(rng.normal(size=(b, hist, HEADS, DIM)), jnp.float32) for _ in range(2))
    q, k, v = (jnp.asarray(rng.normal(size=(b, m, HEADS, DIM)), jnp.float32) for _ in range(3))
    ts = jnp.asarray(1_000 + np.cumsum(rng.integers(0, 5000, size=(b, hist)), axis=1), jnp.int32)
    now = ts[:, -1] + 7
    pos_w = jnp.asarray(rng.normal(size=2 * max_len - 1), jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=NUM_BUCKETS + 1), jnp.float32)
    lengths = jnp.asarray(n, jnp.int32)
    rab_hist, rab_self = candidate_bias(pos_w, ts_w, ts, lengths, now)
    expected = candidate_attention(q, k, v, kh, vh, rab_hist, rab_self, lengths, 32.0)
    call = functools.partial(candidate_mha, norm=32.0, rab_hist=rab_hist, rab_self=rab_self, pos_w=pos_w,
                             ts_w=ts_w, timestamps=ts, request_time=now, blocks=SMALL)
    _close(jax.jit(functools.partial(call, impl="pallas"))(q, k, v, kh, vh, lengths), expected)
    assert np.array_equal(call(q, k, v, kh, vh, lengths, impl="xla"), expected)


def test_dispatch_picks_xla_off_gpu_under_jit_and_grad():
    assert selected_impl("auto", "cpu") == "xla" and selected_impl("auto", "tpu") == "xla"
    assert selected_impl("auto", "cuda") == "pallas" and selected_impl("xla", "cuda") == "xla"
    assert selected_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError):
        selected_impl("triton")
    args, ts, cot = _hstu_inputs(seed=4)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU lowering")
    lowered = _vjp("auto", SMALL, lengths, ts, cot).lower(*args).as_text()
    assert "triton" not in lowered and "pallas" not in lowered
    auto, xla = _vjp("auto", SMALL, lengths, ts, cot)(*args), _vjp("xla", SMALL, lengths, ts, cot)(*args)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(xla)):
        np.testing.assert_array_equal(a, b)


def _cuda_lowering(fn, *shapes):
    """StableHLO text of fn lowered for an abstract H100 (no GPU needed), or skip."""
    try:
        mesh = jax.sharding.AbstractMesh((), (), abstract_device=abstract_h100())
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    except (AttributeError, TypeError) as err:  # an older/newer JAX without cross-platform lowering
        pytest.skip(f"cannot cross-lower for CUDA on this JAX: {err}")


def _abstract_hstu_loss(b: int, n: int, h: int, d: int, blocks: Blocks | None = None):
    """(loss of `auto` HSTU attention with both bias tables, its abstract bf16 arguments)."""
    s = jax.ShapeDtypeStruct
    qkv = [s((b, n, h, d), jnp.bfloat16)] * 3
    ints, tables = [s((b,), jnp.int32), s((b, n), jnp.int32)], [s((2 * n - 1,), jnp.float32), s((129,), jnp.float32)]

    def loss(q, k, v, pos_w, ts_w, lengths, ts):
        out = hstu_mha(q, k, v, lengths, norm=float(n), pos_w=pos_w, ts_w=ts_w, timestamps=ts, impl="auto",
                       blocks=blocks)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return loss, (*qkv, *tables, *ints)


def test_kernels_lower_to_triton_for_a_gpu():
    """`auto` lowers to Triton custom calls for CUDA: the Pallas -> Triton-IR step runs here, on
    CPU (Triton -> PTX, e.g. register limits, needs a GPU). Non-power-of-two head dims are padded.
    With every head in one program (the default here) dK/dV writes the bias gradient; with one head
    per program a separate dbias kernel does."""
    s = jax.ShapeDtypeStruct
    one_head = Blocks(heads_per_program=1)
    for blocks, kernels in ((None, ("fwd", "dkdv", "dq")), (one_head, ("fwd", "dkdv", "dq", "dbias"))):
        loss, args = _abstract_hstu_loss(2, 200, 2, 50, blocks)
        text = _cuda_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
        for kernel in kernels:
            assert f"hstu_attention_{kernel}" in text, kernel
        assert text.count("__gpu$xla.gpu.triton") == len(kernels)

    def fm_loss(x, y, scale, bias):
        return jnp.sum(fm_block(x, y, scale, bias, impl="auto").astype(jnp.float32) ** 2)

    fm_shapes = [s((64, 27, 16), jnp.bfloat16), s((27, 12), jnp.float32), s((324,), jnp.float32),
                 s((324,), jnp.float32)]
    text = _cuda_lowering(jax.value_and_grad(fm_loss, argnums=(0, 1, 2, 3)), *fm_shapes)
    assert "wukong_fm_block_fwd" in text and "wukong_fm_block_bwd" in text


def test_full_tiles_do_no_masking_no_division_and_one_hardware_tanh():
    """The Triton IR of the bf16 kernels (benchmarks/kernel_ir.py): the first loop of the forward
    and dQ kernels and the middle loop of dK/dV walk tiles every row sees whole: no select, no
    compare, no IEEE division, no libdevice call, one tanh.approx per element (the masked loops
    keep their selects)."""
    from benchmarks.kernel_ir import measure

    loops = measure(256, 64, 32, bias=False)
    full = {"hstu_attention_fwd": loops["hstu_attention_fwd"][0], "hstu_attention_dq": loops["hstu_attention_dq"][0],
            "hstu_attention_dkdv": loops["hstu_attention_dkdv"][1]}
    for name, ops in full.items():
        assert ops["select"] == ops["int_compare"] == ops["ieee_div"] == ops["libdevice"] == 0, (name, ops)
        assert ops["hw_approx"] == 1, (name, ops)
    assert all(loop["select"] >= 1 for loop in loops["hstu_attention_fwd"][1:]), loops["hstu_attention_fwd"]
    assert full["hstu_attention_fwd"]["tile_ops"] <= 6, full  # measured: 5 (two scalings, tanh, fma, cast)


def test_two_heads_per_program_compute_the_bias_tile_once():
    """With the bias, the whole-tile loops of a program holding 2 heads do the bias's ~31 tile ops
    once: 2 heads cost far less than twice one head (kernel_ir at L=512, d=128: forward 36 -> 42,
    dQ 42 -> 54, dK/dV 43 -> 67, which includes summing and storing the bias gradient: with both
    heads in one program dK/dV writes it and the dbias kernel is gone)."""
    from benchmarks.kernel_ir import measure

    one, two = measure(256, 64, 32, bias=True, group=1), measure(256, 64, 32, bias=True, group=2)
    assert "hstu_attention_dbias" in one and "hstu_attention_dbias" not in two
    for name, loop in (("hstu_attention_fwd", 0), ("hstu_attention_dq", 0), ("hstu_attention_dkdv", 1)):
        ops1, ops2 = one[name][loop]["tile_ops"], two[name][loop]["tile_ops"]
        assert ops2 <= 2 * ops1 - 15, (name, ops1, ops2)  # the bias tile once, not twice


def test_kernel_profile_sums_device_stream_time_per_kernel(tmp_path):
    """benchmarks/kernel_profile.py reads a Perfetto trace: only the GPU's stream lines count (the
    derived "XLA Ops" line repeats each kernel), Python frames never do, and Triton's decorated
    kernel names map to the Pallas kernels."""
    import gzip
    import json

    from benchmarks.kernel_profile import device_times, kernel_of

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}}]
    events = [{"ph": "X", "pid": 1, "tid": 7, "name": "hstu_attention_dkdv_0d1d2d", "dur": 300.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "hstu_attention_dq", "dur": 200.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "loop_reduce_fusion", "dur": 50.0},
              {"ph": "X", "pid": 1, "tid": 8, "name": "hstu_attention_dq", "dur": 200.0},
              {"ph": "X", "pid": 2, "tid": 1, "name": "$train.py:10 step", "dur": 900.0}]
    (tmp_path / "plugins").mkdir()
    with gzip.open(tmp_path / "plugins" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    totals, source = device_times(str(tmp_path))
    assert source == "GPU streams"
    assert totals == {"hstu_attention_dkdv_0d1d2d": 300.0, "hstu_attention_dq": 200.0, "loop_reduce_fusion": 50.0}
    assert kernel_of("hstu_attention_dkdv_0d1d2d") == "hstu_attention_dkdv"
    assert kernel_of("hstu_attention_dq") == "hstu_attention_dq" and kernel_of("loop_reduce_fusion") is None
    # the Mosaic GPU kernels' CUDA names; dk is a prefix of dkdv
    assert kernel_of("hstu_mgpu_dkdv_mosaic_gpu_kernel") == "hstu_mgpu_dkdv"
    assert kernel_of("hstu_mgpu_dk_mosaic_gpu_kernel") == "hstu_mgpu_dk"


# ------------------------------------------------------------------------------------------------
# The FM block's inputs and VJP (its tests: tests/test_fm_block.py; the mesh tests below use them too)


def _fm_inputs(b, n, d, k, dtype, seed=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, n, d)), dtype)
    y = jnp.asarray(rng.normal(size=(n, k)) / np.sqrt(n), jnp.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=n * k), jnp.float32)
    bias = jnp.asarray(0.3 * rng.normal(size=n * k), jnp.float32)
    return (x, y, scale, bias), jnp.asarray(rng.normal(size=(b, n * k)), dtype)


def _fm_vjp(impl, cot):
    def run(*args):
        out, pullback = jax.vjp(functools.partial(fm_block, eps=1e-5, impl=impl, block_b=4), *args)
        return out, pullback(cot)

    return jax.jit(run)



# ------------------------------------------------------------------------------------------------
# The models with the kernels switched on (the `attention_impl` / `fm_impl` / `norm_impl` knobs)


def test_impl_knobs_are_typed_config_fields():
    from scaling.config import ModelConfig
    from scaling.config_schema import ConfigError, build

    hstu = dict(name="hstu", embed_dim=8, num_heads=1, qk_dim=8, v_dim=8, max_len=8)
    assert build(ModelConfig, hstu).attention_impl == "auto"
    assert build(ModelConfig, {**hstu, "attention_impl": "pallas"}).attention_impl == "pallas"
    assert build(ModelConfig, {"name": "hstu_ranker", "attention_impl": "xla"}).attention_impl == "xla"
    assert build(ModelConfig, {"name": "wukong", "fm_impl": "pallas"}).fm_impl == "pallas"
    assert build(ModelConfig, {"name": "wukong", "norm_impl": "xla"}).norm_impl == "xla"
    assert build(ModelConfig, {**hstu, "norm_impl": "pallas"}).norm_impl == "pallas"
    assert build(ModelConfig, {"name": "hstu_ranker", "norm_impl": "xla"}).norm_impl == "xla"
    with pytest.raises(ConfigError, match="attention_impl"):
        build(ModelConfig, {**hstu, "attention_impl": "triton"})


def _hstu_model(impl: str, **overrides):
    """A 2-layer HSTU encoder with `attention_impl=impl` (and config `overrides`), its projection
    scaled up and both bias tables random so that scores are of order 1 and the biases matter."""
    from flax import nnx

    from scaling.data.spec import SequenceSpec
    from scaling.models.hstu import HSTU, HSTUConfig

    base = dict(embed_dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, max_len=20, num_buckets=32, dropout=0.0,
                attention_impl=impl)
    model = HSTU(HSTUConfig(**{**base, **overrides}), SequenceSpec(num_items=30, num_negatives=0), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(8)
    for block in model.blocks:
        block.w_uvqk[...] = 10.0 * block.w_uvqk[...]
        block.pos_w[...] = jnp.asarray(rng.standard_normal(block.pos_w.shape), jnp.float32)
        block.ts_w[...] = jnp.asarray(rng.standard_normal(block.ts_w.shape), jnp.float32)
    return model


def _hstu_batch():
    """(items, timestamps, lengths): 3 sequences of 20, 7 and 1 events (padding 0)."""
    rng = np.random.default_rng(9)
    lengths = jnp.asarray([20, 7, 1], jnp.int32)
    items = jnp.asarray(rng.integers(1, 31, size=(3, 20)) * (np.arange(20)[None] < np.asarray(lengths)[:, None]),
                        jnp.int32)
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 100_000, size=(3, 20)), axis=1), jnp.int32)
    return items, ts, lengths


def _encoder_loss_and_grads(model, batch):
    """(sum(sin(3 encode(batch))), its gradient state) of an HSTU model."""
    from flax import nnx

    items, ts, lengths = batch
    return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(3.0 * m.encode(items, ts, lengths))))(model)


def _assert_same_loss_and_block_grads(got, want):
    """Equal losses and every block parameter's gradient (incl. both bias tables), rtol 2e-5."""
    from flax import nnx

    (value, grads), (ref_value, ref_grads) = got, want
    _close(value, ref_value)
    flat, ref_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(ref_grads))
    for path in [p for p in ref_flat if "blocks" in p]:
        _close(flat[path][...], ref_flat[path][...], rtol=2e-5, name=str(path))


def test_hstu_model_forward_and_gradients_with_pallas_equal_xla():
    from flax import nnx

    run = nnx.jit(functools.partial(_encoder_loss_and_grads, batch=_hstu_batch()))
    _assert_same_loss_and_block_grads(run(_hstu_model("pallas")), run(_hstu_model("xla")))


def test_mfalcon_scores_with_pallas_equal_xla():
    from flax import nnx

    from scaling.models.hstu_mfalcon import mfalcon_scores

    rng = np.random.default_rng(10)
    lengths = jnp.asarray([19, 5], jnp.int32)
    items = jnp.asarray(rng.integers(1, 31, size=(2, 19)), jnp.int32)
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 100_000, size=(2, 19)), axis=1), jnp.int32)
    request = ts[:, -1] + 50
    candidates = jnp.asarray(rng.integers(1, 31, size=(2, 6)), jnp.int32)
    score = nnx.jit(mfalcon_scores, static_argnames="micro_batch")
    models = [_hstu_model(impl) for impl in ("pallas", "xla")]
    for model in models:
        model.eval()
    got, expected = (score(m, items, ts, lengths, request, candidates, micro_batch=4) for m in models)
    _close(got, expected)


# ------------------------------------------------------------------------------------------------
# Meshes (scaling/kernels/sharded.py). The 8-device numerics run in a subprocess:
# tests/test_kernels_sharded.py. Here: which axes a kernel is mapped over, and nothing changes
# without a multi-device mesh.

_AXES = ("data", "fsdp", "tensor")


def _abstract_mesh(shape, device=None):
    from jax.sharding import AbstractMesh, AxisType

    extra = {} if device is None else {"abstract_device": device}
    return AbstractMesh(shape, _AXES, axis_types=(AxisType.Auto,) * 3, **extra)


def test_kernels_map_the_batch_over_data_then_fsdp_and_heads_over_tensor_by_the_layout():
    from scaling.kernels.sharded import mapped_axes
    from scaling.sharding.rules import load_layout, use_rules

    assert mapped_axes({"batch": 8}, _abstract_mesh((1, 1, 1))) == {}  # one device: called as is
    mesh = _abstract_mesh((4, 2, 1))
    assert mapped_axes({"batch": 8, "heads": 2}, mesh) == {"batch": ("data", "fsdp")}  # no rules: heads whole
    assert mapped_axes({"batch": 4}, mesh) == {"batch": ("data",)}  # only what divides the batch
    assert mapped_axes({"batch": 6}, mesh) == {"batch": ("fsdp",)}
    assert mapped_axes({"batch": 3}, mesh) == {"batch": ()}  # replicated, still one kernel per device
    tp = _abstract_mesh((2, 2, 2))
    with use_rules(load_layout("fsdp_tp")):
        assert mapped_axes({"batch": 8, "heads": 4}, tp) == {"batch": ("data", "fsdp"), "heads": ("tensor",)}
        assert mapped_axes({"batch": 8, "heads": 3}, tp) == {"batch": ("data", "fsdp"), "heads": ()}
    with use_rules(load_layout("fsdp")):  # fsdp maps heads to fsdp/data, which the batch holds: heads whole
        assert mapped_axes({"batch": 8, "heads": 4}, tp) == {"batch": ("data", "fsdp")}


def test_a_one_device_mesh_runs_the_kernel_unmapped():
    from jax.sharding import AxisType, Mesh

    args, ts, cot = _hstu_inputs(seed=12)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    fm_args, fm_cot = _fm_inputs(8, 5, 4, 3, jnp.float32)
    unmapped = _vjp("pallas", SMALL, lengths, ts, cot)(*args)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), _AXES, axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        for fn, fargs in ((_vjp("pallas", SMALL, lengths, ts, cot), args), (_fm_vjp("pallas", fm_cot), fm_args)):
            assert "shard_map" not in str(fn.trace(*fargs).jaxpr)
        on_mesh = _vjp("pallas", SMALL, lengths, ts, cot)(*args)
    for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(unmapped)):
        np.testing.assert_array_equal(a, b)


def test_kernels_lower_per_device_on_an_8_gpu_mesh():
    """`auto` on an abstract 4 x 2 mesh of H100s lowers each Triton kernel once, inside a manual
    (shard_map) computation: the compiled path with check_vma on, forward and backward."""
    s = jax.ShapeDtypeStruct
    loss, args = _abstract_hstu_loss(8, 96, 2, 32)

    def fm_loss(x, y, scale, bias):
        return jnp.sum(fm_block(x, y, scale, bias, impl="auto").astype(jnp.float32) ** 2)

    try:
        mesh = _abstract_mesh((4, 2, 1), abstract_h100())
    except (AttributeError, TypeError) as err:
        pytest.skip(f"cannot build an abstract GPU mesh on this JAX: {err}")
    fm_shapes = [s((64, 27, 16), jnp.bfloat16), s((27, 12), jnp.float32), s((324,), jnp.float32), s((324,), jnp.float32)]
    with jax.sharding.use_abstract_mesh(mesh):
        hstu_text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
        fm_text = jax.jit(jax.value_and_grad(fm_loss, argnums=(0, 1, 2, 3))).trace(*fm_shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    # HSTU: forward, dK/dV, dQ, dbias (d = 32: one head per program)
    assert hstu_text.count("__gpu$xla.gpu.triton") == 4 and fm_text.count("__gpu$xla.gpu.triton") == 2
    for text in (hstu_text, fm_text):
        assert "sdy.manual_computation" in text
