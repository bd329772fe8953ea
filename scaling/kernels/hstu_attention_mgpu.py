"""HSTU attention on Mosaic GPU (Hopper): warp-specialized, TMA-fed, wgmma throughout, forward and
backward, without the relative bias.

    out = mosaic_mha(q, k, v, lengths, num_candidates=None, norm=N)      # differentiable in q, k, v

The same math as hstu_attention.reference_mha without the bias: silu(q_i . k_j) / norm for the
pairs the mask keeps (causal with the diagonal, rows and keys past lengths[b] off, a candidate sees
the history and itself), rows past the length zero. These are the Triton kernels
(hstu_attention_fwd.py, hstu_attention_bwd.py) rebuilt the way FlashAttention-3 builds attention
for the H100, because JAX 0.11 deprecates Pallas' Triton backend and the Triton lowering cannot
express warp specialization or TMA. All three run on mgpu_pipeline.py (a TMA producer warpgroup,
two consumer warpgroups of 64 stationary rows, FlashAttention-3's ping-pong between them); each
is a `step` over one streamed block:

  forward  query-major: Q stationary, K and V streamed. S = Q K^T, P = silu(S) / norm (masked),
           O += P V
  dQ       query-major: Q and dO stationary, K and V streamed. S = Q K^T, dP = dO V^T,
           dS = dP silu'(S) / norm (masked), dQ += dS K
  dK/dV    key-major: K and V stationary, Q and dO streamed. S^T = K Q^T, dP^T = V dO^T,
           dV += P^T dO, dK += dS^T Q. Above d = 64 two kernels (dV, then dK, each recomputing
           S^T; MosaicBlocks.split_dkdv), because the two [64, d] accumulators spill beside the
           score tiles

No atomics: each program owns its rows of one output, as in FlashAttention-2's backward split. The
residuals are the inputs alone (no softmax, no statistics). Key blocks every row of a query block
sees whole (below its first row, inside the history, all rows valid) skip the mask, as do the
query blocks that see a key block whole. SiLU's sigmoid is one tanh.approx.f32 (approx_math;
relative error ~2^-11, as the Triton kernels' 16-bit path), where JAX's logistic would lower to an
exp and an IEEE division. P and dS reach their wgmmas through SMEM, not registers: JAX 0.11's
Mosaic GPU interpreter (which runs these kernels on CPU for the tests) rejects a register A operand.

Scope: no relative bias (it needs per-element gathers from its tables, which Mosaic GPU's
register layouts do not offer): the model takes them with attention_impl: mosaic where it has none
(relative_bias: false, through hstu_attention.mosaic_hstu_mha), else the Triton kernels; bf16 or fp16,
head dims that are multiples of 64, one d for q, k and v. It is timed beside the Triton kernels
and generative-recommenders' on the same shapes (benchmarks/hstu_reference_side_by_side.py, with
its error against both); benchmarks/mosaic_compile.py compiles it through ptxas for sm_90a
without a GPU. JAX's own Mosaic GPU attention refuses causal masking under CUDA 12.8 to 12.9.0 for
a ptxas miscompilation; the GPU session's test step and the side-by-side's error columns are what
vouch for these kernels on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from scaling.kernels.hstu_attention_bwd import silu_derivative, tanh_sigmoid
from scaling.kernels.hstu_attention_fwd import tile_mask
from scaling.kernels.mgpu_pipeline import ROWS, TILE_COLS, Ranges, StepContext, matmul, pipelined_call
from scaling.kernels.tiles import cdiv, pad_to


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """block_k: rows of each streamed block (keys for the forward and dQ, queries for dK/dV);
    num_stages: slots in the producer's ring; pingpong: FlashAttention-3's alternation of the two
    consumers (off: they run freely); split_dkdv (below). The stationary block is 64 rows per
    consumer (wgmma's M)."""

    block_k: int = 64
    num_stages: int = 2
    pingpong: bool = True
    # dK and dV from separate kernels (each recomputing K Q^T): one [64, d] accumulator per
    # consumer instead of two. None: split where d > 64, since two [64, 128] fp32 accumulators
    # beside the score tiles spill 432 B under the consumers' 232 registers (benchmarks/mosaic_compile)
    split_dkdv: bool | None = None

    def __post_init__(self):
        if self.block_k % 64 or not 64 <= self.block_k <= 256:
            raise ValueError(f"block_k={self.block_k}: expected 64, 128, 192 or 256")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages}: the ring needs at least 2 slots")


