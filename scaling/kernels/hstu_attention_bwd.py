"""HSTU attention backward kernels: dK/dV, dQ and the relative bias's score gradient.

With p = silu(s) / norm (masked) and out = p v, for an output gradient dO:

    dV = p^T dO,   dP = dO V^T,   dS = dP * sigmoid(s) (1 + s (1 - sigmoid(s))) / norm  (masked),
    dK = dS^T Q,   dQ = dS K,     d rab = sum over heads of dS

There is no softmax, hence no row statistics to save and no delta = rowsum(dO * O) pre-pass: the
residuals are the inputs alone and every kernel recomputes s from q, k and the in-kernel bias.
Three kernels, none with atomics or cross-program writes (FlashAttention-2's split):

  dkdv   grid (N / BK, B, h): a key block accumulates dK, dV over the query blocks that see it
         (`query_block_range`: from the diagonal to the length; a candidate key only its own row).
         Computed key-major (s^T = k q^T) so no tile is transposed.
  dq     grid (N / BQ, B, h): a query block accumulates dQ over the forward's key-block ranges
         (the longest rows launched first, as in the forward).
  dbias  grid (N / BQ, N / BK, B), only with the relative bias: one program per visited tile loops
         over the heads (recomputing s and dP per head, the bias once per tile), sums dS in fp32
         registers and writes the tile to a float32 [B, N, N] buffer (zeros for tiles not visited);
         hstu_bias.table_grads reduces it to the two tables' gradients (why: hstu_bias.py).

bf16 inputs: matmul operands in bf16 (p and dS cast, as the forward casts p), accumulation and the
SiLU derivative in fp32, gradients stored in the input dtype. As in the forward (its docstring):
tiles every row of which sees every key are not masked, the sigmoid of 16-bit kernels is one
hardware tanh, and the 1 / norm scales the accumulators (dK, dV, dQ, the dbias tile) once, since
dS enters them linearly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scaling.kernels.hstu_attention_fwd import (MhaConfig, bias_specs, dot, fast_math, full_query_blocks, heavy_first,
                                                key_block_ranges, key_tile, over_key_blocks, pair_count, query_block,
                                                query_block_range, scores, seq_scalars, sigmoid, split_refs,
                                                tile_mask)
from scaling.kernels.hstu_bias import tile_bias
from scaling.kernels.sharded import out_struct


def _silu_grad(s: jax.Array, cfg: MhaConfig, fast: bool) -> tuple[jax.Array, jax.Array]:
    """(d silu(s) / ds, silu(s)), fp32 (the 1 / norm is applied by the caller)."""
    sig = sigmoid(s, cfg, fast)
    return sig * (1.0 + s * (1.0 - sig)), s * sig


def _dkdv_kernel(*refs, cfg: MhaConfig):
    len_ref, hist_ref, (q_ref, k_ref, v_ref, do_ref), ts_ref, qts_ref, bias_refs, (dk_ref, dv_ref) = (
        split_refs(refs, cfg, 4))
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    kb, b = pl.program_id(0), pl.program_id(1)
    length, n_hist, q_first = seq_scalars(len_ref, hist_ref, b, cfg)
    k_lo = kb * bk
    cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k, v = k_ref[...], v_ref[...]
    k_time = ts_ref[pl.ds(pl.multiple_of(k_lo, bk), bk)] if cfg.has_bias else None
    fast = fast_math(k.dtype)

    def body(qb, carry, *, masked: bool):
        dk, dv = carry
        q_lo = pl.multiple_of(qb * bq, bq)
        q, do = q_ref[pl.ds(q_lo, bq), :], do_ref[pl.ds(q_lo, bq), :]
        rows = q_lo + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        q_time = qts_ref[pl.ds(q_lo, bq)] if cfg.has_bias else None
        s_t, r2, c2 = scores(q, k, rows, cols, n_hist, bias_refs, q_time, k_time, cfg, key_major=True)
        grad, p = _silu_grad(s_t, cfg, fast)
        ds_t = dot(v, do, trans_b=True) * grad
        if masked:
            mask = tile_mask(r2, c2, length, n_hist, q_first)
            p, ds_t = jnp.where(mask, p, 0.0), jnp.where(mask, ds_t, 0.0)
        return dk + dot(ds_t.astype(q.dtype), q), dv + dot(p.astype(do.dtype), do)

    full, masked = functools.partial(body, masked=False), functools.partial(body, masked=True)
    lo, hi = query_block_range(k_lo, length, n_hist, q_first, bq, bk)
    fl, fh = full_query_blocks(k_lo, length, n_hist, q_first, lo, hi, bq, bk)
    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    carry = lax.fori_loop(lo, fl, masked, carry)
    carry = lax.fori_loop(fl, fh, full, carry)
    dk, dv = lax.fori_loop(fh, hi, masked, carry)
    dk_ref[...] = (dk * (1.0 / cfg.norm)).astype(dk_ref.dtype)
    dv_ref[...] = (dv * (1.0 / cfg.norm)).astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: MhaConfig):
    len_ref, hist_ref, (q_ref, k_ref, v_ref, do_ref), ts_ref, qts_ref, bias_refs, (dq_ref,) = split_refs(refs, cfg, 4)
    blk = query_block(len_ref, hist_ref, qts_ref, cfg.bwd_block_q, cfg)
    q, do = q_ref[...], do_ref[...]
    fast = fast_math(q.dtype)

    def body(kb, dq, *, masked: bool):
        k, v, cols, k_time = key_tile(k_ref, v_ref, ts_ref, kb, cfg.bwd_block_k, cfg)
        s, r2, c2 = scores(q, k, blk.rows, cols, blk.n_hist, bias_refs, blk.q_time, k_time, cfg, key_major=False)
        grad, _ = _silu_grad(s, cfg, fast)
        ds = dot(do, v, trans_b=True) * grad
        if masked:
            ds = jnp.where(blk.mask(r2, c2), ds, 0.0)
        return dq + dot(ds.astype(k.dtype), k)

    dq = over_key_blocks(body, jnp.zeros(dq_ref.shape, jnp.float32), blk, cfg.bwd_block_q, cfg.bwd_block_k)
    dq_ref[...] = blk.finish(dq, cfg).astype(dq_ref.dtype)


def _dbias_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, do_ref, ts_ref, qts_ref, pos_ref, tsw_ref, edges_ref,
                  drab_ref, *, cfg: MhaConfig, heads: int):
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    qb, kb, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, n_hist, q_first = seq_scalars(len_ref, hist_ref, b, cfg)
    q_lo, k_lo = qb * bq, kb * bk
    a, c, d = key_block_ranges(q_lo, length, n_hist, q_first, bq, bk)
    visited = (kb < a) | ((kb >= c) & (kb < d))

    @pl.when(visited)
    def _():
        rows = (q_lo + lax.broadcasted_iota(jnp.int32, (bq,), 0))[:, None]
        cols = (k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0))[None, :]
        q_time = qts_ref[pl.ds(pl.multiple_of(q_lo, bq), bq)][:, None]
        k_time = ts_ref[pl.ds(pl.multiple_of(k_lo, bk), bk)][None, :]
        bias = tile_bias(pos_ref, tsw_ref, edges_ref, jnp.minimum(rows, n_hist), jnp.minimum(cols, n_hist),
                         q_time, k_time, num_pos=cfg.num_pos, num_buckets=cfg.num_buckets,
                         interpret=cfg.interpret)
        fast = fast_math(q_ref.dtype)

        def head(h, g):
            s = dot(q_ref[:, h, :], k_ref[:, h, :], trans_b=True) + bias
            grad, _ = _silu_grad(s, cfg, fast)
            return g + dot(do_ref[:, h, :], v_ref[:, h, :], trans_b=True) * grad

        g = lax.fori_loop(0, heads, head, jnp.zeros((bq, bk), jnp.float32))  # masked once, after the heads
        drab_ref[...] = jnp.where(tile_mask(rows, cols, length, n_hist, q_first), g * (1.0 / cfg.norm), 0.0)

    @pl.when(jnp.logical_not(visited))
    def _():
        drab_ref[...] = jnp.zeros((bq, bk), jnp.float32)


def mha_backward(q, k, v, do, lengths, n_hist, ts, qts, pos_w, ts_w, edges, cfg: MhaConfig):
    """(dq, dk, dv, drab) on padded inputs; drab float32 [B, N, N] (None without the bias)."""
    bsz, n, heads, dqk = q.shape
    dv_dim = v.shape[-1]
    bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    scalar = pl.BlockSpec(lengths.shape, lambda *_: (0,))
    bias_args = (ts, qts, pos_w, ts_w, edges) if cfg.has_bias else ()
    pairs = bsz * heads * pair_count(n)
    itemsize = q.dtype.itemsize
    tensor_bytes = itemsize * (q.size + k.size + 2 * v.size + q.size + k.size)
    params = cfg.compiler_params(max(dqk, dv_dim))
    inputs = (q, k, v, do, lengths, n_hist, ts, qts, pos_w, ts_w)

    def whole(d):
        return pl.BlockSpec((None, n, None, d), lambda i, b, h: (b, 0, h, 0))

    def block(size, d):
        return pl.BlockSpec((None, size, None, d), lambda i, b, h: (b, i, h, 0))

    def query_block(d):  # the dq grid runs its query blocks heavy_first
        return pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, heavy_first(i, n // bq), h, 0))

    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        out_shape=(out_struct(k.shape, k.dtype, *inputs), out_struct(v.shape, v.dtype, *inputs)),
        grid=(n // bk, bsz, heads),
        in_specs=[scalar, scalar, whole(dqk), block(bk, dqk), block(bk, dv_dim), whole(dv_dim),
                  *bias_specs(cfg, n, lambda i, b, h: (b, 0), pos_w, ts_w, edges)],
        out_specs=(block(bk, dqk), block(bk, dv_dim)),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=4 * pairs * (dqk + dv_dim) + 12 * pairs, transcendentals=pairs,
                                      bytes_accessed=tensor_bytes),
        interpret=cfg.interpret,
        name="hstu_attention_dkdv",
    )(lengths, n_hist, q, k, v, do, *bias_args)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=out_struct(q.shape, q.dtype, *inputs),
        grid=(n // bq, bsz, heads),
        in_specs=[scalar, scalar, query_block(dqk), whole(dqk), whole(dv_dim), query_block(dv_dim),
                  *bias_specs(cfg, n, lambda i, b, h: (b, 0), pos_w, ts_w, edges)],
        out_specs=query_block(dqk),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=2 * pairs * (2 * dqk + dv_dim) + 10 * pairs, transcendentals=pairs,
                                      bytes_accessed=tensor_bytes),
        interpret=cfg.interpret,
        name="hstu_attention_dq",
    )(lengths, n_hist, q, k, v, do, *bias_args)

    if not cfg.has_bias:
        return dq, dk, dv, None

    def tile(size, d, at):
        return pl.BlockSpec((None, size, heads, d), lambda i, j, b: (b, at(i, j), 0, 0))

    drab = pl.pallas_call(
        functools.partial(_dbias_kernel, cfg=cfg, heads=heads),
        out_shape=out_struct((bsz, n, n), jnp.float32, *inputs),
        grid=(n // bq, n // bk, bsz),
        in_specs=[scalar, scalar, tile(bq, dqk, lambda i, j: i), tile(bk, dqk, lambda i, j: j),
                  tile(bk, dv_dim, lambda i, j: j), tile(bq, dv_dim, lambda i, j: i),
                  *bias_specs(cfg, n, lambda i, j, b: (b, 0), pos_w, ts_w, edges)],
        out_specs=pl.BlockSpec((None, bq, bk), lambda i, j, b: (b, i, j)),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=2 * pairs * (dqk + dv_dim) + 12 * pairs, transcendentals=2 * pairs,
                                      bytes_accessed=tensor_bytes + 4 * bsz * n * n),
        interpret=cfg.interpret,
        name="hstu_attention_dbias",
    )(lengths, n_hist, q, k, v, do, *bias_args)
    return dq, dk, dv, drab
