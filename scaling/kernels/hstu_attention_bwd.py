"""HSTU attention backward kernels: dK/dV, dQ and the relative bias's score gradient.

With p = silu(s) / norm (masked) and out = p v, for an output gradient dO:

    dV = p^T dO,   dP = dO V^T,   dS = dP * sigmoid(s) (1 + s (1 - sigmoid(s))) / norm  (masked),
    dK = dS^T Q,   dQ = dS K,     d rab = sum over heads of dS

There is no softmax, hence no row statistics to save and no delta = rowsum(dO * O) pre-pass: the
residuals are the inputs alone and every kernel recomputes s from q, k and the in-kernel bias.
Three kernels, none with atomics or cross-program writes (FlashAttention-2's split), each program
holding G heads (`heads_per_program`; dK/dV's G_kv may be smaller) that share its tiles' mask and
relative bias:

  dkdv   grid (N / BK, B, h / G_kv): a key block accumulates dK, dV over the query blocks that
         see it (`query_block_range`: from the diagonal to the length; a candidate key only its
         own row). Computed key-major (s^T = k q^T) so no tile is transposed. When G_kv = h (one
         program holds every head) it also sums dS over the heads and writes each tile of the bias
         gradient (zeros for the query blocks it does not see), and the dbias kernel does not run.
  dq     grid (N / BQ, B, h / G): a query block accumulates dQ over the forward's key-block ranges
         (the longest rows launched first, as in the forward).
  dbias  grid (N / BK, N / BQ, B), only with the relative bias and G_kv < h: one program per
         visited tile loops over all the heads (recomputing s and dP per head, the bias once per
         tile), sums dS in fp32 registers and writes the tile.

Each kernel has its own tile (BQ, BK): dK/dV's (MhaConfig.dkdv_block_q, dkdv_block_k), dQ's
(dq_block_q, dq_block_k), and dbias's (dkdv_block_q, dbias_block_k: the widest block, which its
lone [BK, BQ] fp32 accumulator affords where dK/dV's two [BK, d] per head do not). A kernel's
stationary block (dK/dV's and dbias's keys, dQ's queries) is the row count of its dots' outputs,
which Hopper's wgmma needs at >= 64 (hstu_attention.Blocks). dK/dV may also hold fewer heads per
program than the other kernels (dkdv_heads_per_program), for the same reason.

Fused with the projection's SiLU (`Packed`, the training step's path: hstu_attention.projected_mha):
q, k, v are silu(pre) of one packed pre-activation [B, N, 4, h, d] = (u, v, q, k) sections, and
instead of dQ, dK, dV the kernels write the pre-activation's gradient into one packed buffer:
d pre = d post * silu'(pre), from the fp32 accumulators, once per output tile. dK/dV writes the v
and k sections and the gate's u section (d u * silu'(u), the gate's cotangent passed in); dQ writes
the q section of the same buffer in place (input_output_aliases). So the projection's backward
gets its matmul operand directly, with no join of four gradient slices and no SiLU-backward pass.

The bias gradient is a float32 [B, N keys, N queries] buffer (key-major, as dK/dV computes it);
hstu_bias.table_grads reduces it to the two tables' gradients (why: hstu_bias.py).

bf16 inputs: matmul operands in bf16 (p and dS cast, as the forward casts p), accumulation and the
SiLU derivative in fp32, gradients stored in the input dtype. As in the forward (its docstring):
tiles every row of which sees every key are not masked, the sigmoid of 16-bit kernels is one
hardware tanh, and the 1 / norm scales the accumulators (dK, dV, dQ, the dbias tile) once, since
dS enters them linearly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scaling.kernels.hstu_attention_fwd import (MhaConfig, bias_specs, fast_math, full_query_blocks, key_block_ranges,
                                                pair_count, program_heads, query_block, query_block_range, scores,
                                                seq_scalars, sigmoid, split_refs, tile_mask, tile_rab,
                                                walk_query_block, zero_unseen)
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import dot, heavy_first


# The sections of a packed pre-activation [B, N, 4, h, d] (HSTU's u, v, q, k projection).
U, V, Q, K = range(4)


class Packed(NamedTuple):
    """The projection the kernels' q, k, v came from, for the fused backward (module docstring):
    pre [B, N, 4, h, d] the pre-activation (q = alpha silu(pre[:, :, Q]), k, v = silu(...)), du
    [B, N, h, d] the gate u = silu(pre[:, :, U])'s cotangent."""

    pre: jax.Array
    du: jax.Array
    alpha: float = 1.0


