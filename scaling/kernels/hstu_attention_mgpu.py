"""HSTU attention forward on Mosaic GPU (Hopper): warp-specialized, TMA-fed, wgmma throughout.

    out = mosaic_mha(q, k, v, lengths, num_candidates=None, norm=N)      # no relative bias

The same math as hstu_attention.reference_mha without the bias: silu(q_i . k_j) / norm for the
pairs the mask keeps (causal with the diagonal, rows and keys past lengths[b] off, a candidate
sees the history and itself), rows past the length zero. It is the forward of the Triton kernels
(hstu_attention_fwd.py) rebuilt the way FlashAttention-3 builds softmax attention for the H100,
because JAX 0.11 deprecates Pallas' Triton backend and the Triton lowering cannot express
warp specialization or TMA:

  one CTA = two consumer warpgroups + one producer warpgroup (`num_threads=3`)
    producer   streams K and V tiles [BK, d] of one (batch, head) into a ring of `num_stages` SMEM
               slots with TMA, each slot refilled once both consumers have released it
    consumer c holds query rows [(2 i + c) BQ, +BQ) in SMEM and, per key block: S = Q K^T on
               wgmma (64 x BK x d, fp32 accumulator in registers), the mask and silu(S) / norm in
               fp32, P in bf16 to SMEM, O += P V on wgmma into an accumulator that lives across the
               loop; the last key block it needs is its diagonal (or the sequence's end), and it
               then only releases the slots the other consumer still reads
    ping-pong  (MosaicBlocks.pingpong, FlashAttention-3's schedule) the consumers meet at a
               two-party barrier after issuing Q K^T and before issuing P V, consumer 1 half a
               turn behind, so that one's wgmmas run while the other computes its SiLU
  grid (heads, N / 2 BQ, B); blocks wholly past a sequence's end load nothing and write zeros.

P goes through SMEM, not registers, as the second wgmma's A operand: JAX 0.11's Mosaic GPU
interpreter (which runs these kernels on CPU for the tests) rejects a register A operand, and the
one 8 KiB store per step is small beside the step's two wgmmas.

Scope, for now: the forward without the relative bias (the bias needs per-element gathers from
its tables, which Mosaic GPU's register layouts do not offer), bf16 or fp16 inputs, head dims
that are multiples of 64, the interpreter on CPU. It is timed beside the Triton forward and
generative-recommenders' kernel on the same shapes (benchmarks/hstu_reference_side_by_side.py,
with its error against both); the model's path stays on the Triton kernels, which have the bias
and the backward. benchmarks/mosaic_compile.py compiles it for sm_90a through ptxas without a
GPU (registers, spills, shared memory, wgmma shapes). JAX's own Mosaic GPU attention refuses
causal masking under CUDA 12.8 to 12.9.0 for a ptxas miscompilation; the GPU session's test step
and the side-by-side's error columns are what vouch for this kernel on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from scaling.kernels.tiles import cdiv

# A 128-byte swizzle over 64-element rows of 16-bit values: the layout TMA writes and wgmma reads
# without bank conflicts (the one FlashAttention-3 uses).
_SWIZZLE_BYTES, _TILE_COLS = 128, 64


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Mosaic GPU forward: block_q query rows per consumer warpgroup (wgmma's M: 64),
    block_k keys per step, num_stages K/V slots in the producer's ring, pingpong (below)."""

    block_q: int = 64
    block_k: int = 64
    num_stages: int = 2
    # FlashAttention-3's ping-pong: the two consumers take turns, one's wgmmas running while the
    # other computes its SiLU (a two-party barrier between the phases); off, they run freely
    pingpong: bool = True

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q}: a consumer warpgroup's wgmma takes 64 rows")
        if self.block_k % 64 or not 64 <= self.block_k <= 256:
            raise ValueError(f"block_k={self.block_k}: expected 64, 128, 192 or 256")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages}: the ring needs at least 2 slots")


