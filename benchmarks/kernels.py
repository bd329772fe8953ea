"""Kernel benchmark: the Pallas HSTU attention, Wukong FM block and softmax attention against
their XLA references.

    python -m benchmarks.kernels [--out FILE] [--smoke] [--lengths 512,1024,2048,4096,8192]
                                 [--dims 128,64] [--tokens 32768] [--heads 4] [--iters 20]
                                 [--ops hstu,projection,fm,norm,flash] [--impls pallas,xla] [--block-q 64 --block-k 64
                                 --dkdv-block-q 32 --dkdv-block-k 64 --dq-block-q 64 --dq-block-k 32
                                 --heads-per-program 2 --dkdv-heads-per-program 1 --num-warps 8 --num-stages 2]

The tile flags set the HSTU kernel's `Blocks` (each left at 0 takes the library's default for the
head dim and heads per program, see `Blocks`); benchmarks/tile_sweep.py times several settings in
one process.

HSTU attention, bf16, the model's configuration (relative position + time-bucket bias, divide by
N, causal): for each sequence length L and head dim d, B = tokens / L full-length sequences (a
fixed number of tokens, so the per-token work grows with L), the forward and the forward +
backward (gradients for q, k, v and both bias tables) of `impl=pallas` and `impl=xla`. Time is
wall clock per call after a warm-up (jit, block_until_ready), median of `--iters` calls.

FLOPs, the same "model FLOPs" for both implementations (so TFLOP/s compare useful work):
  forward          = 2 matmuls (Q K^T and P V) x 2 d multiply-add FLOPs per attended pair
                     x B h L (L + 1) / 2 pairs: the causal triangle with its diagonal, what a
                     kernel that skips masked blocks computes. The XLA reference computes the
                     full L x L square (twice that) and the kernel's diagonal blocks are half
                     masked; neither is credited. Pointwise work (SiLU, bias, mask) not counted.
  forward+backward = 3.5 x forward: the backward counts 5 matmul passes (recomputed S, dV, dP,
                     dQ, dK) = 2.5 x forward, FlashAttention-2's convention. The kernel actually
                     runs 9 passes in its backward (dK/dV: 4, dQ: 3, head-summed dbias: 2), 7
                     when one program holds every head (dK/dV then sums the bias gradient).
The roofline is a bf16 8192^3 matmul measured in the same run (`matmul_bf16_tflops`).

HSTU's projection and attention as the training step runs them (`projected_mha`), bf16, at the
train_step benchmark's layer (B = 32, L = 1024 full length, 8 heads of 128): from the projection's
pre-activation [B, L, 4 h d] to (u, attention) and back to d pre. `pallas` is the fused op (the
backward kernels write d pre), `pallas_unfused` the attention kernel between XLA's SiLU and split
and their backward (what the step ran before the fusion), `xla` the reference; FLOPs as HSTU's.

FM block (X (X^T Y), flatten, LayerNorm), bf16: forward and forward + backward for a few
(batch, n, d, k), the last Wukong's at the paper's scale; FLOPs 4 n d k per example forward (two
matmuls), 3x that forward + backward. Pallas rows say which halves ran as kernels
(`kernel_forward`, `kernel_backward`: scaling/kernels/fm_block.kernel_fits; the rest ran in XLA).

The LayerNorm kernels, bf16: HSTU's gated LayerNorm (scaling/kernels/row_norm.py, gate * LN(x))
at the train_step HSTU layer's 32 x 1024 rows of 1024, and Wukong's layer output (scaling/kernels/
residual_norm.py: concat, residual add, LayerNorm) at its Wukong layer (B = 8192, 48 + 48 fields,
d = 160): forward and forward + backward time and the forward's GB/s of the bytes it must move
(x and the gate, or the parts and the residual, in; y out). Their TFLOP/s count the project's
LayerNorm FLOPs and the gate's or residual's one per element, 3x that forward + backward.

Softmax attention (OneTrans's, scaling/kernels/flash_attention.py), bf16: B sequences of Nq
causal queries ending at the last of Nk keys, at OneTrans-L's three layer shapes (d = 48) and one
long sequence; FLOPs 4 d per visible pair forward (Q K^T and P V), 3.5x that forward + backward
(the same convention as HSTU's).

--smoke runs tiny sizes (CPU: the kernels in interpret mode) to check that the script works.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.json_report import emit
from scaling.kernels.flash_attention import flash_mha, visible_pairs
from scaling.kernels.fm_block import fm_block, kernel_fits, tile_sizes
from scaling.kernels.hstu_attention import Blocks, hstu_mha, projected_mha
from scaling.kernels.hstu_attention_mgpu import mosaic_mha
from scaling.kernels.residual_norm import residual_layer_norm
from scaling.kernels.row_norm import gated_layer_norm
from scaling.kernels.tiles import TILE_FIELDS
from scaling.models.mlp import layer_norm_flops

NUM_BUCKETS = 128


def timed(fn, args, iters: int) -> float:
    """Median wall seconds of fn(*args) over iters calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(n: int, iters: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n**3 / timed(f, (a,), iters) / 1e12


def hstu_inputs(batch: int, length: int, heads: int, dim: int):
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(batch, length, heads, dim)) * 0.5, jnp.bfloat16) for _ in range(4))
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 3600, size=(batch, length)), axis=1), jnp.int32)
    pos_w = jnp.asarray(rng.normal(size=2 * length - 1) * 0.02, jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=NUM_BUCKETS + 1) * 0.02, jnp.float32)
    lengths = jnp.full((batch,), length, jnp.int32)
    return (q, k, v, pos_w, ts_w), (lengths, ts, cot)


