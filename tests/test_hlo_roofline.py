"""The HLO roofline (benchmarks/hlo_roofline.py) and the GPU compile report around it
(benchmarks/gpu_aot.py): FLOPs, bytes, kinds and source lines of a hand-written GPU module whose
every figure is computed by hand, and of a program XLA compiled here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.gpu_aot import has_cuda_plugin, launch_params, main as gpu_aot_main
from benchmarks.gpu_targets import GPUS, causal_pair_fraction, gpu_of, pallas_bytes, pallas_flops
from benchmarks.hlo_roofline import roofline, top_sources, type_bytes
from benchmarks.triton_ir import captured
from scaling.kernels.fm_block import fm_block

# A module as XLA's GPU compiler prints it: a Triton gemm fusion, a loop fusion slicing an
# elementwise chain, a reduction of a converted slice, a gather, an all-reduce, an in-place dynamic-update-slice, a Pallas (Triton) custom call,
# a Pallas Mosaic GPU one (its name in its op_name),
# and the stack-frame tables (frame 2 is Flax's, called from frame 1, the project's).
MODULE = """HloModule jit_step, is_scheduled=true

FileNames
1 "/home/u/project/scaling/models/foo.py"
2 "/usr/lib/site-packages/flax/nnx/nn/linear.py"

FunctionNames
1 "Foo.__call__"
2 "Linear.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=99 end_line=99 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}


%gemm (p0: bf16[64,128], p1: bf16[128,256]) -> bf16[64,256] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  ROOT %d = bf16[64,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%slice_exp (q0: bf16[64,256]) -> bf16[64,64] {
  %q0 = bf16[64,256]{1,0} parameter(0)
  %e = bf16[64,256]{1,0} exponential(%q0)
  ROOT %s = bf16[64,64]{1,0} slice(%e), slice={[0:64], [0:64]}
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %xy = f32[] add(%x, %y)
}

%rowsum (r0: bf16[64,256]) -> f32[64] {
  %r0 = bf16[64,256]{1,0} parameter(0)
  %c = f32[64,256]{1,0} convert(%r0)
  %sl2 = f32[64,64]{1,0} slice(%c), slice={[0:64], [0:64]}
  %zero = f32[] constant(0)
  ROOT %red = f32[64]{0} reduce(%sl2, %zero), dimensions={1}, to_apply=%sum
}

%lookup (t0: f32[1000,32], i0: s32[16,1]) -> f32[16,32] {
  %t0 = f32[1000,32]{1,0} parameter(0)
  %i0 = s32[16,1]{1,0} parameter(1)
  ROOT %g = f32[16,32]{1,0} gather(%t0, %i0), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,32}
}

%update (b0: f32[1000,32], u0: f32[16,32], s0: s32[]) -> f32[1000,32] {
  %b0 = f32[1000,32]{1,0} parameter(0)
  %u0 = f32[16,32]{1,0} parameter(1)
  %s0 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[1000,32]{1,0} dynamic-update-slice(%b0, %u0, %s0, %z)
}