def silu_derivative(s: jax.Array, sig: jax.Array) -> jax.Array:
    """d silu(s) / ds from s and sigmoid(s)."""
    return sig * (1.0 + s * (1.0 - sig))


def tanh_sigmoid(x: jax.Array) -> jax.Array:
    """sigmoid(x) as (1 + tanh(x / 2)) / 2, with no division (one tanh.approx.f32 on Mosaic GPU
    under approx_math)."""
    return 0.5 + 0.5 * jnp.tanh(0.5 * x)


def _silu_grad(s: jax.Array, cfg: MhaConfig, fast: bool) -> tuple[jax.Array, jax.Array]:
    """(d silu(s) / ds, silu(s)), fp32 (the 1 / norm is applied by the caller)."""
    sig = sigmoid(s, cfg, fast)
    return silu_derivative(s, sig), s * sig


def _through_silu(grad: jax.Array, pre: jax.Array) -> jax.Array:
    """The pre-activation's gradient grad * silu'(pre), fp32, once per output element. The sigmoid
    is (1 + tanh(x / 2)) / 2 with the exact tanh: the logistic's IEEE division made one fp32
    kernel spill (benchmarks/kernel_compile.py --projected)."""
    x = pre.astype(jnp.float32)
    return grad * silu_derivative(x, tanh_sigmoid(x))