def with_backward(forward, cot):
    """(jit(forward), jit(args -> (forward(*args), its VJP of `cot`))): what a row times."""

    def forward_backward(*args):
        out, pullback = jax.vjp(forward, *args)
        return out, pullback(cot)

    return jax.jit(forward), jax.jit(forward_backward)


def time_row(row: dict, functions, args, iters: int, fwd_flops: float, fwd_bwd_flops: float,
             fwd_bytes: float | None = None) -> dict:
    """row with the forward's and forward + backward's median ms and TFLOP/s (and GB/s of
    `fwd_bytes`, the bytes the forward must move), or the error (e.g. a reference's scores out of
    memory), printed as one JSON line as it finishes."""
    forward, forward_backward = functions
    try:
        row["fwd_ms"] = 1e3 * timed(forward, args, iters)
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
        if fwd_bytes is not None:
            row["fwd_gbytes_per_s"] = fwd_bytes / row["fwd_ms"] / 1e6
        row["fwd_bwd_ms"] = 1e3 * timed(forward_backward, args, iters)
        row["fwd_bwd_tflops"] = fwd_bwd_flops / row["fwd_bwd_ms"] / 1e9
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    print(json.dumps(row), file=sys.stderr)
    return row


def hstu_forward_flops(batch: int, heads: int, length: int, dim: int) -> float:
    """HSTU attention's forward model FLOPs (module docstring): 2 matmuls x 2 d per causal pair."""
    return 4 * dim * batch * heads * length * (length + 1) / 2


def hstu_functions(impl: str, blocks: Blocks | None, length: int, lengths, ts, cot):
    """`with_backward` of HSTU attention: impl auto | pallas | xla through `hstu_mha`, or mosaic
    (the Mosaic GPU kernels at their defaults; no bias: pass pos_w = ts_w = None)."""
    def forward(q, k, v, pos_w, ts_w):
        if impl == "mosaic":
            return mosaic_mha(q, k, v, lengths, norm=float(length))
        return hstu_mha(q, k, v, lengths, norm=float(length), pos_w=pos_w, ts_w=ts_w, timestamps=ts, impl=impl,
                        blocks=blocks)

    return with_backward(forward, cot)


