"""Softmax attention as Pallas kernels (FlashAttention-2): causal by position, one valid key range
per sequence, forward and backward.

    out = flash_mha(q, k, v, key_start=pad, q_offset=L - keep, impl="auto")   # [B, Nq, H, dv]

computes softmax(q k^T / sqrt(d)) v per head over the keys each query sees: query row i sits at
position q_offset + i, key j at position j, and key j is seen by query i iff
key_start[b] <= j < key_end[b] and (causal) j <= q_offset + i. A row that sees no key outputs 0,
as `transformer.dot_product_attention` does for a fully masked row. This is OneTrans's attention
(scaling/models/onetrans_block.py): right-aligned S-tokens (key_start = the padding count), the
NS-tokens after them, and queries the last `keep` S-tokens then the NS-tokens (q_offset =
L - keep), so the XLA path's [B, H, Nq, Nk] scores, probabilities and mask never reach memory.

Layout: q [B, Nq, H, d], k [B, Nk, H, d], v [B, Nk, H, dv] at their true sizes. The tiles are
powers of two >= 16 (Triton's tl.dot); rows past N and head columns past d (OneTrans-L's heads are
48 wide) are masked in every load and store, so no padded copy of q, k, v or the output is made.

Forward, grid (Nq / BQ, B, H), the longest causal rows first: an online softmax in base 2 (the
scores scaled by log2(e) / sqrt(d) once), fp32 row max, row sum and accumulator, p cast to v's
dtype for the p v dot. It also writes each row's log-sum-exp (base 2, [B, H, Nq]; +inf where a
row sees no key or is past Nq, so the backward's p is exactly 0 there).

Backward: delta = rowsum(dO * O) in XLA, then two kernels, no atomics:
  dkdv  grid (Nk / BK, B, H): a key block walks the query blocks that see it,
        p^T = exp2(s^T - lse), dV += p^T dO, dS^T = p^T (dO V^T - delta)^T, dK += dS^T Q;
  dq    grid (Nq / BQ, B, H): a query block walks the forward's key blocks, dQ += dS K;
dK and dQ are scaled by 1 / sqrt(d) once at the end.

Only tiles that cross the diagonal or an end of the key range are masked; the key blocks before
key_start and past the causal end are never loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from scaling.kernels.dispatch import dispatch
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import TILE_FIELDS, KernelTiles, cdiv, dot, heavy_first, ieee_fp32_dots, tile_dim
from scaling.models.transformer import dot_product_attention

__all__ = ["FlashBlocks", "flash_mha", "flops_per_pair", "pallas_flash_mha", "reference_flash_mha", "visible_pairs"]

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class FlashBlocks(KernelTiles):
    """Tile sizes (powers of two >= 16, capped at the lengths rounded up to powers of two) and
    Triton launch knobs; None picks the default (`resolve`, `launch_warps`).

    Each kernel has its own tile: the forward's (BQ query rows, BK keys per step), dK/dV's (a
    held key block of BK rows, query blocks of BQ streamed past it) and dQ's (a held query block,
    key blocks streamed). The held block is the row count of the kernel's dots' outputs, which
    Hopper's wgmma needs at >= 64 (else Triton emits Ampere's mma.sync; hstu_attention.Blocks has
    the same split). Defaults (`python -m benchmarks.kernel_compile --op flash [--dtype float32]`,
    which counts both instruction kinds), forward | dK/dV | dQ, BQ x BK:

        16-bit                    64 x 64 | 64 x 64 | 64 x 64   all on wgmma, no spill
        float32 (TF32), d <= 64   64 x 64 | 32 x 64 | 64 x 32   all on wgmma, no spill
        float32 (TF32), d = 128   64 x 64 | 32 x 32 | 64 x 32   dK/dV on mma.sync: 64 held keys
                                                                spilled 288-368 B there
        float32 (IEEE, 'highest') 32 x 32 everywhere (no tensor-core path)

    8 warps at head dims over 64 or for float32 inputs, else 4. A shared 64 x 64 backward tile
    had spilled in fp32 (dK/dV 132 B per thread with TF32 dots, 53 KB with IEEE fp32), and the
    former fp32 defaults, 32 x 32 everywhere, put every kernel on mma.sync. IEEE fp32 spills
    12-596 B per thread at head dim 128 even on 32 x 32 tiles."""

    def resolve(self, itemsize: int, head_dim: int = 64) -> tuple[int, ...]:
        """(forward BQ, BK, dK/dV BQ, BK, dQ BQ, BK) for inputs of `itemsize` bytes and head dims
        up to head_dim (class docstring)."""
        if itemsize <= 2:
            default = (64,) * 6
        elif ieee_fp32_dots():
            default = (32,) * 6
        else:  # TF32: dK/dV's 64 held keys spill at head dim 128
            default = (64, 64, *((32, 32) if tile_dim(head_dim) >= 128 else (32, 64)), 64, 32)
        return self.filled(default)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: the custom_vjp's nondiff argument)."""

    nq: int
    nk: int
    d: int  # true head dims
    dv: int
    d_p: int  # tile widths
    dv_p: int
    q_offset: int
    causal: bool
    block_q: int
    block_k: int
    dkdv_block_q: int
    dkdv_block_k: int
    dq_block_q: int
    dq_block_k: int
    num_warps: int
    num_stages: int
    interpret: bool

    def lse_len(self, backward: bool) -> int:
        """Rows of the log-sum-exp buffer the forward writes (Nq rounded up to its query block), or
        the backward reads (rounded up to both query blocks: the forward's is padded with +inf)."""
        step = max(self.block_q, self.dkdv_block_q, self.dq_block_q) if backward else self.block_q
        return _blocks(self.nq, step) * step

    @property
    def score_scale(self) -> float:
        """log2(e) / sqrt(d): the scores in base 2."""
        return _LOG2E / math.sqrt(self.d)

    def compiler_params(self) -> pltr.CompilerParams:
        return pltr.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _blocks(n: int, block: int) -> int:
    """Blocks of `block` rows covering n (static ints)."""
    return -(-n // block)


def visible_pairs(nq: int, nk: int, q_offset: int, causal: bool) -> int:
    """(query, key) pairs a full key range admits per sequence and head: the FLOP count's pairs."""
    if not causal:
        return nq * nk
    return sum(min(nk, q_offset + i + 1) for i in range(nq))


# ------------------------------------------------------------------------------------------------
# The reference (also the `xla` implementation)


def attention_mask(key_start, key_end, nq: int, nk: int, *, q_offset: int, causal: bool) -> jax.Array:
    """bool [B, 1, Nq, Nk]: query i sees key j (module docstring)."""
    cols = jnp.arange(nk)[None, None, :]
    seen = (cols >= key_start[:, None, None]) & (cols < key_end[:, None, None])
    if causal:
        seen = seen & (cols <= q_offset + jnp.arange(nq)[None, :, None])
    return seen[:, None]


def reference_flash_mha(q, k, v, key_start, key_end, *, q_offset: int = 0, causal: bool = True) -> jax.Array:
    """Pure jnp: `dot_product_attention` under `attention_mask` (its scores and softmax in fp32)."""
    mask = attention_mask(key_start, key_end, q.shape[1], k.shape[1], q_offset=q_offset, causal=causal)
    return dot_product_attention(q, k, v, mask)


# ------------------------------------------------------------------------------------------------
# Kernel pieces


def _tile_mask(rows, cols, nrows: int, ncols: int) -> jax.Array:
    return (rows < nrows)[:, None] & (cols < ncols)[None, :]


def _load(ref, row, size: int, nrows: int, width: int, true_width: int) -> jax.Array:
    """Rows [row, row + size) x columns [0, width) of a [N, d] ref, zero past N and d."""
    rows = row + lax.broadcasted_iota(jnp.int32, (size,), 0)
    cols = lax.broadcasted_iota(jnp.int32, (width,), 0)
    return pltr.load(ref.at[pl.ds(row, size), pl.ds(0, width)], mask=_tile_mask(rows, cols, nrows, true_width),
                     other=0)


def _store(ref, row, value: jax.Array, nrows: int, true_width: int) -> None:
    size, width = value.shape
    rows = row + lax.broadcasted_iota(jnp.int32, (size,), 0)
    cols = lax.broadcasted_iota(jnp.int32, (width,), 0)
    pltr.store(ref.at[pl.ds(row, size), pl.ds(0, width)], value, mask=_tile_mask(rows, cols, nrows, true_width))


def _seen(rows, cols, start, end, cfg: _Config, *, key_major: bool) -> jax.Array:
    """Which pairs of a tile attend: [BQ, BK] (or [BK, BQ] key-major)."""
    if key_major:
        rows, cols = rows[None, :], cols[:, None]
    else:
        rows, cols = rows[:, None], cols[None, :]
    seen = (cols >= start) & (cols < end)
    return seen & (cols <= cfg.q_offset + rows) if cfg.causal else seen


def _key_ranges(q_lo, start, end, block_q: int, block_k: int, cfg: _Config):
    """Key blocks of the query rows [q_lo, q_lo + block_q): [lo, hi), of which [f_lo, f_hi) every
    row sees whole (no mask)."""
    last = jnp.minimum(end, cfg.q_offset + q_lo + block_q) if cfg.causal else end  # past the last row's keys
    first = jnp.minimum(end, cfg.q_offset + q_lo + 1) if cfg.causal else end  # past the first row's keys
    lo = lax.div(start, block_k)
    hi = jnp.maximum(cdiv(last, block_k), lo)
    f_lo = jnp.clip(cdiv(start, block_k), lo, hi)
    f_hi = jnp.clip(lax.div(first, block_k), f_lo, hi)
    return lo, f_lo, f_hi, hi


def _query_ranges(k_lo, start, end, block_q: int, block_k: int, cfg: _Config):
    """Query blocks that see the key rows [k_lo, k_lo + block_k): [lo, hi), of which [f_lo, hi)
    see the whole block (none when the block crosses an end of the key range)."""
    count = jnp.int32(_blocks(cfg.nq, block_q))
    inside = (k_lo + block_k > start) & (k_lo < end)
    whole = (k_lo >= start) & (k_lo + block_k <= end)
    if cfg.causal:
        lo = lax.div(jnp.clip(k_lo - cfg.q_offset, 0, cfg.nq), block_q)
        f_lo = cdiv(jnp.clip(k_lo + block_k - 1 - cfg.q_offset, 0, cfg.nq), block_q)
    else:
        lo = f_lo = jnp.zeros_like(count)
    hi = jnp.where(inside, count, lo)
    f_lo = jnp.where(whole, jnp.clip(f_lo, lo, hi), hi)
    return lo, f_lo, hi


def _walk(body, init, ranges):
    """carry = body(i, carry, masked=...) over [lo, f_lo) masked, [f_lo, f_hi) whole, [f_hi, hi) masked."""
    lo, f_lo, f_hi, hi = ranges
    carry = lax.fori_loop(lo, f_lo, functools.partial(body, masked=True), init)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(f_hi, hi, functools.partial(body, masked=True), carry)


def _query_block(block_q: int):
    """(q_lo, rows [BQ]) of this program: grid axis 0, the last (longest causal) block first."""
    q_lo = heavy_first(pl.program_id(0), pl.num_programs(0)) * block_q
    return q_lo, q_lo + lax.broadcasted_iota(jnp.int32, (block_q,), 0)


# ------------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    b = pl.program_id(1)
    start, end = start_ref[b], end_ref[b]
    q_lo, rows = _query_block(bq)
    q = _load(q_ref, q_lo, bq, cfg.nq, cfg.d_p, cfg.d)

    def body(kb, carry, *, masked: bool):
        m, l, acc = carry
        k_lo = kb * bk
        k = _load(k_ref, k_lo, bk, cfg.nk, cfg.d_p, cfg.d)
        v = _load(v_ref, k_lo, bk, cfg.nk, cfg.dv_p, cfg.dv)
        s = dot(q, k, trans_b=True) * cfg.score_scale
        if masked:
            cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            s = jnp.where(_seen(rows, cols, start, end, cfg, key_major=False), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing seen yet stays at 0
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return m_new, l * alpha + p.sum(axis=1), acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, cfg.dv_p), jnp.float32))
    m, l, acc = _walk(body, init, _key_ranges(q_lo, start, end, bq, bk, cfg))
    seen = (l > 0.0) & (rows < cfg.nq)
    safe_l = jnp.where(seen, l, 1.0)
    _store(o_ref, q_lo, jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype), cfg.nq, cfg.dv)
    lse_ref[pl.ds(q_lo, bq)] = jnp.where(seen, m + jnp.log2(safe_l), jnp.inf)