ENTRY %main (a: bf16[64,128], b: bf16[128,256], t: f32[1000,32], i: s32[16,1], s: s32[], q: bf16[2,256,4,32]) -> (bf16[64,64], f32[64], f32[1000,32], bf16[2,256,4,32], bf16[2,256,4,32]) {
  %a = bf16[64,128]{1,0} parameter(0)
  %b = bf16[128,256]{1,0} parameter(1)
  %t = f32[1000,32]{1,0} parameter(2)
  %i = s32[16,1]{1,0} parameter(3)
  %s = s32[] parameter(4)
  %q = bf16[2,256,4,32]{3,2,1,0} parameter(5)
  %mm = bf16[64,256]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm, metadata={op_name="jit(step)/dot_general" stack_frame_id=2}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %sl = bf16[64,64]{1,0} fusion(%mm), kind=kLoop, calls=%slice_exp, metadata={op_name="jit(step)/slice" stack_frame_id=1}
  %rs = f32[64]{0} fusion(%mm), kind=kInput, calls=%rowsum
  %lk = f32[16,32]{1,0} fusion(%t, %i), kind=kInput, calls=%lookup
  %ar = f32[16,32]{1,0} all-reduce(%lk), replica_groups={}, to_apply=%sum
  %up = f32[1000,32]{1,0} fusion(%t, %ar, %s), kind=kLoop, calls=%update
  %k = bf16[2,256,4,32]{3,2,1,0} custom-call(%s, %s, %q, %q, /*index=4*/%q), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32, ir = "ML\\EFR(x)", name = "hstu_attention_fwd", num_warps = 4 : i32}
  %m = bf16[2,256,4,32]{3,2,1,0} custom-call(%q, %q, %q, %s, %s), custom_call_target="mosaic_gpu_v2", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(step)/hstu_mgpu_fwd/mpmd_map" stack_frame_id=1}, backend_config={kernel_hash = "\8A\8D"}
  ROOT %r = (bf16[64,64]{1,0}, f32[64]{0}, f32[1000,32]{1,0}, bf16[2,256,4,32]{3,2,1,0}, bf16[2,256,4,32]{3,2,1,0}) tuple(%sl, %rs, %up, %k, %m)
}
"""

PAIRS = 2 * 4 * 256 * 257 // 2  # B h N (N + 1) / 2 of q [2, 256, 4, 32]


def test_type_bytes_reads_arrays_and_tuples():
    assert type_bytes("bf16[64,128]{1,0}") == 64 * 128 * 2
    assert type_bytes("(f32[3]{0}, s32[], pred[8]{0})") == 12 + 4 + 8


def test_every_kernel_of_a_hand_written_module_is_counted_by_hand():
    report = roofline(MODULE, peak_flops=1e12, bandwidth=1e9, launch_s=1e-6, kernel_flops=pallas_flops(1.0),
                      collective_bandwidth=1e6)
    kernels = {k.name: k for k in report["kernels"]}
    assert set(kernels) == {"mm", "sl", "rs", "lk", "ar", "up", "hstu_attention_fwd", "hstu_mgpu_fwd"}  # tuple: free

    mm = kernels["mm"]
    assert (mm.kind, mm.flops) == ("matmul", 2 * 64 * 256 * 128)
    assert mm.bytes == 2 * (64 * 128 + 128 * 256 + 64 * 256)
    assert mm.source == "scaling/models/foo.py:10 Foo.__call__"  # past Flax's frame to the project's

    sl = kernels["sl"]  # the loop fusion computes only the slice: it reads 64 x 64 of the input
    assert (sl.kind, sl.flops, sl.bytes) == ("memory", 0, 2 * 64 * 64 * 2)

    rs = kernels["rs"]  # a reduction of a converted slice reads the slice
    assert (rs.kind, rs.bytes) == ("memory", 64 * 64 * 2 + 64 * 4)

    lk = kernels["lk"]  # the gather reads 16 rows of the table, not the table
    assert (lk.kind, lk.bytes) == ("gather/scatter", 16 * 32 * 4 + 16 * 4 + 16 * 32 * 4)

    ar = kernels["ar"]  # at the collective bandwidth
    assert (ar.kind, ar.bytes, ar.seconds) == ("collective", 2 * 16 * 32 * 4, 2 * 16 * 32 * 4 / 1e6)

    up = kernels["up"]  # in place: the update is read and written, the buffer is not
    assert up.bytes == 16 * 32 * 4 + 4 + 16 * 32 * 4

    k = kernels["hstu_attention_fwd"]
    assert (k.kind, k.flops) == ("pallas", 4 * 32 * PAIRS)
    assert k.bytes == 4 + 4 + 4 * (2 * 256 * 4 * 32 * 2)
    m = kernels["hstu_mgpu_fwd"]
    assert (m.kind, m.flops, m.bytes) == ("pallas", 4 * 32 * PAIRS, 4 + 4 + 4 * (2 * 256 * 4 * 32 * 2))
    assert m.source == "scaling/models/foo.py:10 Foo.__call__"

    for kernel in report["kernels"]:
        if kernel is not ar:
            assert kernel.seconds == max(kernel.flops / 1e12, kernel.bytes / 1e9, 1e-6)
    assert report["seconds"] == pytest.approx(sum(k.seconds for k in report["kernels"]))
    rest = report["seconds"] - ar.seconds
    assert report["seconds_overlapped"] == pytest.approx(max(rest, ar.seconds))
    assert report["by_kind"]["matmul"]["share"] == pytest.approx(mm.seconds / report["seconds"])
    [top, *_] = top_sources(report["kernels"], 2)
    assert top["seconds"] == max(k.seconds for k in report["kernels"])


def test_a_program_compiled_here_counts_its_dot_and_slice():
    def f(a, b, t, i):
        return jax.nn.gelu(a @ b)[:, :64], t[i]

    args = (jnp.ones((128, 256)), jnp.ones((256, 512)), jnp.ones((1000, 32)), jnp.arange(16))
    report = roofline(jax.jit(f).lower(*args).compile().as_text(), 1e12, 1e11)
    assert report["flops"] == 2 * 128 * 256 * 512
    by_kind = report["by_kind"]
    assert by_kind["matmul"]["kernels"] == 1
    assert by_kind["gather/scatter"]["bytes"] <= 2 * 16 * 32 * 4 + 16 * 4  # 16 rows, not the table


def test_pallas_flops_and_the_causal_pair_fraction():
    flops = pallas_flops(0.5)
    q = "bf16[2,256,4,32]{3,2,1,0}"
    assert flops("hstu_attention_dkdv", ["s32[2]", "s32[2]", q]) == 8 * 32 * PAIRS * 0.5
    assert flops("wukong_fm_block_bwd", ["bf16[64,16,32]", "bf16[16,16]"]) == 12 * 64 * 16 * 32 * 16
    assert flops("something_else", [q]) == 0.0
    # softmax attention (key_start, key_end, q [B, Nq, H, d], k, v): Nq = 2 queries ending at the
    # last of Nk = 3 keys see 2 + 3 pairs; forward 2 (d + dv) per pair
    kv = "bf16[2,3,4,32]{3,2,1,0}"
    assert flops("flash_attention_fwd", ["s32[2]", "s32[2]", "bf16[2,2,4,32]", kv, kv]) == 2 * 64 * 2 * 4 * 5
    assert flops("flash_attention_dkdv", ["s32[2]", "s32[2]", "bf16[2,2,4,32]", kv, kv]) == 4 * 64 * 2 * 4 * 5
    batch = {"items": jnp.zeros((2, 4), jnp.int32), "lengths": jnp.array([4, 2])}
    assert causal_pair_fraction(batch) == pytest.approx((10 + 3) / (2 * 10))
    assert causal_pair_fraction({"dense": jnp.zeros((2, 3))}) == 1.0


def test_pallas_bytes_count_the_sections_the_fused_projection_kernels_touch():
    """HSTU's packed backward: dK/dV reads 3 of pre's 4 sections and writes 3 of its result's, dQ
    reads pre's q section, never reads the buffer it updates in place and writes 1 section; every
    other kernel (no rank-5 operand) keeps the whole-operands count (None)."""
    ints, qkv, pre = "s32[2]{0}", "bf16[2,64,4,32]{3,2,1,0}", "bf16[2,64,4,4,32]{4,3,2,1,0}"
    section = 2 * 64 * 4 * 32 * 2  # one [B, N, h, d] bf16 tensor = one section of pre
    assert pallas_bytes("hstu_attention_dkdv", [ints, ints, qkv, qkv, qkv, qkv, pre, qkv], pre) == (
        16 + 4 * section + 3 * section + section + 3 * section)
    assert pallas_bytes("hstu_attention_dq", [ints, ints, qkv, qkv, qkv, qkv, pre, pre], pre) == (
        16 + 4 * section + section + 0 + section)
    assert pallas_bytes("hstu_attention_dkdv", [ints, ints, qkv, qkv, qkv, qkv], f"({qkv}, {qkv})") is None
    assert pallas_bytes("flash_attention_fwd", [pre], pre) is None


def test_the_target_config_names_the_gpu():
    text = GPUS["h100"].target_config()
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert gpu_of("NVIDIA H100 80GB HBM3") is GPUS["h100"] and gpu_of("NVIDIA H200") is GPUS["h200"]
    assert gpu_of("cpu") is None
    assert GPUS["h100"].peak_flops("bfloat16") == 989.4e12 and GPUS["h100"].peak_flops("float32") == 494.7e12


@pytest.mark.skipif(has_cuda_plugin(), reason="the CUDA plugin is installed")
def test_gpu_aot_without_the_cuda_plugin_says_what_to_install(capsys):
    assert gpu_aot_main(["--cases", "hstu"]) == 2
    assert "pip install -e '.[cuda12]'" in capsys.readouterr().err
    assert gpu_aot_main(["--cases", "nope"]) == 2
    assert gpu_aot_main(["--impls", "triton"]) == 2
    assert "--impls pallas, xla or mosaic (got triton)" in capsys.readouterr().err


def test_launch_params_and_every_distinct_triton_module_are_captured(tmp_path):
    text = ('%k = custom-call(), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32, '
            'name = "wukong_fm_block_fwd", num_stages = 2 : i32, num_warps = 8 : i32}')
    assert launch_params(text) == {"wukong_fm_block_fwd": (8, 2)}

    s = jax.ShapeDtypeStruct

    def two_blocks(x1, x2, y1, y2, scale1, scale2):  # two shapes: two modules of each kernel's name
        return (fm_block(x1, y1, scale1, scale1, impl="auto").sum() + fm_block(x2, y2, scale2, scale2, impl="auto").sum())

    shapes = (s((8, 5, 16), jnp.bfloat16), s((8, 20, 16), jnp.bfloat16), s((5, 3), jnp.float32),
              s((20, 3), jnp.float32), s((15,), jnp.float32), s((60,), jnp.float32))
    grad = jax.jit(jax.grad(two_blocks, argnums=(0, 1)))
    modules = captured(lambda: grad.trace(*shapes).lower(lowering_platforms=("cuda",)), str(tmp_path))
    assert sorted(modules) == ["wukong_fm_block_bwd", "wukong_fm_block_bwd#2", "wukong_fm_block_fwd",
                               "wukong_fm_block_fwd#2"]
    assert all(open(path).read().startswith("module") for path in modules.values())