def bench_hstu(lengths_list, dims, tokens: int, heads: int, iters: int, blocks: Blocks | None,
               impls=("pallas", "xla"), tag: dict | None = None) -> list[dict]:
    """The HSTU attention at every (L, d), B = tokens / L full sequences (module docstring); `tag`:
    extra fields for every row (the tile sweep's setting)."""
    rows = []
    for dim in dims:
        for length in lengths_list:
            batch = max(1, tokens // length)
            args, (lengths, ts, cot) = hstu_inputs(batch, length, heads, dim)
            fwd_flops = hstu_forward_flops(batch, heads, length, dim)
            for impl in impls:
                row = {**(tag or {}), "op": "hstu_attention", "impl": impl, "L": length, "d": dim, "heads": heads, "batch": batch,
                       "dtype": "bfloat16", "fwd_gflop": fwd_flops / 1e9, "fwd_bwd_gflop": 3.5 * fwd_flops / 1e9}
                if impl == "pallas":  # the tiles and heads per program this call resolves to
                    row["tiles"] = (blocks or Blocks()).resolve(heads, dim, True)._asdict()
                functions = hstu_functions(impl, blocks if impl == "pallas" else None, length, lengths, ts, cot)
                rows.append(time_row(row, functions, args, iters, fwd_flops, 3.5 * fwd_flops))
    return rows


def bench_projection(shapes, iters: int, blocks: Blocks | None, impls=("pallas", "xla")) -> list[dict]:
    """`projected_mha` at (B, L, heads, d), fused, unfused and xla (module docstring)."""
    rows = []
    for batch, length, heads, dim in shapes:
        rng = np.random.default_rng(3)
        (_, _, _, pos_w, ts_w), (lengths, ts, cot) = hstu_inputs(batch, length, heads, dim)
        pre = jnp.asarray(rng.normal(size=(batch, length, 4 * heads * dim)), jnp.bfloat16)
        cots = (jnp.asarray(rng.normal(size=(batch, length, heads * dim)), jnp.bfloat16), cot)
        bias = dict(pos_w=pos_w, ts_w=ts_w, timestamps=ts)

        def fused(pre, impl):
            return projected_mha(pre, lengths, heads=heads, norm=float(length), impl=impl,
                                 blocks=blocks if impl == "pallas" else None, **bias)

        def unfused(pre):  # HSTUBlock.project's SiLU and split, then the attention kernel
            u, v, q, k = (x.reshape(batch, length, heads, dim) for x in jnp.split(jax.nn.silu(pre), 4, axis=-1))
            return u.reshape(batch, length, -1), hstu_mha(q, k, v, lengths, norm=float(length), impl="pallas",
                                                          blocks=blocks, **bias)

        variants = {"pallas": functools.partial(fused, impl="pallas"), "pallas_unfused": unfused,
                    "xla": functools.partial(fused, impl="xla")}
        fwd_flops = hstu_forward_flops(batch, heads, length, dim)
        for variant, forward in variants.items():
            if variant.split("_")[0] not in impls:
                continue
            row = {"op": "hstu_projection", "impl": variant, "L": length, "d": dim, "heads": heads, "batch": batch,
                   "dtype": "bfloat16", "fwd_gflop": fwd_flops / 1e9, "fwd_bwd_gflop": 3.5 * fwd_flops / 1e9}
            rows.append(time_row(row, with_backward(forward, cots), (pre,), iters, fwd_flops, 3.5 * fwd_flops))
    return rows


def bench_fm(shapes, iters: int, block_b: int, impls=("pallas", "xla")) -> list[dict]:
    rows = []
    for batch, n, d, k in shapes:
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(batch, n, d)), jnp.bfloat16)
        y = jnp.asarray(rng.normal(size=(n, k)) / np.sqrt(n), jnp.float32)
        scale, bias = jnp.ones((n * k,), jnp.float32), jnp.zeros((n * k,), jnp.float32)
        cot = jnp.asarray(rng.normal(size=(batch, n * k)), jnp.bfloat16)
        flops = 4 * n * d * k * batch
        for impl in impls:
            row = {"op": "fm_block", "impl": impl, "batch": batch, "n": n, "d": d, "k": k, "dtype": "bfloat16"}
            if impl == "pallas":  # which halves run as kernels at these tiles (the rest through XLA)
                row["kernel_forward"], row["kernel_backward"] = kernel_fits(*tile_sizes(n, d, k), x.dtype.itemsize)
            forward = functools.partial(fm_block, impl=impl, block_b=block_b)
            moved = 2 * (x.size + batch * n * k)  # bytes the fused forward must move: X in, the [B, n k] output out
            rows.append(time_row(row, with_backward(forward, cot), (x, y, scale, bias), iters, flops, 3 * flops,
                                 fwd_bytes=moved))
    return rows