def _scalar_spec(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,))


def _sequence_spec(shape):
    """A whole [N, d] sequence of one head of an array [B, N, H, d] (grid (i, b, h))."""
    return pl.BlockSpec((None, shape[1], None, shape[3]), lambda i, b, h: (b, 0, h, 0))


def _lse_spec(cfg: _Config, backward: bool):
    return pl.BlockSpec((None, None, cfg.lse_len(backward)), lambda i, b, h: (b, h, 0))


def flops_per_pair(kernel: str, d: int, dv: int) -> int:
    """Matmul FLOPs per (query, key) pair of each kernel: forward q k^T and p v; dK/dV recomputes
    k q^T, then p^T dO, v dO^T and dS^T q; dQ recomputes q k^T, then dO v^T and dS k."""
    return {"flash_attention_fwd": 2 * (d + dv), "flash_attention_dkdv": 4 * (d + dv),
            "flash_attention_dq": 2 * (2 * d + dv)}[kernel]


def _cost(q, k, v, cfg: _Config, kernel: str) -> pl.CostEstimate:
    bsz, _, heads, _ = q.shape
    pairs = bsz * heads * visible_pairs(cfg.nq, cfg.nk, cfg.q_offset, cfg.causal)
    size = q.dtype.itemsize
    return pl.CostEstimate(flops=flops_per_pair(kernel, cfg.d, cfg.dv) * pairs, transcendentals=pairs,
                           bytes_accessed=size * (2 * q.size + k.size + v.size))