def _query_major_ranges(bk: int):
    """Key blocks for query rows [lo, lo + 64): through the diagonal or the length."""

    def ranges(lo, pair_lo, scalars):
        length, n_hist = scalars
        last = jnp.where(pair_lo < length, cdiv(jnp.minimum(pair_lo + 2 * ROWS, length), bk), 0)
        own_last = jnp.where(lo < length, cdiv(jnp.minimum(lo + ROWS, length), bk), 0)
        whole = jnp.where(lo + ROWS <= length, jnp.minimum(lax.div(lo, bk), lax.div(n_hist, bk)), 0)
        zero = jnp.zeros_like(last)
        return Ranges(zero, last, zero, zero, jnp.minimum(whole, own_last), own_last)

    return ranges


def _key_major_ranges(bq: int):
    """Query blocks that see key rows [lo, lo + 64): from the diagonal to the length."""

    def ranges(lo, pair_lo, scalars):
        length, n_hist = scalars
        first = lax.div(pair_lo, bq)
        last = jnp.where(pair_lo < length, cdiv(length, bq), first)
        own_first = jnp.minimum(lax.div(lo, bq), last)
        own_last = jnp.where(lo < length, last, own_first)
        full_lo = jnp.clip(cdiv(lo + ROWS - 1, bq), own_first, own_last)
        full_hi = jnp.where(lo + ROWS <= n_hist, jnp.clip(lax.div(length, bq), full_lo, own_last), full_lo)
        return Ranges(first, last, own_first, full_lo, full_hi, own_last)

    return ranges


def _silu_and_slope(s, ctx: StepContext, *, masked: bool, inv_norm: float, query_rows: bool):
    """(P, G) of one score tile: P = silu(s) / norm and G = silu'(s) / norm, zero where masked
    (query_rows: the tile's rows are queries, else keys), so that dS = dP * G. Taking G before dP
    is computed keeps one tile, not s and sigmoid(s), alive beside it (registers: the dK/dV
    kernel's two [64, d] accumulators already hold 128)."""
    sig = tanh_sigmoid(s)
    p = s * sig * inv_norm
    g = silu_derivative(s, sig) * inv_norm
    if masked:
        rows, cols = ctx.positions()
        seen = tile_mask(rows, cols, *ctx.scalars) if query_rows else tile_mask(cols, rows, *ctx.scalars)
        p, g = jnp.where(seen, p, 0.0), jnp.where(seen, g, 0.0)
    return p, g


def _pv_step(ctx: StepContext, *, masked: bool, inv_norm: float, query_rows: bool):
    """The forward (query_rows: Q stationary; K, V streamed) or dV (K stationary; Q, dO streamed):
    for stationary a and streamed (b, c), S = a b^T, acc += P c with P = silu(S) / norm, which is
    S = Q K^T, O += P V or S^T = K Q^T, dV += P^T dO."""
    (a,), (b, c), (acc,), (p_tile,) = ctx.stationary, ctx.streamed, ctx.accs, ctx.work
    ctx.wait(0)
    s = matmul(a, b.transpose((1, 0)), ctx.shape, after_issue=ctx.meet)
    ctx.free(0)
    p, _ = _silu_and_slope(s, ctx, masked=masked, inv_norm=inv_norm, query_rows=query_rows)
    p_tile[...] = p.astype(p_tile.dtype)
    plgpu.commit_smem()
    ctx.wait(1)
    ctx.meet()  # the tensor cores are this consumer's again
    plgpu.wgmma(acc, p_tile, c)
    plgpu.wgmma_wait(0)  # P's SMEM is rewritten next block
    ctx.free(1)


def _grad_step(ctx: StepContext, *, masked: bool, inv_norm: float, query_rows: bool):
    """dQ (query_rows: Q, dO stationary; K, V streamed) or dK (K, V stationary; Q, dO streamed):
    for stationary (a, c) and streamed (b, e), S = a b^T, dP = c e^T, acc += (dP * G) b, which
    is S = Q K^T, dP = dO V^T, dQ += dS K or S^T = K Q^T, dP^T = V dO^T, dK += dS^T Q."""
    (a, c), (b, e), (acc,), (ds_tile,) = ctx.stationary, ctx.streamed, ctx.accs, ctx.work
    ctx.wait(0)
    s = matmul(a, b.transpose((1, 0)), ctx.shape, after_issue=ctx.meet)
    _, g = _silu_and_slope(s, ctx, masked=masked, inv_norm=inv_norm, query_rows=query_rows)
    ctx.wait(1)
    dp = matmul(c, e.transpose((1, 0)), ctx.shape)
    ctx.free(1)
    ds_tile[...] = (dp * g).astype(ds_tile.dtype)
    plgpu.commit_smem()
    ctx.meet()
    plgpu.wgmma(acc, ds_tile, b)
    plgpu.wgmma_wait(0)
    ctx.free(0)


