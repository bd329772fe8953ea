"""The warp-specialized Mosaic GPU pipeline the HSTU attention kernels share (Hopper).

One CTA is two consumer warpgroups and one producer warpgroup (`num_threads=3`), FlashAttention-3's
arrangement:

  producer    streams blocks [bs, d] of the `streamed` tensors of one (batch, head) into a ring of
              `stages` SMEM slots with TMA, a slot refilled once both consumers released it
  consumer c  holds 64 rows [lo, lo + 64) of each `stationary` tensor in SMEM (lo = (2 p + c) 64
              for grid step p: one wgmma's M), and walks the pair's streamed blocks: the ones in
              its own range through `step` (masked or not), the others only released, so that the
              two consumers keep the same count on every barrier; its fp32 accumulators live in
              registers across the walk and are written, cast, through its stationary SMEM
  ping-pong   the consumers meet at a two-party barrier twice per block (`meet`, which `step`
              calls after issuing its first wgmmas and before issuing its last), consumer 1 half a
              turn behind: one's wgmmas run while the other does its elementwise work

`step(t, ctx)` is the kernel's math for streamed block t; `ranges(lo, pair_lo, scalars)` says
which blocks the pair and the consumer need (`Ranges`). JAX 0.11's Mosaic GPU interpreter runs all
of it on CPU and checks the barrier protocol (a phase that a waiting warpgroup never observed is
an error; a missing arrival deadlocks).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from scaling.kernels.sharded import vary_like

ROWS = 64  # stationary rows per consumer: one wgmma's M
# A 128-byte swizzle over 64-element rows of 16-bit values: the layout TMA writes and wgmma reads
# without bank conflicts (the one FlashAttention-3 uses).
_SWIZZLE_BYTES, TILE_COLS = 128, 64


class Ranges(NamedTuple):
    """Streamed block indices for one consumer, int32 scalars: the pair's [first, last) (what the
    producer loads; the same for both consumers) and the consumer's own [own_first, own_last) ⊆ it,
    in which [full_lo, full_hi) needs no mask."""

    first: jax.Array
    last: jax.Array
    own_first: jax.Array
    full_lo: jax.Array
    full_hi: jax.Array
    own_last: jax.Array


@dataclasses.dataclass
class StepContext:
    """What `step` gets for streamed block t: this consumer's stationary tiles, the block's slot
    tiles, its accumulators and work tiles (SMEM [64, bs]), positions() -> the tile's (row, column)
    positions (int32 [64, bs] in the WGMMA layout; made where the mask needs them, so that they
    hold no registers across the walk), the scalars' values, and the protocol calls: wait(i) before
    reading streamed tensor i, free(i) after its last read, meet() twice."""

    stationary: list
    streamed: list
    accs: list
    work: list
    shape: tuple[int, int]
    positions: Callable[[], tuple[jax.Array, jax.Array]]
    scalars: list
    wait: Callable[[int], None]
    free: Callable[[int], None]
    meet: Callable[[], None]


def transforms():
    return (plgpu.TilingTransform((8, TILE_COLS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def matmul(a, b, shape: tuple[int, int], after_issue: Callable[[], None] | None = None) -> jax.Array:
    """fp32 a @ b on wgmma (a, b SMEM refs or transposed views), [shape]; after_issue runs while
    it is in flight."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _kernel(*refs, n_stat: int, n_stream: int, n_scalar: int, n_acc: int, bs: int, stages: int, pingpong: bool,
            ranges: Callable, step: Callable, interpret: bool):
    stat_refs, refs = refs[:n_stat], refs[n_stat:]
    stream_refs, refs = refs[:n_stream], refs[n_stream:]
    scalar_refs, refs = refs[:n_scalar], refs[n_scalar:]
    out_refs, (stat_smem, stream_smem, work_smem, stat_ready, ready, free_bar, turn) = refs[:n_acc], refs[n_acc]
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    pair, wg = lax.axis_index("pair"), lax.axis_index("wg")
    scalars = [r[batch] for r in scalar_refs]
    pair_lo = pair * (2 * ROWS)

    def slot_of(t, first):
        return lax.rem(t - first, stages)

    @pl.when(wg < 2)
    def _consumer():
        if not interpret:  # the consumers hold the accumulators; the producer needs few registers
            plgpu.set_max_registers(232, action="increase")
        lo = pair_lo + wg * ROWS
        r = ranges(lo, pair_lo, scalars)
        stat = [s.at[wg] for s in stat_smem]
        for i, (src, tile) in enumerate(zip(stat_refs, stat)):
            plgpu.copy_gmem_to_smem(src.at[batch, pl.ds(lo, ROWS), head], tile, stat_ready.at[wg * n_stat + i])
        for i in range(n_stat):
            plgpu.barrier_wait(stat_ready.at[wg * n_stat + i])
        work = [w.at[wg] for w in work_smem]

        def positions(t):
            return (lo + plgpu.broadcasted_iota(jnp.int32, (ROWS, bs), 0, layout=plgpu.Layout.WGMMA),
                    t * bs + plgpu.broadcasted_iota(jnp.int32, (ROWS, bs), 1, layout=plgpu.Layout.WGMMA))

        def meet():
            if pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def visit(t, accs, *, masked: bool):
            slot = slot_of(t, r.first)
            ctx = StepContext(stationary=stat, streamed=[s.at[slot] for s in stream_smem], accs=accs, work=work,
                              shape=(ROWS, bs), positions=lambda: positions(t), scalars=scalars,
                              wait=lambda i: plgpu.barrier_wait(ready.at[i * stages + slot]),
                              free=lambda i: plgpu.barrier_arrive(free_bar.at[i * stages + slot]), meet=meet)
            step(ctx, masked=masked)

        def release(t):  # a block only the other consumer reads: observe its arrival, free it
            slot = slot_of(t, r.first)
            for i in range(n_stream):
                plgpu.barrier_wait(ready.at[i * stages + slot])
                plgpu.barrier_arrive(free_bar.at[i * stages + slot])
            meet()  # two meetings per block, as in `step`
            meet()

        def walk(*accs):
            accs = list(accs)
            pl.when(wg == 1)(meet)  # consumer 1 starts half a turn behind
            pl.loop(r.first, r.own_first)(release)
            pl.loop(r.own_first, r.full_lo)(lambda t: visit(t, accs, masked=True))
            pl.loop(r.full_lo, r.full_hi)(lambda t: visit(t, accs, masked=False))
            pl.loop(r.full_hi, r.own_last)(lambda t: visit(t, accs, masked=True))
            pl.loop(r.own_last, r.last)(release)
            pl.when(wg == 0)(meet)  # and consumer 0 ends half a turn later: equal meetings
            return [a[...] for a in accs]

        dims = [o.shape[-1] for o in out_refs]
        results = pl.run_scoped(walk, *[plgpu.ACC((ROWS, d), jnp.float32) for d in dims])
        for tile, value in zip(stat, results):  # the stationary tiles are spent: they stage the outputs
            tile[...] = value.astype(tile.dtype)
        plgpu.commit_smem()
        for tile, out in zip(stat, out_refs):
            plgpu.copy_smem_to_gmem(tile, out.at[batch, pl.ds(lo, ROWS), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")
        r = ranges(pair_lo, pair_lo, scalars)

        @pl.loop(r.first, r.last)
        def _(t):
            slot = slot_of(t, r.first)
            for i, (src, ring) in enumerate(zip(stream_refs, stream_smem)):
                @pl.when(t - r.first >= stages)
                def _():
                    plgpu.barrier_wait(free_bar.at[i * stages + slot])

                plgpu.copy_gmem_to_smem(src.at[batch, pl.ds(t * bs, bs), head], ring.at[slot],
                                        ready.at[i * stages + slot])

        @pl.loop(jnp.maximum(r.last - stages, r.first), r.last)
        def _(t):  # the last releases, so that every phase of the free barriers is observed
            for i in range(n_stream):
                plgpu.barrier_wait(free_bar.at[i * stages + slot_of(t, r.first)])


def pipelined_call(stationary: Sequence[jax.Array], streamed: Sequence[jax.Array], scalars: Sequence[jax.Array], *,
                   n_out: int, step: Callable, ranges: Callable, n_work: int, stream_block: int, stages: int,
                   pingpong: bool, interpret: bool, name: str) -> list[jax.Array]:
    """Run the pipeline over grid (heads, Npad / 128, B); returns n_out outputs: output i is
    accumulator i, shaped and typed as stationary tensor i (it is written through i's SMEM).

    stationary, streamed: [B, Npad, h, d_i] 16-bit, Npad a multiple of 128 and of stream_block;
    scalars: int32 [B] (read per batch, passed to `ranges` and `step`); n_work: SMEM [64,
    stream_block] work tiles per consumer (P, dS: the A operands of a step's later wgmmas).
    """
    bsz, npad, heads, _ = stationary[0].shape
    dtype = stationary[0].dtype
    n_stat, n_stream = len(stationary), len(streamed)
    t = transforms()
    scratch = (
        [plgpu.SMEM((2, ROWS, x.shape[-1]), x.dtype, transforms=t) for x in stationary],
        [plgpu.SMEM((stages, stream_block, x.shape[-1]), x.dtype, transforms=t) for x in streamed],
        [plgpu.SMEM((2, ROWS, stream_block), dtype, transforms=t) for _ in range(n_work)],
        plgpu.Barrier(num_barriers=2 * n_stat),
        plgpu.Barrier(num_barriers=n_stream * stages),
        # a slot is free again once both consumers have arrived
        plgpu.Barrier(num_arrivals=2, num_barriers=n_stream * stages),
        plgpu.Barrier(num_arrivals=2),  # the consumers' turns (ping-pong)
    )
    body = functools.partial(_kernel, n_stat=n_stat, n_stream=n_stream, n_scalar=len(scalars), n_acc=n_out,
                             bs=stream_block, stages=stages, pingpong=pingpong, ranges=ranges,
                             step=step, interpret=interpret)

    def entry(*refs):
        pl.run_scoped(lambda allocated: body(*refs, allocated), scratch, collective_axes="wg")

    inputs = (*stationary, *streamed, *scalars)
    call = plgpu.kernel(entry, out_type=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stationary[:n_out]],
                        grid=(heads, npad // (2 * ROWS), bsz), grid_names=("heads", "pair", "batch"),
                        num_threads=3, thread_name="wg", kernel_name=name,
                        compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            outs = call(*inputs)
    else:
        outs = call(*inputs)
    # inside shard_map the outputs vary over the mesh axes the inputs do (its check_vma)
    return [vary_like(o, *inputs) for o in outs]