def _forward(q, k, v, key_start, key_end, cfg: _Config):
    """-> (out [B, Nq, H, dv], lse [B, H, lse_len(False)] fp32, base 2)."""
    bsz, nq, heads, _ = q.shape
    args = (key_start, key_end, q, k, v)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=(out_struct((bsz, nq, heads, cfg.dv), v.dtype, *args),
                   out_struct((bsz, heads, cfg.lse_len(False)), jnp.float32, *args)),
        grid=(_blocks(nq, cfg.block_q), bsz, heads),
        in_specs=[_scalar_spec(key_start), _scalar_spec(key_end), *(_sequence_spec(x.shape) for x in (q, k, v))],
        out_specs=(_sequence_spec((bsz, nq, heads, cfg.dv)), _lse_spec(cfg, False)),
        compiler_params=cfg.compiler_params(),
        cost_estimate=_cost(q, k, v, cfg, "flash_attention_fwd"),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)


# ------------------------------------------------------------------------------------------------
# Backward


def _dkdv_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 cfg: _Config):
    bq, bk = cfg.dkdv_block_q, cfg.dkdv_block_k
    b = pl.program_id(1)
    start, end = start_ref[b], end_ref[b]
    k_lo = pl.program_id(0) * bk
    cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k = _load(k_ref, k_lo, bk, cfg.nk, cfg.d_p, cfg.d)
    v = _load(v_ref, k_lo, bk, cfg.nk, cfg.dv_p, cfg.dv)

    def body(qb, carry, *, masked: bool):
        dk, dv = carry
        q_lo = qb * bq
        q = _load(q_ref, q_lo, bq, cfg.nq, cfg.d_p, cfg.d)
        do = _load(do_ref, q_lo, bq, cfg.nq, cfg.dv_p, cfg.dv)
        lse, delta = lse_ref[pl.ds(q_lo, bq)], delta_ref[pl.ds(q_lo, bq)]
        p = jnp.exp2(dot(k, q, trans_b=True) * cfg.score_scale - lse[None, :])  # [BK, BQ]
        if masked:
            rows = q_lo + lax.broadcasted_iota(jnp.int32, (bq,), 0)
            p = jnp.where(_seen(rows, cols, start, end, cfg, key_major=True), p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do)
        ds = p * (dot(v, do, trans_b=True) - delta[None, :])
        return dk + dot(ds.astype(q.dtype), q), dv

    lo, f_lo, hi = _query_ranges(k_lo, start, end, bq, bk, cfg)
    init = (jnp.zeros((bk, cfg.d_p), jnp.float32), jnp.zeros((bk, cfg.dv_p), jnp.float32))
    dk, dv = _walk(body, init, (lo, f_lo, hi, hi))
    _store(dk_ref, k_lo, (dk * (1.0 / math.sqrt(cfg.d))).astype(dk_ref.dtype), cfg.nk, cfg.d)
    _store(dv_ref, k_lo, dv.astype(dv_ref.dtype), cfg.nk, cfg.dv)