def _dkdv_kernel(*refs, cfg: MhaConfig, dbias: bool, packed: bool):
    len_ref, hist_ref, tensors, ts_ref, qts_ref, bias_refs, outs = split_refs(refs, cfg, 6 if packed else 4)
    q_ref, k_ref, v_ref, do_ref, *packed_in = tensors
    if packed:
        pre_ref, du_ref = packed_in
        d_ref, *drab_ref = outs  # [BK, 4, G, d]: writes the u, v, k sections
    else:
        dk_ref, dv_ref, *drab_ref = outs
    bq, bk = cfg.dkdv_block_q, cfg.dkdv_block_k
    kb, b = pl.program_id(0), pl.program_id(1)
    length, n_hist, q_first = seq_scalars(len_ref, hist_ref, b, cfg)
    k_lo = kb * bk
    cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    heads = program_heads(cfg)
    ks, vs = [k_ref[:, g, :] for g in heads], [v_ref[:, g, :] for g in heads]
    k_time = ts_ref[pl.ds(pl.multiple_of(k_lo, bk), bk)] if cfg.has_bias else None
    fast = fast_math(k_ref.dtype)

    def body(qb, carry, *, masked: bool):
        q_lo = pl.multiple_of(qb * bq, bq)
        rows = q_lo + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        q_time = qts_ref[pl.ds(q_lo, bq)] if cfg.has_bias else None
        rab, r2, c2 = tile_rab(rows, cols, n_hist, bias_refs, q_time, k_time, cfg, key_major=True)
        mask = tile_mask(r2, c2, length, n_hist, q_first) if masked else None
        dks, dvs, drab = [], [], None
        for g, dk, dv in zip(heads, *carry):
            q, do = q_ref[pl.ds(q_lo, bq), g, :], do_ref[pl.ds(q_lo, bq), g, :]
            grad, p = _silu_grad(scores(ks[g], q, rab), cfg, fast)
            ds_t = dot(vs[g], do, trans_b=True) * grad
            p, ds_t = zero_unseen(p, mask), zero_unseen(ds_t, mask)
            if dbias:
                drab = ds_t if drab is None else drab + ds_t
            dks.append(dk + dot(ds_t.astype(q.dtype), q))
            dvs.append(dv + dot(p.astype(do.dtype), do))
        if dbias:
            drab_ref[0][:, pl.ds(q_lo, bq)] = drab * (1.0 / cfg.norm)
        return tuple(dks), tuple(dvs)

    full, masked = functools.partial(body, masked=False), functools.partial(body, masked=True)
    lo, hi = query_block_range(k_lo, length, n_hist, q_first, bq, bk)
    fl, fh = full_query_blocks(k_lo, length, n_hist, q_first, lo, hi, bq, bk)
    carry = tuple(tuple(jnp.zeros((bk, r.shape[-1]), jnp.float32) for _ in heads) for r in (k_ref, v_ref))
    carry = lax.fori_loop(lo, fl, masked, carry)
    carry = lax.fori_loop(fl, fh, full, carry)
    dks, dvs = lax.fori_loop(fh, hi, masked, carry)
    for g, dk, dv in zip(heads, dks, dvs):
        dk, dv = dk * (1.0 / cfg.norm), dv * (1.0 / cfg.norm)
        if packed:
            d_ref[:, K, g, :] = _through_silu(dk, pre_ref[:, K, g, :]).astype(d_ref.dtype)
            d_ref[:, V, g, :] = _through_silu(dv, pre_ref[:, V, g, :]).astype(d_ref.dtype)
            du = du_ref[:, g, :].astype(jnp.float32)
            d_ref[:, U, g, :] = _through_silu(du, pre_ref[:, U, g, :]).astype(d_ref.dtype)
        else:
            dk_ref[:, g, :] = dk.astype(dk_ref.dtype)
            dv_ref[:, g, :] = dv.astype(dv_ref.dtype)
    if dbias:  # the query blocks this key block is not seen by get zeros
        def zero(qb, carry):
            drab_ref[0][:, pl.ds(pl.multiple_of(qb * bq, bq), bq)] = jnp.zeros((bk, bq), jnp.float32)
            return carry

        lax.fori_loop(0, lo, zero, 0)
        lax.fori_loop(hi, drab_ref[0].shape[1] // bq, zero, 0)


def _dq_kernel(*refs, cfg: MhaConfig, alpha: float | None):
    """alpha: the packed backward's q scale (None: plain dQ)."""
    packed = alpha is not None
    len_ref, hist_ref, tensors, ts_ref, qts_ref, bias_refs, (dq_ref,) = split_refs(refs, cfg, 6 if packed else 4)
    q_ref, k_ref, v_ref, do_ref, *packed_in = tensors  # packed: pre's q section, the dK/dV buffer (aliased)
    epilogue = None
    if packed:
        pre_ref = packed_in[0]

        def epilogue(g, dq):  # q = alpha silu(pre): the q section of d pre
            return _through_silu(alpha * dq, pre_ref[:, g, :])
    blk = query_block(len_ref, hist_ref, qts_ref, cfg.dq_block_q, cfg)
    heads = program_heads(cfg)
    qs, dos = [q_ref[:, g, :] for g in heads], [do_ref[:, g, :] for g in heads]
    fast = fast_math(q_ref.dtype)

    def head_step(g, dq, k, v, rab, mask):
        grad, _ = _silu_grad(scores(qs[g], k, rab), cfg, fast)
        ds = zero_unseen(dot(dos[g], v, trans_b=True) * grad, mask)
        return dq + dot(ds.astype(k.dtype), k)

    walk_query_block(head_step, blk, k_ref, v_ref, ts_ref, bias_refs, dq_ref, cfg.dq_block_k, cfg, epilogue=epilogue)


def _dbias_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, do_ref, ts_ref, qts_ref, pos_ref, tsw_ref, edges_ref,
                  drab_ref, *, cfg: MhaConfig, heads: int):
    bq, bk = cfg.dkdv_block_q, cfg.dbias_block_k
    kb, qb, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, n_hist, q_first = seq_scalars(len_ref, hist_ref, b, cfg)
    q_lo, k_lo = qb * bq, kb * bk
    a, c, d = key_block_ranges(q_lo, length, n_hist, q_first, bq, bk)
    visited = (kb < a) | ((kb >= c) & (kb < d))

    @pl.when(visited)
    def _():
        rows = q_lo + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        q_time = qts_ref[pl.ds(pl.multiple_of(q_lo, bq), bq)]
        k_time = ts_ref[pl.ds(pl.multiple_of(k_lo, bk), bk)]
        rab, r2, c2 = tile_rab(rows, cols, n_hist, (pos_ref, tsw_ref, edges_ref), q_time, k_time, cfg,
                               key_major=True)
        fast = fast_math(q_ref.dtype)

        def head(h, g):
            grad, _ = _silu_grad(scores(k_ref[:, h, :], q_ref[:, h, :], rab), cfg, fast)
            return g + dot(v_ref[:, h, :], do_ref[:, h, :], trans_b=True) * grad

        g = lax.fori_loop(0, heads, head, jnp.zeros((bk, bq), jnp.float32))  # masked once, after the heads
        drab_ref[...] = jnp.where(tile_mask(r2, c2, length, n_hist, q_first), g * (1.0 / cfg.norm), 0.0)

    @pl.when(jnp.logical_not(visited))
    def _():
        drab_ref[...] = jnp.zeros((bk, bq), jnp.float32)