def _transforms():
    return (plgpu.TilingTransform((8, _TILE_COLS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def _kernel(q_ref, k_ref, v_ref, len_ref, hist_ref, out_ref, scratch, *, blocks: MosaicBlocks, norm: float,
            interpret: bool):
    (q_smem, k_smem, v_smem, p_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scratch
    bq, bk, stages = blocks.block_q, blocks.block_k, blocks.num_stages
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    pair, wg = lax.axis_index("q_seq"), lax.axis_index("wg")
    length, n_hist = len_ref[batch], hist_ref[batch]
    pair_lo = pair * (2 * bq)
    # key blocks the pair of query blocks needs: through the later block's diagonal or the length
    pair_steps = jnp.where(pair_lo < length, cdiv(jnp.minimum(pair_lo + 2 * bq, length), bk), 0)
    inv_norm = 1.0 / norm

    @pl.when(wg < 2)
    def _consumer():
        if not interpret:  # the consumers hold the accumulators; the producer needs few registers
            plgpu.set_max_registers(232, action="increase")
        q_lo = pair_lo + wg * bq
        steps = jnp.where(q_lo < length, cdiv(jnp.minimum(q_lo + bq, length), bk), 0)
        q_tile = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_lo, bq), head], q_tile, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        rows = q_lo + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
        cols0 = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)

        def meet():  # both consumers pass this point together (ping-pong only)
            if blocks.pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def step(j, acc_ref, *, masked: bool):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                meet()  # the other consumer's SiLU starts while this wgmma runs
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            # silu(s) / norm with sigmoid(s) = (1 + tanh(s / 2)) / 2: one tanh.approx.f32 under
            # approx_math (relative error ~2^-11, as the Triton kernels' 16-bit path), where the
            # logistic lowers to an exp and an IEEE division
            half = 0.5 * s
            p = (half + half * jnp.tanh(half)) * inv_norm
            if masked:
                cols = cols0 + j * bk
                seen = (((cols <= rows) & (cols < n_hist)) | (cols == rows)) & (rows < length) & (cols < length)
                p = jnp.where(seen, p, 0.0)
            p_smem.at[wg][...] = p.astype(p_smem.dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_ready.at[slot])
            meet()  # the tensor cores are this consumer's again
            plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
            plgpu.wgmma_wait(0)  # P's SMEM is rewritten next step
            plgpu.barrier_arrive(v_free.at[slot])

        def release(j):  # a block the other consumer reads: observe its arrival, free the slot
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            meet()  # keep the other consumer's turns: two meetings per step, as in `step`
            meet()

        # key blocks every row sees whole (below the first row, inside the history, all rows
        # valid) skip the mask, as in the Triton forward
        whole = jnp.where(q_lo + bq <= length, jnp.minimum(lax.div(q_lo, bk), lax.div(n_hist, bk)), 0)

        def accumulate(acc_ref):
            pl.when(wg == 1)(meet)  # consumer 1 starts half a turn behind
            pl.loop(0, whole)(lambda j: step(j, acc_ref, masked=False))
            pl.loop(whole, steps)(lambda j: step(j, acc_ref, masked=True))
            pl.loop(steps, pair_steps)(release)
            pl.when(wg == 0)(meet)  # and consumer 0 ends half a turn later: equal meetings
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((bq, q_ref.shape[-1]), jnp.float32))
        q_tile[...] = acc.astype(q_tile.dtype)  # Q is spent: its SMEM stages the output
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, pl.ds(q_lo, bq), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")

        @pl.loop(0, pair_steps)
        def _(j):
            slot = lax.rem(j, stages)
            window = (batch, pl.ds(j * bk, bk), head)

            @pl.when(j >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[window], k_smem.at[slot], k_ready.at[slot])

            @pl.when(j >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[window], v_smem.at[slot], v_ready.at[slot])

        @pl.loop(jnp.maximum(pair_steps - stages, 0), pair_steps)
        def _(j):  # the last releases, so that every phase of the free barriers is observed
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def mosaic_mha(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, num_candidates: jax.Array | None = None,
               *, norm: float, blocks: MosaicBlocks | None = None, interpret: bool | None = None) -> jax.Array:
    """HSTU attention forward without bias on Mosaic GPU (module docstring).

    q, k, v [B, N, h, d] bf16 or fp16 (d a multiple of 64, one d for all three), lengths int [B],
    num_candidates int [B] or None -> [B, N, h, d] in the inputs' dtype. interpret None: on CPU
    (any backend but a GPU's), the Mosaic GPU interpreter.
    """
    blocks = blocks or MosaicBlocks()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bsz, n, heads, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, N, h, d], got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a 16-bit dtype (bfloat16 or float16), got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if dim % _TILE_COLS:
        raise ValueError(f"head dim {dim}: the Mosaic GPU kernel takes multiples of {_TILE_COLS}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, n)
    n_hist = lengths if num_candidates is None else lengths - jnp.clip(num_candidates.astype(jnp.int32), 0, lengths)
    unit = math.lcm(2 * blocks.block_q, blocks.block_k)  # whole query-block pairs and key blocks
    npad = -(-n // unit) * unit
    q, k, v = (_pad(x, 1, npad) for x in (q, k, v))
    bq, bk, stages = blocks.block_q, blocks.block_k, blocks.num_stages
    t = _transforms()
    scratch = (
        (plgpu.SMEM((2, bq, dim), q.dtype, transforms=t), plgpu.SMEM((stages, bk, dim), q.dtype, transforms=t),
         plgpu.SMEM((stages, bk, dim), q.dtype, transforms=t), plgpu.SMEM((2, bq, bk), q.dtype, transforms=t)),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
        # a slot is free again once both consumers have arrived
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
        plgpu.Barrier(num_arrivals=2),  # the consumers' turns (pingpong)
    )
    body = functools.partial(_kernel, blocks=blocks, norm=float(norm), interpret=interpret)

    def entry(q_ref, k_ref, v_ref, len_ref, hist_ref, out_ref):
        pl.run_scoped(lambda *s: body(q_ref, k_ref, v_ref, len_ref, hist_ref, out_ref, s), *scratch,
                      collective_axes="wg")

    call = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
                        grid=(heads, npad // (2 * bq), bsz), grid_names=("heads", "q_seq", "batch"),
                        num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            out = call(q, k, v, lengths, n_hist)
    else:
        out = call(q, k, v, lengths, n_hist)
    return out[:, :n]
