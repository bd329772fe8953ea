"""HSTU's relative bias inside the attention kernels, and its two tables' gradients.

Forward (inside every kernel, per [rows, cols] tile, nothing O(N^2) in memory):

    rab[i, j] = pos_w[P - 1 + pid(j) - pid(i)] + ts_w[bucket(query_ts[i] - ts[j])]

with pid(i) = min(i, n_hist) (candidates share the position right after the history, as M-FALCON
places them; without candidates pid(i) = i) and the bucket found as the reference finds it
(scaling/models/hstu_attention.py) exactly, from the research code's integer edge table: a float32
log estimate, scaled down by 1.5e-5 so that it never exceeds the true bucket and falls at most one
short, then one edge check (`delta >= edges[estimate + 1]`). The kernel's bucket therefore equals
`time_buckets` bit for bit whatever the estimate rounds to, as long as its relative error stays
under 1.5e-5 (the float32 formula the table encodes is itself within 1e-6 of the exact one; the
empty bucket 1 is never the estimate: a gap of 2 estimates 2.30). That is why the estimate may be
cheap: on the GPU it is one hardware lg2.approx.f32 (relative error ~2^-22) times ln 2 / 0.301,
truncated (the gap is >= 1, so truncation is floor), in place of an accurate logf, an IEEE
division, a floorf and a second edge lookup (with the SiLU changes of hstu_attention_fwd.py, the
bias path's whole-tile forward loop went from 53 to 36 tile operations: benchmarks/kernel_ir.py).
The three small tables (pos_w [2P - 1], ts_w [num_buckets + 1], the 72 edges) are whole-array
kernel inputs read with gathers (pointer arithmetic on Triton; L1/L2 hits).

Backward: the tables' gradients are sums of the score gradient dS over (batch, head, i, j) grouped
by table entry. Gathering inside the kernel is cheap, but grouping is not: without atomics (which
the Triton interpreter cannot even emulate for duplicate indices, and which are nondeterministic on
GPU) a per-bucket accumulation inside a tile costs one masked reduction of the tile per table entry
(72 buckets + 2B - 1 diagonals, ~200 passes over a tile that the attention math passes over ~20
times). So the reduction is split: a kernel (hstu_attention_bwd.py: dK/dV when one program holds
every head, else `dbias`) sums dS over the heads in registers and writes one float32 partial per
(batch, j, i) tile element, key-major and zero where masked, and XLA groups them here
(`table_grads`): the position gradient as diagonal sums (a pad-and-reshape skew, no scatter) and
the time gradient as a segment sum over buckets recomputed from the timestamps.
The price is one float32 [B, N, N] buffer in the backward, the size of the [B, N, N] bias/bucket
tensors the jnp reference path materializes anyway and 1/heads of its [B, h, N, N] scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltr

from scaling.models.hstu_attention import BUCKET_DIVISOR, BUCKET_EDGES, time_buckets

NUM_EDGES = len(BUCKET_EDGES)


def edges_table() -> jax.Array:
    """The research code's bucket edges as an int32 kernel input [72]."""
    return jnp.asarray(BUCKET_EDGES, jnp.int32)


# ln 2 / 0.301, scaled down so that the estimate never overshoots (module docstring)
_LOG2_TO_BUCKET = math.log(2.0) / BUCKET_DIVISOR * (1.0 - 1.5e-5)