def mha_backward(q, k, v, do, lengths, n_hist, ts, qts, pos_w, ts_w, edges, cfg: MhaConfig,
                 packed: Packed | None = None):
    """(dq, dk, dv, drab) on padded inputs. drab: float32 [B, N keys, N queries] (key-major, as
    hstu_bias.table_grads reads it), the head-summed score gradient; None without the bias.

    When one dK/dV program holds every head (its heads per program G_kv == h) it sums dS over its
    heads as it goes and writes drab itself; otherwise the dbias kernel recomputes it.

    With `packed` (module docstring) it returns (d pre [B, N, 4, h, d], None, None, drab): the
    projection's gradient in place of dq, dk, dv (which then must share one head dim)."""
    bsz, n, heads, dqk = q.shape
    dv_dim = v.shape[-1]
    bq, bk, dq_bq = cfg.dkdv_block_q, cfg.dkdv_block_k, cfg.dq_block_q
    g, g_kv = cfg.heads_per_program, cfg.dkdv_heads_per_program or cfg.heads_per_program
    kv_cfg = dataclasses.replace(cfg, heads_per_program=g_kv)
    fused = cfg.has_bias and g_kv == heads
    scalar = pl.BlockSpec(lengths.shape, lambda *_: (0,))
    bias_args = (ts, qts, pos_w, ts_w, edges) if cfg.has_bias else ()
    pairs = bsz * heads * pair_count(n)
    itemsize = q.dtype.itemsize
    tensor_bytes = itemsize * (q.size + k.size + 2 * v.size + q.size + k.size)
    params = cfg.compiler_params(max(dqk, dv_dim))
    inputs = (q, k, v, do, lengths, n_hist, ts, qts, pos_w, ts_w)
    drab_struct = out_struct((bsz, n, n), jnp.float32, *inputs)
    rab_ops = pairs // g if cfg.has_bias else 0  # the bias, once per tile for G heads

    def whole(d, heads_at=g):
        return pl.BlockSpec((None, n, heads_at, d), lambda i, b, h: (b, 0, h, 0))

    def block(size, d):  # dK/dV's key block
        return pl.BlockSpec((None, size, g_kv, d), lambda i, b, h: (b, i, h, 0))

    def query_block(d):  # the dq grid runs its query blocks heavy_first
        return pl.BlockSpec((None, dq_bq, g, d), lambda i, b, h: (b, heavy_first(i, n // dq_bq), h, 0))

    packed_args, dkdv_extra, dq_extra, packed_bytes = (), [], [], 0
    if packed:
        if dqk != dv_dim or packed.pre.shape != (bsz, n, 4, heads, dqk) or packed.du.shape != v.shape:
            raise ValueError(f"the packed backward needs pre [B, N, 4, h, d] and du [B, N, h, d] for q, k, v "
                             f"{q.shape}, {v.shape}; got {packed.pre.shape}, {packed.du.shape}")
        packed_args = (packed.pre, packed.du)
        # dK/dV: its key rows' four sections (reads u, v, k; writes u, v, k); dQ: the q section.
        sections = pl.BlockSpec((None, bk, 4, g_kv, dqk), lambda i, b, h: (b, i, 0, h, 0))
        q_section = pl.BlockSpec((None, dq_bq, None, g, dqk),
                                 lambda i, b, h: (b, heavy_first(i, n // dq_bq), Q, h, 0))
        dkdv_extra, dq_extra = [sections, block(bk, dqk)], [q_section, q_section]
        packed_bytes = itemsize * (packed.pre.size + packed.du.size + 2 * v.size)  # + the u section's read
        out_shape = (out_struct(packed.pre.shape, q.dtype, *inputs, *packed_args),)
        out_specs = (sections,)
    else:
        out_shape = (out_struct(k.shape, k.dtype, *inputs), out_struct(v.shape, v.dtype, *inputs))
        out_specs = (block(bk, dqk), block(bk, dv_dim))
    if fused:
        out_shape += (drab_struct,)
        out_specs += (pl.BlockSpec((None, bk, n), lambda i, b, h: (b, i, 0)),)
    outs = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=kv_cfg, dbias=fused, packed=packed is not None),
        out_shape=out_shape,
        grid=(n // bk, bsz, heads // g_kv),
        in_specs=[scalar, scalar, whole(dqk, g_kv), block(bk, dqk), block(bk, dv_dim), whole(dv_dim, g_kv), *dkdv_extra,
                  *bias_specs(cfg, n, lambda i, b, h: (b, 0), pos_w, ts_w, edges)],
        out_specs=out_specs,
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=4 * pairs * (dqk + dv_dim) + 12 * pairs,
                                      transcendentals=pairs + (pairs // g_kv if cfg.has_bias else 0),
                                      bytes_accessed=tensor_bytes + packed_bytes + (4 * bsz * n * n if fused else 0)),
        interpret=cfg.interpret,
        name="hstu_attention_dkdv",
    )(lengths, n_hist, q, k, v, do, *packed_args, *bias_args)
    fused_drab = outs[-1] if fused else None
    # packed: outs[0] is the d pre buffer, whose q section the dQ kernel fills in place
    dk, dv = (None, None) if packed else outs[:2]

    dq_args = (packed.pre, outs[0]) if packed else ()
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, alpha=packed.alpha if packed else None),
        out_shape=out_shape[0] if packed else out_struct(q.shape, q.dtype, *inputs),
        grid=(n // dq_bq, bsz, heads // g),
        in_specs=[scalar, scalar, query_block(dqk), whole(dqk), whole(dv_dim), query_block(dv_dim), *dq_extra,
                  *bias_specs(cfg, n, lambda i, b, h: (b, 0), pos_w, ts_w, edges)],
        out_specs=dq_extra[-1] if packed else query_block(dqk),
        # packed: writes the q section of dK/dV's buffer in place (its input 7: after the 2
        # scalars, q, k, v, dO and pre)
        input_output_aliases={7: 0} if packed else {},
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=2 * pairs * (2 * dqk + dv_dim) + 10 * pairs,
                                      transcendentals=pairs + rab_ops,
                                      bytes_accessed=tensor_bytes + (itemsize * q.size if packed else 0)),
        interpret=cfg.interpret,
        name="hstu_attention_dq",
    )(lengths, n_hist, q, k, v, do, *dq_args, *bias_args)

    if not cfg.has_bias:
        return dq, dk, dv, None
    if fused:
        return dq, dk, dv, fused_drab

    def tile(size, d, at):
        return pl.BlockSpec((None, size, heads, d), lambda j, i, b: (b, at(j, i), 0, 0))

    bk = cfg.dbias_block_k  # its own key block: it holds no [BK, d] accumulators (module docstring)
    drab = pl.pallas_call(
        functools.partial(_dbias_kernel, cfg=cfg, heads=heads),
        out_shape=drab_struct,
        grid=(n // bk, n // bq, bsz),
        in_specs=[scalar, scalar, tile(bq, dqk, lambda j, i: i), tile(bk, dqk, lambda j, i: j),
                  tile(bk, dv_dim, lambda j, i: j), tile(bq, dv_dim, lambda j, i: i),
                  *bias_specs(cfg, n, lambda j, i, b: (b, 0), pos_w, ts_w, edges)],
        out_specs=pl.BlockSpec((None, bk, bq), lambda j, i, b: (b, j, i)),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=2 * pairs * (dqk + dv_dim) + 12 * pairs, transcendentals=2 * pairs,
                                      bytes_accessed=tensor_bytes + 4 * bsz * n * n),
        interpret=cfg.interpret,
        name="hstu_attention_dbias",
    )(lengths, n_hist, q, k, v, do, *bias_args)
    return dq, dk, dv, drab