def _dq_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    bq, bk = cfg.dq_block_q, cfg.dq_block_k
    b = pl.program_id(1)
    start, end = start_ref[b], end_ref[b]
    q_lo, rows = _query_block(bq)
    q = _load(q_ref, q_lo, bq, cfg.nq, cfg.d_p, cfg.d)
    do = _load(do_ref, q_lo, bq, cfg.nq, cfg.dv_p, cfg.dv)
    lse, delta = lse_ref[pl.ds(q_lo, bq)], delta_ref[pl.ds(q_lo, bq)]

    def body(kb, dq, *, masked: bool):
        k_lo = kb * bk
        k = _load(k_ref, k_lo, bk, cfg.nk, cfg.d_p, cfg.d)
        v = _load(v_ref, k_lo, bk, cfg.nk, cfg.dv_p, cfg.dv)
        p = jnp.exp2(dot(q, k, trans_b=True) * cfg.score_scale - lse[:, None])  # [BQ, BK]
        if masked:
            cols = k_lo + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            p = jnp.where(_seen(rows, cols, start, end, cfg, key_major=False), p, 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = _walk(body, jnp.zeros((bq, cfg.d_p), jnp.float32), _key_ranges(q_lo, start, end, bq, bk, cfg))
    _store(dq_ref, q_lo, (dq * (1.0 / math.sqrt(cfg.d))).astype(dq_ref.dtype), cfg.nq, cfg.d)


def _backward(q, k, v, key_start, key_end, out, lse, do, cfg: _Config):
    """-> (dq, dk, dv) at the inputs' shapes and dtypes."""
    bsz, nq, heads, _ = q.shape
    nk = k.shape[1]
    # delta_i = sum_d dO_id O_id = sum_j p_ij dP_ij: the softmax's row term, one fp32 pass in XLA.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    rows = cfg.lse_len(True)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, rows - nq)))
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, rows - lse.shape[-1])), constant_values=jnp.inf)  # p = 0 there
    args = (key_start, key_end, q, k, v, do, lse, delta)
    in_specs = [_scalar_spec(key_start), _scalar_spec(key_end), *(_sequence_spec(x.shape) for x in (q, k, v, do)),
                _lse_spec(cfg, True), _lse_spec(cfg, True)]
    common = dict(in_specs=in_specs, compiler_params=cfg.compiler_params(), interpret=cfg.interpret)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        out_shape=(out_struct(k.shape, k.dtype, *args), out_struct(v.shape, v.dtype, *args)),
        grid=(_blocks(nk, cfg.dkdv_block_k), bsz, heads),
        out_specs=(_sequence_spec(k.shape), _sequence_spec(v.shape)),
        cost_estimate=_cost(q, k, v, cfg, "flash_attention_dkdv"),
        name="flash_attention_dkdv",
        **common,
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=out_struct(q.shape, q.dtype, *args),
        grid=(_blocks(nq, cfg.dq_block_q), bsz, heads),
        out_specs=_sequence_spec(q.shape),
        cost_estimate=_cost(q, k, v, cfg, "flash_attention_dq"),
        name="flash_attention_dq",
        **common,
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, key_start, key_end, cfg: _Config):
    return _forward(q, k, v, key_start, key_end, cfg)[0]