def _dkdv_step(ctx: StepContext, *, masked: bool, inv_norm: float):
    (k, v), (q, do), (dk, dv), (p_tile, ds_tile) = ctx.stationary, ctx.streamed, ctx.accs, ctx.work
    ctx.wait(0)
    st = matmul(k, q.transpose((1, 0)), ctx.shape, after_issue=ctx.meet)
    pt, g = _silu_and_slope(st, ctx, masked=masked, inv_norm=inv_norm, query_rows=False)
    p_tile[...] = pt.astype(p_tile.dtype)
    ctx.wait(1)
    dpt = matmul(v, do.transpose((1, 0)), ctx.shape)
    ds_tile[...] = (dpt * g).astype(ds_tile.dtype)
    plgpu.commit_smem()
    ctx.meet()
    plgpu.wgmma(dv, p_tile, do)
    plgpu.wgmma(dk, ds_tile, q)
    plgpu.wgmma_wait(0)
    ctx.free(0)
    ctx.free(1)


# Each kernel's step: the query-major forward and dQ, the key-major dV and dK
_forward_step, _dv_step = (functools.partial(_pv_step, query_rows=rows) for rows in (True, False))
_dq_step, _dk_step = (functools.partial(_grad_step, query_rows=rows) for rows in (True, False))


@dataclasses.dataclass(frozen=True)
class _Config:
    norm: float
    blocks: MosaicBlocks
    interpret: bool

    def call(self, step, ranges, stationary, streamed, scalars, *, n_out: int, n_work: int, name: str):
        b = self.blocks
        return pipelined_call(stationary, streamed, scalars, n_out=n_out, name=name,
                              step=functools.partial(step, inv_norm=1.0 / self.norm),
                              ranges=ranges(b.block_k), n_work=n_work, stream_block=b.block_k,
                              stages=b.num_stages, pingpong=b.pingpong, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mha(q, k, v, lengths, n_hist, cfg: _Config):
    [out] = cfg.call(_forward_step, _query_major_ranges, [q], [k, v], [lengths, n_hist], n_out=1, n_work=1,
                     name="hstu_mgpu_fwd")
    return out


def _mha_fwd(q, k, v, lengths, n_hist, cfg):
    return _mha(q, k, v, lengths, n_hist, cfg), (q, k, v, lengths, n_hist)


def _mha_bwd(cfg: _Config, residuals, do):
    q, k, v, lengths, n_hist = residuals
    do = do.astype(q.dtype)
    scalars = [lengths, n_hist]
    [dq] = cfg.call(_dq_step, _query_major_ranges, [q, do], [k, v], scalars, n_out=1, n_work=1, name="hstu_mgpu_dq")
    if cfg.interpret:  # one interpreted kernel at a time: each holds threads of XLA's CPU pool
        dq, q, k, v, do = lax.optimization_barrier((dq, q, k, v, do))
    split = cfg.blocks.split_dkdv if cfg.blocks.split_dkdv is not None else q.shape[-1] > 64
    if split:
        [dv] = cfg.call(_dv_step, _key_major_ranges, [k], [q, do], scalars, n_out=1, n_work=1, name="hstu_mgpu_dv")
        if cfg.interpret:
            dv, q, k, v, do = lax.optimization_barrier((dv, q, k, v, do))
        [dk] = cfg.call(_dk_step, _key_major_ranges, [k, v], [q, do], scalars, n_out=1, n_work=1, name="hstu_mgpu_dk")
    else:
        dk, dv = cfg.call(_dkdv_step, _key_major_ranges, [k, v], [q, do], scalars, n_out=2, n_work=2,
                          name="hstu_mgpu_dkdv")
    return dq, dk, dv, None, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def mosaic_mha(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, num_candidates: jax.Array | None = None,
               *, norm: float, blocks: MosaicBlocks | None = None, interpret: bool | None = None) -> jax.Array:
    """HSTU attention without bias on Mosaic GPU (module docstring); differentiable in q, k, v.

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
    if dim % TILE_COLS:
        raise ValueError(f"head dim {dim}: the Mosaic GPU kernels take multiples of {TILE_COLS}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, n)
    n_hist = lengths if num_candidates is None else lengths - jnp.clip(num_candidates.astype(jnp.int32), 0, lengths)
    unit = math.lcm(2 * ROWS, blocks.block_k)  # whole stationary pairs and streamed blocks
    npad = -(-n // unit) * unit
    out = _mha(*(pad_to(x, 1, npad) for x in (q, k, v)), lengths, n_hist,
               _Config(norm=float(norm), blocks=blocks, interpret=bool(interpret)))
    return out[:, :n]