def bench_norm(shapes, gated_shapes, iters: int, impls=("pallas", "xla")) -> list[dict]:
    """`residual_layer_norm` at (B, n1, n2, d) and HSTU's `gated_layer_norm` at (rows, d), gated
    (module docstring)."""
    rows = []
    for m, d in gated_shapes:
        rng = np.random.default_rng(5)
        x, gate, cot = (jnp.asarray(rng.normal(size=(m, d)), jnp.bfloat16) for _ in range(3))
        flops = layer_norm_flops(d, m) + x.size  # the project's LayerNorm count + the gate
        for impl in impls:
            row = {"op": "gated_layer_norm", "impl": impl, "rows": m, "d": d, "dtype": "bfloat16"}
            forward = functools.partial(gated_layer_norm, impl=impl)
            rows.append(time_row(row, with_backward(forward, cot), (x, gate), iters, flops, 3 * flops,
                                 fwd_bytes=3 * 2 * x.size))
    for batch, n1, n2, d in shapes:
        rng = np.random.default_rng(4)
        first, second = (jnp.asarray(rng.normal(size=(batch, n, d)), jnp.bfloat16) for n in (n1, n2))
        res, cot = (jnp.asarray(rng.normal(size=(batch, n1 + n2, d)), jnp.bfloat16) for _ in range(2))
        scale, bias = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)
        moved = 3 * 2 * res.size  # bf16: the parts (res.size together) and the residual in, y out
        flops = layer_norm_flops(d, res.size // d) + res.size  # the project's LayerNorm count + the add
        for impl in impls:
            row = {"op": "residual_layer_norm", "impl": impl, "batch": batch, "n1": n1, "n2": n2, "d": d,
                   "dtype": "bfloat16"}
            forward = functools.partial(residual_layer_norm, impl=impl)
            rows.append(time_row(row, with_backward(forward, cot), (first, second, res, scale, bias), iters, flops,
                                 3 * flops, fwd_bytes=moved))
    return rows


def bench_flash(shapes, iters: int, impls=("pallas", "xla")) -> list[dict]:
    """Softmax attention (scaling/kernels/flash_attention.py) at (B, Nq, Nk, heads, d): Nq causal
    queries ending at the last of Nk keys, every key valid."""
    rows = []
    for batch, nq, nk, heads, dim in shapes:
        rng = np.random.default_rng(2)
        q = jnp.asarray(rng.normal(size=(batch, nq, heads, dim)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.normal(size=(batch, nk, heads, dim)), jnp.bfloat16) for _ in range(2))
        cot = jnp.asarray(rng.normal(size=(batch, nq, heads, dim)), jnp.bfloat16)
        fwd_flops = 4 * dim * batch * heads * visible_pairs(nq, nk, nk - nq, True)
        for impl in impls:
            row = {"op": "flash_attention", "impl": impl, "batch": batch, "Nq": nq, "Nk": nk, "heads": heads, "d": dim,
                   "dtype": "bfloat16", "fwd_gflop": fwd_flops / 1e9, "fwd_bwd_gflop": 3.5 * fwd_flops / 1e9}
            forward = functools.partial(flash_mha, q_offset=nk - nq, impl=impl)
            rows.append(time_row(row, with_backward(forward, cot), (q, k, v), iters, fwd_flops, 3.5 * fwd_flops))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--dims", default="128,64", help="head dims, in order (128 first: a run cut short keeps "
                        "the d = 128 rows the speed targets are read from)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / L)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--block-q", type=int, default=0, help="0 (every tile flag): the library's default, "
                        "which depends on the head dim and heads per program (scaling.kernels.hstu_attention.Blocks)")
    parser.add_argument("--block-k", type=int, default=0)
    parser.add_argument("--dkdv-block-q", type=int, default=0, help="dK/dV (and dbias): streamed query blocks")
    parser.add_argument("--dkdv-block-k", type=int, default=0, help="dK/dV (and dbias): its stationary key block")
    parser.add_argument("--dq-block-q", type=int, default=0, help="dQ: its stationary query block")
    parser.add_argument("--dq-block-k", type=int, default=0, help="dQ: streamed key blocks")
    parser.add_argument("--heads-per-program", type=int, default=0, help="default: 2 (with the bias) where it divides "
                        "--heads")
    parser.add_argument("--dkdv-heads-per-program", type=int, default=0,
                        help="dK/dV's heads per program; default: --heads-per-program's, or 1 at head dims >= 128 "
                             "(scaling.kernels.hstu_attention.Blocks)")
    parser.add_argument("--num-warps", type=int, default=0, help="default: 8, or 4 for head dims <= 32")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--ops", default="hstu,projection,fm,norm,flash",
                        help="which kernels: hstu, projection, fm, norm, flash (comma-separated)")
    parser.add_argument("--impls", default="pallas,xla", help="pallas, xla or both")
    parser.add_argument("--smoke", "--small", action="store_true", help="tiny sizes (CPU: interpret mode)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        blocks = Blocks(*(getattr(args, name) or None for name in TILE_FIELDS),
                        num_warps=args.num_warps or None, num_stages=args.num_stages,
                        heads_per_program=args.heads_per_program or None,
                        dkdv_heads_per_program=args.dkdv_heads_per_program or None)
    except ValueError as err:
        parser.error(str(err))
    ops, impls = args.ops.split(","), tuple(args.impls.split(","))
    unknown = sorted(set(ops) - {"hstu", "projection", "fm", "norm", "flash"}) + sorted(set(impls) - {"pallas", "xla"})
    if unknown:
        parser.error(f"unknown --ops/--impls entries: {unknown}")
    if args.smoke:
        lengths, dims, tokens, heads, iters, blocks = [32, 64], [16], 128, 2, 3, Blocks.uniform(16)
        fm_shapes, matmul_n, block_b = [(16, 8, 16, 4)], 256, 4
        flash_shapes = [(2, 24, 40, 2, 24)]
        projection_shapes = [(2, 32, 2, 16)]
        norm_shapes, gated_shapes = [(12, 5, 3, 24)], [(21, 40)]
    else:
        lengths, dims, tokens, heads, iters = ([int(x) for x in args.lengths.split(",")],
                                               [int(x) for x in args.dims.split(",")], args.tokens, args.heads,
                                               args.iters)
        # the last: Wukong at the paper's scale (benchmarks/train_step.py), tiles 128 x 256 x 64
        fm_shapes, matmul_n, block_b = ([(16384, 32, 16, 16), (16384, 64, 128, 32), (4096, 128, 128, 64),
                                         (8192, 96, 160, 48)], 8192, 32)
        # OneTrans (benchmarks/train_step.py): the first layer's 512 S + 16 NS tokens, a pyramid
        # layer's 256 + 16 queries, the last layer's NS queries; then a long causal sequence
        flash_shapes = [(512, 528, 528, 8, 48), (512, 272, 528, 8, 48), (512, 16, 528, 8, 48), (8, 4096, 4096, 8, 128)]
        projection_shapes = [(32, 1024, 8, 128)]  # benchmarks/train_step.py's HSTU layer
        # benchmarks/train_step.py's Wukong layer output, and its HSTU layer's gated LayerNorm
        norm_shapes, gated_shapes = [(8192, 48, 48, 160)], [(32 * 1024, 1024)]
    peak = matmul_tflops(matmul_n, max(iters, 3))
    # printed first, so a run cut short still says it (benchmarks/aims.py reads the log)
    print(json.dumps({"matmul_bf16_tflops": peak, "interpret": jax.default_backend() != "gpu"}), file=sys.stderr)
    result = {
        "benchmark": "kernels",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "interpret": jax.default_backend() != "gpu",
        "jax": jax.__version__,
        "smoke": args.smoke,
        "tokens": tokens,
        "blocks": {name: getattr(blocks, name) for name in TILE_FIELDS},  # None: the default
        "heads_per_program": blocks.heads_per_program,
        "dkdv_heads_per_program": blocks.dkdv_heads_per_program,
        "num_warps": blocks.num_warps,
        "num_stages": blocks.num_stages,
        "matmul_bf16_tflops": peak,
        "flops_convention": "causal model FLOPs: fwd = 4 d B h L(L+1)/2, fwd+bwd = 3.5 x fwd (module docstring)",
        "hstu": bench_hstu(lengths, dims, tokens, heads, iters, blocks, impls) if "hstu" in ops else [],
        "hstu_projection": bench_projection(projection_shapes, iters, blocks, impls) if "projection" in ops else [],
        "fm_block": bench_fm(fm_shapes, iters, block_b, impls) if "fm" in ops else [],
        "layer_norms": bench_norm(norm_shapes, gated_shapes, iters, impls) if "norm" in ops else [],
        "flash_attention": bench_flash(flash_shapes, iters, impls) if "flash" in ops else [],
    }
    emit(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