def _flash_fwd(q, k, v, key_start, key_end, cfg):
    out, lse = _forward(q, k, v, key_start, key_end, cfg)
    return out, (q, k, v, key_start, key_end, out, lse)


def _flash_bwd(cfg: _Config, residuals, do):
    q, k, v, key_start, key_end, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, key_start, key_end, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def launch_warps(d: int, dv: int, blocks: FlashBlocks, itemsize: int = 2) -> int:
    """The kernels' num_warps: the setting, else 8 at head dims over 64 or float32 inputs, 4 below."""
    return blocks.num_warps or (8 if max(d, dv) > 64 or itemsize > 2 else 4)


def _tile(size: int, n: int) -> int:
    """A block size capped at n rounded up to a power of two >= 16."""
    return min(size, tile_dim(n))


def pallas_flash_mha(q, k, v, key_start, key_end, *, q_offset: int = 0, causal: bool = True,
                     blocks: FlashBlocks | None = None, interpret: bool = False) -> jax.Array:
    """The kernel path of `flash_mha` (same arguments)."""
    blocks = blocks or FlashBlocks()
    bsz, nq, heads, d = q.shape
    nk, dv = k.shape[1], v.shape[-1]
    if k.shape != (bsz, nk, heads, d) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q [B, Nq, H, d], k [B, Nk, H, d] and v [B, Nk, H, dv] must agree, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    d_p, dv_p = tile_dim(d), tile_dim(dv)
    tiles = blocks.resolve(jnp.dtype(q.dtype).itemsize, max(d, dv))
    cfg = _Config(nq=nq, nk=nk, d=d, dv=dv, d_p=d_p, dv_p=dv_p, q_offset=int(q_offset), causal=bool(causal),
                  **{name: _tile(size, nk if name.endswith("_k") else nq)
                     for name, size in zip(TILE_FIELDS, tiles)},
                  num_warps=launch_warps(d, dv, blocks, jnp.dtype(q.dtype).itemsize), num_stages=blocks.num_stages,
                  interpret=interpret)
    key_start = jnp.clip(key_start.astype(jnp.int32), 0, nk)
    key_end = jnp.clip(key_end.astype(jnp.int32), 0, nk)
    return _flash(q, k, v, key_start, key_end, cfg)