def _log2(x: jax.Array, interpret: bool) -> jax.Array:
    """float32 log2: the hardware approximation on the GPU (relative error ~2^-22), jnp elsewhere."""
    if interpret:
        return jnp.log2(x)
    [out] = pltr.elementwise_inline_asm("lg2.approx.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return out


def tile_bias(pos_ref, tsw_ref, edges_ref, q_pid, k_pid, q_time, k_time, *, num_pos: int,
              num_buckets: int, interpret: bool) -> jax.Array:
    """The bias of one tile, float32, inside a kernel.

    q_pid, q_time: the query rows' positions and query times; k_pid, k_time: the key columns';
    all int32 and already broadcastable to the tile's 2-D shape ([BM, 1] with [1, BN] for a
    [BM, BN] tile, or the transpose for a key-major tile). num_pos: P (pos_w has 2P - 1 entries).
    """
    rel = jnp.clip((num_pos - 1) + k_pid - q_pid, 0, 2 * num_pos - 2)
    pos = pos_ref[rel]
    delta = jnp.abs(q_time - k_time)
    estimate = _log2(jnp.maximum(delta, 1).astype(jnp.float32), interpret) * _LOG2_TO_BUCKET
    approx = jnp.clip(estimate.astype(jnp.int32), 0, NUM_EDGES - 2)  # >= 0: truncation is floor
    bucket = approx + (delta >= edges_ref[approx + 1]).astype(jnp.int32)
    bucket = jnp.clip(bucket, 0, num_buckets)
    return pos + tsw_ref[bucket]


def diagonal_sums(m: jax.Array) -> jax.Array:
    """[n, n] -> [2n - 1] with out[n - 1 + j - i] = sum of m[i, j] (no scatter).

    Flipping the rows turns diagonals into anti-diagonals (index i' + j); padding each row with n
    zeros and re-reading the flat buffer with row length 2n - 1 moves row i' right by i', so the
    anti-diagonals become columns.
    """
    n = m.shape[0]
    padded = jnp.concatenate([m[::-1], jnp.zeros_like(m)], axis=1).reshape(-1)
    return padded[: n * (2 * n - 1)].reshape(n, 2 * n - 1).sum(0)


def table_grads(drab_t: jax.Array, n_hist: jax.Array, timestamps: jax.Array, query_timestamps: jax.Array, *,
                num_pos: int, num_buckets: int, candidates: bool) -> tuple[jax.Array, jax.Array]:
    """(d pos_w [2P - 1], d ts_w [num_buckets + 1]) from the head-summed score gradient.

    drab_t float32 [B, N, N], key-major as the kernels write it: drab_t[b, j, i] is d rab[b, i, j]
    for query i and key j (zero where the attention mask is off); n_hist int [B] (the history
    length: positions are clamped to it), timestamps/query_timestamps int [B, N]. The index maps
    are transposed instead of the buffer (they are elementwise, so XLA fuses them into the sums).
    """
    b, n, _ = drab_t.shape
    buckets = jnp.swapaxes(time_buckets(timestamps, num_buckets, query_timestamps), 1, 2)
    if num_buckets < 256:
        # The layers share the buckets, so XLA computes them once and keeps them for every layer's
        # sum: one byte per pair instead of four (benchmarks/gpu_aot.py: 168 MB -> 34 MB at B=32, N=1024)
        buckets = buckets.astype(jnp.uint8)
    d_ts = jax.ops.segment_sum(drab_t.reshape(-1), buckets.reshape(-1), num_segments=num_buckets + 1)
    if not candidates and num_pos >= n:
        # pid(i) = i for every unmasked entry: the position gradient is a diagonal sum. Summing the
        # key-major buffer's diagonal i - j gives the entry for j - i: hence the reversal.
        diag = diagonal_sums(drab_t.sum(0))[::-1]
        # zeros around [P - n, P + n - 1). A pad, not .at[].set: with n == P that is a scatter with
        # no index dimensions, which crashes XLA's Shardy partitioner inside shard_map (JAX 0.11.2)
        d_pos = jnp.pad(diag, (num_pos - n, num_pos - n))
    else:
        pid = jnp.minimum(jnp.arange(n)[None, :], n_hist[:, None])
        rel = jnp.clip(num_pos - 1 + pid[:, :, None] - pid[:, None, :], 0, 2 * num_pos - 2)  # [b, j, i]
        d_pos = jax.ops.segment_sum(drab_t.reshape(-1), rel.reshape(-1), num_segments=2 * num_pos - 1)
    return d_pos, d_ts
