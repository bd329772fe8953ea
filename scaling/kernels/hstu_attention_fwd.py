"""HSTU attention forward kernel, and the static config, block ranges and masks its kernels share.

Layout: dense padded q, k [B, N, h, dqk], v [B, N, h, dv] (N a multiple of every block size,
head dims powers of two >= 16: `hstu_attention.py` pads), per sequence its length L (rows >= L are
padding) and history length n_hist = L - candidates. Grid (N / BM, B, h / G): one program per query
block (the last block first: `heavy_first`), sequence and group of G heads (`heads_per_program`);
it holds its G q tiles and the whole sequence's K, V for its heads (a pointer on GPU) and walks
the key blocks it needs, computing each tile's mask and relative bias once for its G heads:

    history keys [0, min(ceil(n_hist / BN), causal end))   then
    the blocks holding its own rows' keys (the diagonal)   [max(that, q_lo // BN), ceil(min(q_hi, L) / BN))

so blocks above the diagonal, past the length, and between candidates are never loaded. Without
candidates the two ranges are the usual causal range [0, ceil(min(q_hi, L) / BN)). A query block
past the length (or, with `candidates_only`, before the first candidate) loops over nothing and
stores zeros, as the reference's padded rows are.

The mask inside a tile: key j is seen by query i iff i, j < L and (j <= i and j < n_hist, or
j == i); with `candidates_only` also i >= n_hist. So a candidate sees the history and itself, never
another candidate, and the history never sees a candidate (GR's `num_targets` semantics).

Per tile: s = q k^T (fp32 accumulation) + rab (hstu_bias.tile_bias), p = silu(s) in fp32,
acc += p.astype(v.dtype) @ v in fp32; the 1 / norm is applied once to acc (the map is linear, and
scaling before the bf16 cast changes no relative rounding), which is stored as v.dtype.

Per-element work. With d = 128 a tile element costs 2 x 128 multiply-adds on the tensor cores, and
the elementwise work beside them runs on the CUDA cores, which an H100 has far less throughput on.
Written naively that work was 15 tile operations per element in the Triton IR (a masked select of
seven compares, an accurate expf, two IEEE divisions; `python -m benchmarks.kernel_ir`), now 5 in
the loop over whole tiles:
  - key blocks wholly below the diagonal and inside the history ("full" blocks, all but ~1 in
    L / block of a causal row) skip the mask; rows past the length (or before the first
    candidate) are zeroed once on the accumulator;
  - for 16-bit inputs SiLU goes through one hardware tanh: silu(s) = h + h tanh(h), h = s / 2
    (tanh.approx.f32: relative error ~2^-11, under the 2^-9 of the bf16 cast of p that follows;
    jnp.tanh in interpret mode); float32 inputs keep the exact sigmoid;
  - the 1 / norm leaves the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from scaling.kernels.hstu_bias import tile_bias
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import cdiv, dot, heavy_first


@dataclasses.dataclass(frozen=True)
class MhaConfig:
    """Static kernel parameters (hashable: a custom_vjp nondiff argument)."""

    norm: float
    block_q: int = 64  # the forward's query and key blocks
    block_k: int = 64
    dkdv_block_q: int = 64  # dK/dV (and dbias): query blocks streamed past a key block
    dkdv_block_k: int = 64
    dq_block_q: int = 64  # dQ: key blocks streamed past a query block
    dq_block_k: int = 64
    num_pos: int = 0  # P: pos_w has 2P - 1 entries (0: no relative bias)
    num_buckets: int = 0  # ts_w has num_buckets + 1 entries
    candidates: bool = False  # some sequences end in candidates (positions clamped to n_hist)
    candidates_only: bool = False  # only candidate rows are queries (M-FALCON)
    interpret: bool = False
    num_warps: int | None = None
    num_stages: int = 2
    seq_len: int = 0  # the unpadded N (the bias tables' gradient reduction skips the padding)
    heads_per_program: int = 1  # G: one program computes G heads, the bias tile once for all of them
    dkdv_heads_per_program: int = 0  # dK/dV's G (0: heads_per_program)
    dbias_block_k: int = 64  # the dbias kernel's key block (its query block is dK/dV's)

    @property
    def has_bias(self) -> bool:
        return self.num_pos > 0

    def compiler_params(self, head_dim: int) -> pltr.CompilerParams:
        warps = self.num_warps or (4 if head_dim <= 32 else 8)  # Blocks' docstring
        return pltr.CompilerParams(num_warps=warps, num_stages=self.num_stages)


def key_block_ranges(q_lo, length, n_hist, q_first, block_q: int, block_k: int):
    """Key blocks for query rows [q_lo, q_lo + block_q): [0, a) then [c, d) (module docstring)."""
    q_end = jnp.minimum(q_lo + block_q, length)
    active = (q_lo < length) & (q_lo + block_q > q_first)
    d = cdiv(q_end, block_k)
    a = jnp.minimum(cdiv(n_hist, block_k), d)
    c = jnp.maximum(a, lax.div(q_lo, block_k))
    zero = jnp.zeros_like(a)
    return jnp.where(active, a, zero), c, jnp.where(active, d, zero)


def query_block_range(k_lo, length, n_hist, q_first, block_q: int, block_k: int):
    """Query blocks that see key rows [k_lo, k_lo + block_k): [lo, hi) (empty past the length).

    A history key is seen by every later row; a candidate key only by its own row."""
    lo = jnp.maximum(lax.div(k_lo, block_q), lax.div(q_first, block_q))
    hi = jnp.where(k_lo < n_hist, cdiv(length, block_q), cdiv(jnp.minimum(k_lo + block_k, length), block_q))
    return lo, jnp.where(k_lo < length, hi, lo)


def full_key_blocks(q_lo, n_hist, a, block_k: int):
    """Key blocks [0, f) that every row of the query block at q_lo sees whole: below the block's
    first row and inside the history (f <= a, the first key range's end)."""
    return jnp.minimum(a, jnp.minimum(lax.div(q_lo, block_k), lax.div(n_hist, block_k)))


def full_query_blocks(k_lo, length, n_hist, q_first, lo, hi, block_q: int, block_k: int):
    """Query blocks [fl, fh) within [lo, hi) whose rows all see the key block at k_lo whole: the
    block is history, every row is past its last key, below the length and a query."""
    fl = jnp.maximum(jnp.maximum(lo, cdiv(k_lo + block_k - 1, block_q)), cdiv(q_first, block_q))
    fh = jnp.where(k_lo + block_k <= n_hist, jnp.minimum(hi, lax.div(length, block_q)), lo)
    fl = jnp.clip(fl, lo, hi)
    return fl, jnp.clip(fh, fl, hi)


def row_valid(rows, length, q_first):
    """Rows [BM] that are queries: below the length and not before the first query row."""
    return (rows < length) & (rows >= q_first)


def fast_math(dtype) -> bool:
    """Whether SiLU may use the hardware tanh (16-bit inputs: see the module docstring)."""
    return jnp.dtype(dtype).itemsize == 2


def _tanh(x, cfg: MhaConfig):
    return jnp.tanh(x) if cfg.interpret else pltr.approx_tanh(x)


def silu(s: jax.Array, cfg: MhaConfig, fast: bool) -> jax.Array:
    """fp32 s * sigmoid(s) of a tile (one hardware tanh when fast)."""
    if fast:
        h = 0.5 * s
        return h + h * _tanh(h, cfg)
    return s * jax.nn.sigmoid(s)


def sigmoid(s: jax.Array, cfg: MhaConfig, fast: bool) -> jax.Array:
    """fp32 sigmoid(s) of a tile (0.5 + 0.5 tanh(s / 2) when fast)."""
    return 0.5 + 0.5 * _tanh(0.5 * s, cfg) if fast else jax.nn.sigmoid(s)


def tile_mask(rows, cols, length, n_hist, q_first=None):
    """Which (query row, key col) pairs attend; rows/cols int32, broadcastable to the tile.
    q_first: the first computed query row (candidates_only), None for every row."""
    seen = ((cols <= rows) & (cols < n_hist)) | (cols == rows)
    seen = seen & (rows < length) & (cols < length)
    return seen if q_first is None else seen & (rows >= q_first)


def seq_scalars(len_ref, hist_ref, b, cfg: MhaConfig):
    """(length, n_hist, first query row) of sequence b, int32 scalars."""
    length, n_hist = len_ref[b], hist_ref[b]
    return length, n_hist, (n_hist if cfg.candidates_only else jnp.zeros_like(n_hist))


def tile_rab(rows, cols, n_hist, bias_refs, q_time, k_time, cfg: MhaConfig, *, key_major: bool):
    """(rab, rows, cols) of a tile: its fp32 relative bias [BM, BN] ([BN, BM] when key_major; None
    without bias) and the rows / cols broadcast to the tile. Computed once per tile and shared by
    the program's heads (the bias does not depend on the head)."""
    if key_major:
        rows, cols = rows[None, :], cols[:, None]
    else:
        rows, cols = rows[:, None], cols[None, :]
    if not cfg.has_bias:
        return None, rows, cols
    q_time, k_time = (q_time[None, :], k_time[:, None]) if key_major else (q_time[:, None], k_time[None, :])
    pos_ref, tsw_ref, edges_ref = bias_refs
    rab = tile_bias(pos_ref, tsw_ref, edges_ref, jnp.minimum(rows, n_hist), jnp.minimum(cols, n_hist),
                    q_time, k_time, num_pos=cfg.num_pos, num_buckets=cfg.num_buckets, interpret=cfg.interpret)
    return rab, rows, cols


def scores(a: jax.Array, b: jax.Array, rab: jax.Array | None) -> jax.Array:
    """fp32 scores of one head's tile: a b^T (+ rab): q k^T [BM, BN], or k q^T [BN, BM] key-major."""
    s = dot(a, b, trans_b=True)
    return s if rab is None else s + rab


def split_refs(refs, cfg: MhaConfig, n_tensors: int):
    """(len, hist, tensors..., ts, qts, (pos, tsw, edges), rest) from a kernel's positional refs."""
    len_ref, hist_ref, *refs = refs
    tensors, refs = refs[:n_tensors], refs[n_tensors:]
    if cfg.has_bias:
        ts_ref, qts_ref, pos_ref, tsw_ref, edges_ref, *rest = refs
        return len_ref, hist_ref, tensors, ts_ref, qts_ref, (pos_ref, tsw_ref, edges_ref), rest
    return len_ref, hist_ref, tensors, None, None, None, list(refs)


def key_block(ts_ref, kb, bk: int, cfg: MhaConfig):
    """Key block kb of one sequence: its first row, positions [bk] and timestamps [bk] (None
    without bias)."""
    k_lo = pl.multiple_of(kb * bk, bk)
    cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    return k_lo, cols, (ts_ref[pl.ds(k_lo, bk)] if cfg.has_bias else None)


def program_heads(cfg: MhaConfig) -> range:
    """The heads of a program's [.., G, d] blocks (static: the loop over them is unrolled)."""
    return range(cfg.heads_per_program)


class QueryBlock(NamedTuple):
    """The query block a forward or dQ program computes: rows [q_lo, q_lo + BQ) of sequence b."""

    q_lo: jax.Array
    rows: jax.Array  # int32 [BQ]
    length: jax.Array
    n_hist: jax.Array
    q_first: jax.Array
    q_time: jax.Array | None  # int32 [BQ], the rows' query timestamps (None without bias)

    def mask(self, rows, cols):
        """`tile_mask` of a tile of this block (rows, cols broadcast to the tile)."""
        return tile_mask(rows, cols, self.length, self.n_hist, self.q_first)

    def finish(self, acc: jax.Array, cfg: MhaConfig) -> jax.Array:
        """acc [BQ, d] scaled by 1 / norm once, rows that are not queries zeroed."""
        return jnp.where(row_valid(self.rows, self.length, self.q_first)[:, None], acc * (1.0 / cfg.norm), 0.0)


def query_block(len_ref, hist_ref, qts_ref, block_q: int, cfg: MhaConfig) -> QueryBlock:
    """This program's query block (grid (N / BQ, B, h), query blocks `heavy_first`)."""
    qb, b = heavy_first(pl.program_id(0), pl.num_programs(0)), pl.program_id(1)
    length, n_hist, q_first = seq_scalars(len_ref, hist_ref, b, cfg)
    q_lo = qb * block_q
    rows = q_lo + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q_time = qts_ref[pl.ds(pl.multiple_of(q_lo, block_q), block_q)] if cfg.has_bias else None
    return QueryBlock(q_lo, rows, length, n_hist, q_first, q_time)


def over_key_blocks(body, init, blk: QueryBlock, block_q: int, block_k: int):
    """carry = body(kb, carry, masked=...) over the key blocks the query block sees (module
    docstring): the blocks every row sees whole unmasked, then the rest masked."""
    a, c, d = key_block_ranges(blk.q_lo, blk.length, blk.n_hist, blk.q_first, block_q, block_k)
    f = full_key_blocks(blk.q_lo, blk.n_hist, a, block_k)
    masked = functools.partial(body, masked=True)
    carry = lax.fori_loop(0, f, functools.partial(body, masked=False), init)
    carry = lax.fori_loop(f, a, masked, carry)
    return lax.fori_loop(c, d, masked, carry)


def zero_unseen(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x with the tile's unseen pairs zeroed (mask None: a tile every row sees whole)."""
    return x if mask is None else jnp.where(mask, x, 0.0)


def walk_query_block(head_step, blk: QueryBlock, k_ref, v_ref, ts_ref, bias_refs, out_ref, block_k: int,
                     cfg: MhaConfig, epilogue=None):
    """The forward and dQ programs' shared walk: over the key blocks the query block sees
    (`over_key_blocks`), each tile's relative bias and mask computed once, then for every head g
    of the program acc_g = head_step(g, acc_g, k [BK, d], v [BK, d], rab, mask) (mask None on
    whole tiles); out_ref[:, g, :] = the finished acc_g ([BQ, out_ref's d] fp32, zeros to start),
    passed through epilogue(g, acc) first if given."""
    heads = program_heads(cfg)

    def body(kb, accs, *, masked: bool):
        k_lo, cols, k_time = key_block(ts_ref, kb, block_k, cfg)
        rab, r2, c2 = tile_rab(blk.rows, cols, blk.n_hist, bias_refs, blk.q_time, k_time, cfg, key_major=False)
        mask = blk.mask(r2, c2) if masked else None
        return tuple(head_step(g, acc, k_ref[pl.ds(k_lo, block_k), g, :], v_ref[pl.ds(k_lo, block_k), g, :], rab, mask)
                     for g, acc in zip(heads, accs))

    init = tuple(jnp.zeros((blk.rows.shape[0], out_ref.shape[-1]), jnp.float32) for _ in heads)
    accs = over_key_blocks(body, init, blk, blk.rows.shape[0], block_k)
    for g, acc in zip(heads, accs):
        acc = blk.finish(acc, cfg)
        out_ref[:, g, :] = (acc if epilogue is None else epilogue(g, acc)).astype(out_ref.dtype)


def _forward_kernel(*refs, cfg: MhaConfig):
    len_ref, hist_ref, (q_ref, k_ref, v_ref), ts_ref, qts_ref, bias_refs, (o_ref,) = split_refs(refs, cfg, 3)
    blk = query_block(len_ref, hist_ref, qts_ref, cfg.block_q, cfg)
    qs = [q_ref[:, g, :] for g in program_heads(cfg)]
    fast = fast_math(q_ref.dtype)

    def head_step(g, acc, k, v, rab, mask):
        p = zero_unseen(silu(scores(qs[g], k, rab), cfg, fast), mask)
        return acc + dot(p.astype(v.dtype), v)

    walk_query_block(head_step, blk, k_ref, v_ref, ts_ref, bias_refs, o_ref, cfg.block_k, cfg)


def pair_count(n: int) -> int:
    """Query-key pairs a causal kernel computes per (sequence, head) at padded length n."""
    return n * (n + 1) // 2


def bias_specs(cfg: MhaConfig, n: int, seq_index, pos_w, ts_w, edges):
    """BlockSpecs of (timestamps, query timestamps, pos_w, ts_w, edges): whole rows / whole tables."""
    if not cfg.has_bias:
        return []
    row = pl.BlockSpec((None, n), seq_index)
    return [row, row, *(pl.BlockSpec(t.shape, lambda *_: (0,)) for t in (pos_w, ts_w, edges))]


def mha_forward(q, k, v, lengths, n_hist, ts, qts, pos_w, ts_w, edges, cfg: MhaConfig) -> jax.Array:
    """The forward pallas_call on padded inputs (see `hstu_attention.py`); -> [B, N, h, dv]."""
    bsz, n, heads, dqk = q.shape
    dv = v.shape[-1]
    bq, g = cfg.block_q, cfg.heads_per_program
    nq = n // bq
    scalar = pl.BlockSpec(lengths.shape, lambda *_: (0,))
    in_specs = [
        scalar, scalar,
        pl.BlockSpec((None, bq, g, dqk), lambda i, b, h: (b, heavy_first(i, nq), h, 0)),
        pl.BlockSpec((None, n, g, dqk), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, n, g, dv), lambda i, b, h: (b, 0, h, 0)),
        *bias_specs(cfg, n, lambda i, b, h: (b, 0), pos_w, ts_w, edges),
    ]
    bias_args = (ts, qts, pos_w, ts_w, edges) if cfg.has_bias else ()
    pairs = bsz * heads * pair_count(n)
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * pairs * (dqk + dv) + 6 * pairs,
        transcendentals=pairs + (pairs // g if cfg.has_bias else 0),  # the SiLU's tanh (+ the bucket's log)
        bytes_accessed=itemsize * (q.size + k.size + v.size + q.size // dqk * dv) + 8 * bsz * n,
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=out_struct((bsz, n, heads, dv), v.dtype, q, k, v, lengths, n_hist, ts, qts, pos_w, ts_w),
        grid=(n // bq, bsz, heads // g),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, g, dv), lambda i, b, h: (b, heavy_first(i, nq), h, 0)),
        compiler_params=cfg.compiler_params(max(dqk, dv)),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="hstu_attention_fwd",
    )(lengths, n_hist, q, k, v, *bias_args)