_HEADS = ("batch", None, "heads", None)  # q, k, v, the output [B, N, H, d]
_ROWS = ("batch",)  # key_start, key_end [B]


def flash_mha(q, k, v, *, key_start=None, key_end=None, q_offset: int = 0, causal: bool = True, impl: str = "auto",
              blocks: FlashBlocks | None = None) -> jax.Array:
    """Softmax attention [B, Nq, H, dv] by `impl` (auto | pallas | xla: scaling/kernels/dispatch.py);
    q [B, Nq, H, d], k [B, Nk, H, d], v [B, Nk, H, dv]; key_start / key_end int [B] (default 0 and
    Nk): the keys each sequence's queries may see; q_offset: the position of query row 0 (module
    docstring). jit- and grad-compatible; q is not pre-scaled (1 / sqrt(d) is applied inside)."""
    bsz, nk = k.shape[0], k.shape[1]
    key_start = jnp.zeros((bsz,), jnp.int32) if key_start is None else key_start.astype(jnp.int32)
    key_end = jnp.full((bsz,), nk, jnp.int32) if key_end is None else key_end.astype(jnp.int32)
    static = dict(q_offset=q_offset, causal=causal)
    kernel = functools.partial(pallas_flash_mha, blocks=blocks, **static)
    reference = functools.partial(reference_flash_mha, **static)
    return dispatch(impl, kernel, reference, q, k, v, key_start, key_end,
                    names=(_HEADS, _HEADS, _HEADS, _ROWS, _ROWS), out_names=_HEADS)
