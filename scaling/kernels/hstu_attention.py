"""HSTU pointwise attention as a Pallas kernel: entry points, custom_vjp wiring and the jnp reference.

    out = hstu_mha(q, k, v, lengths, norm=N, pos_w=..., ts_w=..., timestamps=..., impl="auto")

computes scaling/models/hstu_attention.py's `hstu_attention(q, k, v, relative_bias(pos_w, ts_w,
timestamps, query_timestamps), lengths, norm)`: silu(q_i . k_j + rab[i, j]) / norm for j <= i (the
diagonal included), rows and keys past a sequence's length zero, SiLU in fp32 and divided by the
fixed `norm` (the padded length in the research code, never the row's valid count). Options:

  num_candidates int [B]  the last num_candidates[b] of sequence b's `lengths[b]` tokens are
                          candidates: each sees the history and itself, never another candidate,
                          and sits at the history's end for the position bias (GR's num_targets;
                          M-FALCON's placement)
  candidates_only         only candidate rows are computed (others are zero): M-FALCON's cached
                          scoring, see `candidate_mha`
  impl                    auto | pallas | xla (scaling/kernels/dispatch.py), or mosaic: the
                          Mosaic GPU kernels without the bias (`mosaic_hstu_mha`)

The kernel path (`pallas_mha`) pads N to a multiple of the blocks and the head dims to powers of
two >= 16 (Triton's tl.dot minimum), runs the forward kernel (hstu_attention_fwd.py) under a
custom_vjp whose backward runs the dK/dV, dQ and (unless a dK/dV program holds every head) dbias
kernels (hstu_attention_bwd.py) and reduces the bias tables' gradients in XLA (hstu_bias.py).
Residuals are the inputs only (no statistics). Gradients flow to q, k, v, pos_w and ts_w; lengths,
candidates and timestamps are integers.

HSTU's training step calls the fused form instead (no candidates):

    u, out = projected_mha(pre, lengths, heads=h, norm=N, alpha=1.0, pos_w=..., ts_w=..., timestamps=...)

with pre [B, N, 4 h d] the projection before its SiLU and u, v, q, k = split(silu(pre)) (q scaled
by alpha). Its forward is XLA's SiLU and split, then the same forward kernel; its backward kernels
write d pre [B, N, 4, h, d] directly (hstu_attention_bwd.py's `Packed`): the SiLU's derivative is
applied to the fp32 accumulators as they are stored, the dQ kernel writes its section in place
(input_output_aliases), and the projection's weight gradient reads that buffer as it is. XLA's
backward would otherwise join the four gradient slices and apply the SiLU's derivative in one
more pass over the whole [B, N, 4 h d] (2.1 of the 21 ms bound of benchmarks/gpu_aot.py's HSTU
step). It takes one head width d = dqk = dv, a power of two >= 16, and heads that are not split
over devices (`projection_fusable`); the model falls back to `hstu_mha` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scaling.kernels.dispatch import dispatch
from scaling.kernels.hstu_attention_bwd import Packed, mha_backward
from scaling.kernels.hstu_attention_fwd import MhaConfig, mha_forward
from scaling.kernels.hstu_attention_mgpu import mosaic_mha
from scaling.kernels.hstu_bias import edges_table, table_grads
from scaling.kernels.sharded import splits_heads
from scaling.kernels.tiles import TILE_FIELDS, KernelTiles, ieee_fp32_dots, pad_to, tile_dim
from scaling.models.hstu_attention import (candidate_attention, hstu_attention, next_timestamps, relative_bias,
                                           time_buckets)

__all__ = ["Blocks", "Tiles", "hstu_mha", "projected_mha", "projection_fusable", "candidate_mha",
           "reference_mha", "pallas_mha", "mosaic_hstu_mha"]


class Tiles(NamedTuple):
    """The tile sizes and heads per program one call runs with (`Blocks.resolve`)."""

    block_q: int
    block_k: int
    dkdv_block_q: int
    dkdv_block_k: int
    dq_block_q: int
    dq_block_k: int
    heads_per_program: int
    dkdv_heads_per_program: int


def _largest_divisor(heads: int, limit: int) -> int:
    return max(g for g in range(1, min(limit, heads) + 1) if heads % g == 0)


def _default_tiles(head_dim: int, g: int, g_kv: int, itemsize: int) -> tuple[int, ...]:
    """(forward BQ, BK, dK/dV BQ, BK, dQ BQ, BK) for tile width head_dim, G heads per program (G_kv
    for dK/dV) and inputs of `itemsize` bytes (the table and its reasons: `Blocks`' docstring)."""
    wide = head_dim >= 128
    if itemsize > 2:
        small = ieee_fp32_dots()  # no tensor-core path: the tiles that spill least
        forward, dq = ((32, 32), (32, 16)) if small or g > 1 else ((64, 32), (64, 16))
        dkdv = (32, 16) if small or g_kv > 1 or wide else (16, 64)
    else:
        if g == 1:
            forward, dq = (64, 64), ((64, 32) if wide else (64, 64))
        else:
            forward, dq = (64, 32), ((64, 32) if head_dim == 64 else (64, 16))
        if g_kv == 1:
            dkdv = (32, 64) if wide else (64, 64)
        else:
            dkdv = (32, 32) if wide else (16, 64)
    return (*forward, *dkdv, *dq)


@dataclasses.dataclass(frozen=True)
class Blocks(KernelTiles):
    """Tile sizes (powers of two >= 16; capped at the padded length), heads per program and Triton
    launch knobs; None picks the default for the call's heads, head dim and bias (`resolve`).

    heads_per_program G: one program computes G heads of a query (or key) block, so the relative
    bias tile, the kernels' costliest elementwise work (31 of the 36 tile ops per element of the
    forward's whole-tile loop at G = 1: benchmarks/kernel_ir.py), is computed once for G heads;
    with G = heads the dK/dV kernel also sums the bias gradient over the heads, and the separate
    dbias pass (two more matmuls per tile and head) is skipped. G must divide the heads (the
    largest divisor up to the setting is taken). Default: 2 with the bias at head dims >= 64 for
    16-bit inputs; 1 without the bias (nothing to share), at head dims <= 32 and for float32.

    Each kernel has its own tile: the forward's (BQ query rows x BK keys per step), dK/dV's (a
    stationary key block of BK rows, query blocks of BQ streamed past it) and dQ's (a stationary
    query block, key blocks streamed); the dbias kernel takes dK/dV's BQ and the widest block as
    its BK. On an H100 a dot runs on Hopper's warpgroup MMA (wgmma) only when its output has >= 64
    rows; otherwise Triton falls back to Ampere's mma.sync at a fraction of the tensor cores' rate.
    The output rows are the stationary block: BQ for the forward and dQ, BK for dK/dV and dbias
    (computed key-major). So the defaults keep that side at 64 and stream the other in smaller
    blocks, as FlashAttention-2's Triton backward does, wherever that compiles without register
    spills for 2 and 4 heads of dims 32, 64 and 128, with and without the bias, at L = 4096
    (`python -m benchmarks.kernel_compile --tiles default --warps 0 [--dtype float32]
    [--projected]`, Triton 3.8, sm_90a; its `wgmma` and `mma_sync` columns count each kind), at 8
    warps (4 for head dims <= 32). Forward | dK/dV | dQ, BQ x BK:

        bf16, G = 1, d <= 64         64 x 64 | 64 x 64 | 64 x 64
        bf16, G = 1, d >= 128        64 x 64 | 32 x 64 | 64 x 32
        bf16, G = 2, d <= 32         64 x 32 | 16 x 64 | 64 x 16
        bf16, G = 2, d = 64          64 x 32 | 16 x 64 | 64 x 32
        bf16, G = 2 < h, d >= 128    64 x 32 | 32 x 64 | 64 x 16   dK/dV one head per program
        bf16, G = 2 = h, d >= 128    64 x 32 | 32 x 32 | 64 x 16   dK/dV on mma.sync
        fp32, G = 1, d <= 64         64 x 32 | 16 x 64 | 64 x 16
        fp32, G = 1, d >= 128        64 x 32 | 32 x 16 | 64 x 16   dK/dV on mma.sync
        fp32, G = 2, or IEEE fp32    32 x 32 | 32 x 16 | 32 x 16   all on mma.sync (or none)

    dK/dV holds two fp32 accumulators [BK, d] per head. Two heads of 128 (bf16), or one in fp32,
    spill with 64 stationary keys (0.4-1.4 KB per thread), so there dK/dV must run on mma.sync
    tiles or hold fewer heads: by default it takes one head per program
    (`dkdv_heads_per_program`, its own G; the forward and dQ keep sharing the bias tile over two)
    unless G is every head, when dK/dV also writes the bias gradient and saves the whole dbias
    kernel. G accumulators share one thread's 255 registers, so G = 2 halves a tile (G = 4 spilled
    in most kernels at 64 x 64). float32 inputs (train.compute_dtype's default) hold twice the
    bytes per tile; their dots run as TF32 wgmma at JAX's default matmul precision. Under IEEE fp32
    dots ('highest': `ieee_fp32_dots`, no tensor-core path) the wgmma tiles spilled up to 1 KB per
    thread, so that mode keeps the small tiles, whose worst spill is 32 B. Which setting is fastest
    is for a GPU to measure (benchmarks/kernels.py, benchmarks/tile_sweep.py, which also runs
    the former one-tile backward defaults, on mma.sync, for the A/B).
    """

    # the tiles and Triton knobs: KernelTiles' fields (num_warps None: 8, or 4 for head dims <= 32)
    heads_per_program: int | None = None
    dkdv_heads_per_program: int | None = None  # None: G, or 1 where G heads' dK/dV misses wgmma

    def __post_init__(self):
        super().__post_init__()
        for name in ("heads_per_program", "dkdv_heads_per_program"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def program_heads(self, heads: int, head_dim: int, has_bias: bool, itemsize: int = 2) -> int:
        """G: the largest divisor of `heads` up to heads_per_program (default: 2 with the bias at
        head dims >= 64 for 16-bit inputs, else 1)."""
        limit = self.heads_per_program or (2 if has_bias and head_dim >= 64 and itemsize == 2 else 1)
        return _largest_divisor(heads, limit)

    def resolve(self, heads: int, head_dim: int, has_bias: bool, itemsize: int = 2) -> Tiles:
        """The tiles and G for `heads` heads of width head_dim (the larger of q/k's and v's, as
        given or as the kernel pads it: `tile_dim`) and inputs of `itemsize` bytes, defaults
        filled in (class docstring)."""
        head_dim = tile_dim(head_dim)
        g = self.program_heads(heads, head_dim, has_bias, itemsize)
        if self.dkdv_heads_per_program is not None:
            g_kv = _largest_divisor(heads, self.dkdv_heads_per_program)
        else:  # G > 1 heads of 128 hold dK/dV only on mma.sync tiles; G = h saves the dbias kernel
            g_kv = 1 if itemsize == 2 and head_dim >= 128 and 1 < g < heads else g
        return Tiles(*self.filled(_default_tiles(head_dim, g, g_kv, itemsize)), heads_per_program=g,
                     dkdv_heads_per_program=g_kv)


# ------------------------------------------------------------------------------------------------
# The reference (also the `xla` implementation)


def reference_mha(q, k, v, lengths, pos_w=None, ts_w=None, timestamps=None, query_timestamps=None,
                  num_candidates=None, buckets=None, *, norm: float, candidates_only: bool = False) -> jax.Array:
    """Pure jnp. Without candidates (and with a pos_w of 2N - 1) exactly the model's reference
    (`hstu_attention` + `relative_bias`); otherwise the same math with clamped positions and the
    candidate mask. buckets [B, N, N]: precomputed `time_buckets` (the encoder shares them)."""
    n = q.shape[1]
    simple = num_candidates is None and not candidates_only
    if simple and (pos_w is None or pos_w.shape[0] == 2 * n - 1):
        rab = None if pos_w is None else relative_bias(pos_w, ts_w, timestamps, query_timestamps, buckets=buckets)
        return hstu_attention(q, k, v, rab, lengths, norm)
    lengths = jnp.clip(lengths, 0, n)
    n_hist = lengths if num_candidates is None else lengths - jnp.clip(num_candidates, 0, lengths)
    idx = jnp.arange(n)
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    if pos_w is not None:
        p = (pos_w.shape[0] + 1) // 2
        pid = jnp.minimum(idx[None, :], n_hist[:, None])
        rel = jnp.clip(p - 1 + pid[:, None, :] - pid[:, :, None], 0, 2 * p - 2)
        if buckets is None:
            buckets = time_buckets(timestamps, ts_w.shape[0] - 1, query_timestamps)
        s = s + (pos_w[rel] + ts_w[buckets])[:, None].astype(jnp.float32)
    rows, cols = idx[None, :, None], idx[None, None, :]
    nh, length = n_hist[:, None, None], lengths[:, None, None]
    mask = (((cols <= rows) & (cols < nh)) | (cols == rows)) & (rows < length) & (cols < length)
    if candidates_only:
        mask = mask & (rows >= nh)
    weights = jnp.where(mask[:, None], jax.nn.silu(s) / norm, 0.0)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


# ------------------------------------------------------------------------------------------------
# The kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _mha(q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts, cfg: MhaConfig):
    edges = edges_table() if cfg.has_bias else None
    return mha_forward(q, k, v, lengths, n_hist, ts, qts, pos_w, ts_w, edges, cfg)


def _mha_fwd(q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts, cfg):
    return _mha(q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts, cfg), (q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts)


def _mha_bwd(cfg: MhaConfig, residuals, do, packed: Packed | None = None):
    q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts = residuals
    edges = edges_table() if cfg.has_bias else None
    dq, dk, dv, drab = mha_backward(q, k, v, do, lengths, n_hist, ts, qts, pos_w, ts_w, edges, cfg, packed)
    d_pos = d_ts = None
    if cfg.has_bias:
        n = cfg.seq_len or q.shape[1]
        d_pos, d_ts = table_grads(drab[:, :n, :n], n_hist, ts[:, :n], qts[:, :n], num_pos=cfg.num_pos,
                                  num_buckets=cfg.num_buckets, candidates=cfg.candidates)
        d_pos, d_ts = d_pos.astype(pos_w.dtype), d_ts.astype(ts_w.dtype)
    return dq, dk, dv, d_pos, d_ts, None, None, None, None


_mha.defvjp(_mha_fwd, _mha_bwd)


def _bias_inputs(pos_w, ts_w, timestamps, query_timestamps, npad: int):
    """(pos_w, ts_w, ts, qts) as the kernels take them: fp32 tables, int32 timestamps padded to npad
    (query times default to `next_timestamps`); Nones without the bias."""
    if pos_w is None:
        return None, None, None, None
    if ts_w is None or timestamps is None or pos_w.shape[0] % 2 == 0:
        raise ValueError("the relative bias needs pos_w [2P - 1], ts_w and timestamps")
    qts = next_timestamps(timestamps) if query_timestamps is None else query_timestamps
    ts, qts = (pad_to(x.astype(jnp.int32), 1, npad) for x in (timestamps, qts))
    return pos_w.astype(jnp.float32), ts_w.astype(jnp.float32), ts, qts


def _config(norm, sizes, tiles: Tiles, blocks: Blocks, pos_w, ts_w, n: int, interpret: bool, *,
            num_candidates=None, candidates_only: bool = False) -> MhaConfig:
    has_bias = pos_w is not None
    return MhaConfig(
        norm=float(norm), **dict(zip(TILE_FIELDS, sizes)),
        num_pos=(pos_w.shape[0] + 1) // 2 if has_bias else 0, num_buckets=ts_w.shape[0] - 1 if has_bias else 0,
        candidates=num_candidates is not None or candidates_only, candidates_only=candidates_only,
        interpret=interpret, num_warps=blocks.num_warps, num_stages=blocks.num_stages, seq_len=n,
        heads_per_program=tiles.heads_per_program, dkdv_heads_per_program=tiles.dkdv_heads_per_program,
        dbias_block_k=max(sizes))


def _tiling(blocks: Blocks, n: int, heads: int, head_dim: int, has_bias: bool, dtype) -> tuple[Tiles, list[int], int]:
    """(tiles, the six block sizes capped at the padded length, N padded to a multiple of them)."""
    tiles = blocks.resolve(heads, head_dim, has_bias, jnp.dtype(dtype).itemsize)
    sizes = [min(s, tile_dim(n)) for s in tiles[:len(TILE_FIELDS)]]
    return tiles, sizes, -(-n // max(sizes)) * max(sizes)


def pallas_mha(q, k, v, lengths, pos_w=None, ts_w=None, timestamps=None, query_timestamps=None,
               num_candidates=None, buckets=None, *, norm: float, candidates_only: bool = False,
               blocks: Blocks | None = None, interpret: bool = False) -> jax.Array:
    """The kernel path of `hstu_mha` (same arguments; `buckets` is ignored: the kernel computes
    them from the timestamps)."""
    del buckets
    blocks = blocks or Blocks()
    bsz, n, heads, dqk = q.shape
    dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k [B, N, h, d] and v [B, N, h, dv] must agree, got {q.shape}, {k.shape}, {v.shape}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, n)
    n_hist = lengths if num_candidates is None else lengths - jnp.clip(num_candidates.astype(jnp.int32), 0, lengths)
    dqk_p, dv_p = tile_dim(dqk), tile_dim(dv)
    tiles, sizes, npad = _tiling(blocks, n, heads, max(dqk_p, dv_p), pos_w is not None, q.dtype)
    q, k = (pad_to(pad_to(x, 1, npad), 3, dqk_p) for x in (q, k))
    v = pad_to(pad_to(v, 1, npad), 3, dv_p)
    pos_w, ts_w, ts, qts = _bias_inputs(pos_w, ts_w, timestamps, query_timestamps, npad)
    cfg = _config(norm, sizes, tiles, blocks, pos_w, ts_w, n, interpret, num_candidates=num_candidates,
                  candidates_only=candidates_only)
    out = _mha(q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts, cfg)
    return out[:, :n, :, :dv]


# ------------------------------------------------------------------------------------------------
# Fused with HSTU's projection: u, v, q, k = split(silu(pre)), the attention of q, k, v, and in the
# backward the kernels write d pre itself (hstu_attention_bwd.py's `Packed`).


def _activate(pre: jax.Array, alpha: float) -> tuple[jax.Array, ...]:
    """pre [B, N, 4, h, d] -> u, v, q, k [B, N, h, d]: silu of each section, q scaled by alpha."""
    u, v, q, k = (jax.nn.silu(pre[:, :, i]) for i in range(4))
    return u, v, (q * alpha if alpha != 1.0 else q), k


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _projected(pre, pos_w, ts_w, lengths, n_hist, ts, qts, cfg: MhaConfig, alpha: float):
    return _projected_fwd(pre, pos_w, ts_w, lengths, n_hist, ts, qts, cfg, alpha)[0]


def _projected_fwd(pre, pos_w, ts_w, lengths, n_hist, ts, qts, cfg, alpha):
    u, v, q, k = _activate(pre, alpha)
    out = _mha(q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts, cfg)
    return (u, out), (pre, q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts)


def _projected_bwd(cfg: MhaConfig, alpha: float, residuals, cotangents):
    pre, q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts = residuals
    du, do = cotangents
    d_pre, _, _, d_pos, d_ts, *_ = _mha_bwd(cfg, (q, k, v, pos_w, ts_w, lengths, n_hist, ts, qts), do,
                                        packed=Packed(pre, du.astype(pre.dtype), alpha))
    return d_pre, d_pos, d_ts, None, None, None, None


_projected.defvjp(_projected_fwd, _projected_bwd)


def projection_fusable(heads: int, qk_dim: int, v_dim: int) -> bool:
    """Whether `projected_mha` takes this layout: one head width, a power of two >= 16 (the kernels
    read the packed sections unpadded), and heads not split over devices (the packed projection
    is split by column blocks, not heads)."""
    return qk_dim == v_dim and tile_dim(qk_dim) == qk_dim and not splits_heads(heads)


def reference_projected_mha(pre, lengths, pos_w=None, ts_w=None, timestamps=None, query_timestamps=None,
                            buckets=None, *, heads: int, alpha: float, norm: float):
    """Pure jnp `projected_mha` (also its `xla` implementation)."""
    bsz, n, width = pre.shape
    u, v, q, k = _activate(pre.reshape(bsz, n, 4, heads, width // (4 * heads)), alpha)
    return u.reshape(bsz, n, -1), reference_mha(q, k, v, lengths, pos_w, ts_w, timestamps, query_timestamps,
                                                buckets=buckets, norm=norm)


def pallas_projected_mha(pre, lengths, pos_w=None, ts_w=None, timestamps=None, query_timestamps=None, buckets=None,
                         *, heads: int, alpha: float, norm: float, blocks: Blocks | None = None,
                         interpret: bool = False):
    """The kernel path of `projected_mha` (`buckets` ignored, as in `pallas_mha`)."""
    del buckets
    blocks = blocks or Blocks()
    bsz, n, width = pre.shape
    d = width // (4 * heads)
    if 4 * heads * d != width or tile_dim(d) != d:
        raise ValueError(f"projected_mha needs pre [B, N, 4 x {heads} heads x d] with d a power of two >= 16, "
                         f"got width {width}")
    tiles, sizes, npad = _tiling(blocks, n, heads, d, pos_w is not None, pre.dtype)
    pre = pad_to(pre.reshape(bsz, n, 4, heads, d), 1, npad)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, n)
    pos_w, ts_w, ts, qts = _bias_inputs(pos_w, ts_w, timestamps, query_timestamps, npad)
    cfg = _config(norm, sizes, tiles, blocks, pos_w, ts_w, n, interpret)
    u, out = _projected(pre, pos_w, ts_w, lengths, lengths, ts, qts, cfg, float(alpha))
    return u[:, :n].reshape(bsz, n, heads * d), out[:, :n]


# ------------------------------------------------------------------------------------------------
# Dispatchers. Under a multi-device mesh the kernel runs per device (scaling/kernels/sharded.py):
# sequences split over the batch axes, heads over tensor where the layout splits heads, the bias
# tables replicated.

_HEADS = ("batch", None, "heads", None)  # q, k, v, outputs [B, N, h, d]
_SEQ = ("batch", None)  # timestamps [B, N], rab_hist [B, H]
_ROWS = ("batch",)  # lengths, candidate counts, request times [B]


def hstu_mha(q, k, v, lengths, *, norm: float, pos_w=None, ts_w=None, timestamps=None, query_timestamps=None,
             num_candidates=None, candidates_only: bool = False, buckets=None, impl: str = "auto",
             blocks: Blocks | None = None) -> jax.Array:
    """HSTU attention [B, N, h, dv] by `impl` (module docstring); jit- and grad-compatible."""
    if impl == "mosaic":
        if pos_w is not None or candidates_only:
            raise ValueError("impl='mosaic' has no relative bias and no candidates-only form")
        return mosaic_hstu_mha(q, k, v, lengths, num_candidates, norm=norm)
    static = dict(norm=norm, candidates_only=candidates_only)
    kernel = functools.partial(pallas_mha, blocks=blocks, **static)
    reference = functools.partial(reference_mha, **static)
    return dispatch(impl, kernel, reference, q, k, v, lengths, pos_w, ts_w, timestamps, query_timestamps,
                    num_candidates, buckets, names=(_HEADS, _HEADS, _HEADS, _ROWS, None, None, _SEQ, _SEQ, _ROWS,
                                                    ("batch", None, None)), out_names=_HEADS)


def mosaic_hstu_mha(q, k, v, lengths, num_candidates=None, *, norm: float,
                    interpret_off_gpu: bool = False) -> jax.Array:
    """`hstu_mha` without bias through the Mosaic GPU kernels (hstu_attention_mgpu.py) on an NVIDIA
    GPU, per device under a mesh; elsewhere the jnp reference, or with interpret_off_gpu the kernels
    in JAX's Mosaic GPU interpreter (what the tests use: slow, and a whole training step under one
    jit can starve XLA's CPU thread pool with the interpreter's warpgroup threads on a small
    machine). The kernels take 16-bit inputs: float32 q, k, v run in bf16, the output cast back."""

    def kernel(q, k, v, lengths, num_candidates, *, interpret):
        dtype = q.dtype
        q, k, v = (x.astype(jnp.bfloat16) if dtype == jnp.float32 else x for x in (q, k, v))
        return mosaic_mha(q, k, v, lengths, num_candidates, norm=norm, interpret=interpret).astype(dtype)

    def reference(q, k, v, lengths, num_candidates):
        return reference_mha(q, k, v, lengths, num_candidates=num_candidates, norm=norm)

    return dispatch("pallas" if interpret_off_gpu else "auto", kernel, reference, q, k, v, lengths, num_candidates,
                    names=(_HEADS, _HEADS, _HEADS, _ROWS, _ROWS), out_names=_HEADS)


def projected_mha(pre, lengths, *, heads: int, norm: float, alpha: float = 1.0, pos_w=None, ts_w=None,
                  timestamps=None, query_timestamps=None, buckets=None, impl: str = "auto",
                  blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """HSTU's projection activation and attention in one: pre [B, N, 4 h d], the pre-activation of
    the (u, v, q, k) projection, -> (u [B, N, h d], attention [B, N, h, d]) where u, v, q, k =
    split(silu(pre)), q scaled by alpha, and the attention is `hstu_mha(q, k, v, ...)`.

    The kernel path's backward writes pre's gradient directly (hstu_attention_bwd.py's `Packed`).
    Needs `projection_fusable(heads, d, d)`; sequences are split over the batch axes under a mesh."""
    if pre.ndim != 3 or pre.shape[-1] % (4 * heads):
        raise ValueError(f"projected_mha needs pre [B, N, 4 x {heads} heads x d], got shape {pre.shape}")
    static = dict(heads=heads, alpha=alpha, norm=norm)
    kernel = functools.partial(pallas_projected_mha, blocks=blocks, **static)
    reference = functools.partial(reference_projected_mha, **static)
    return dispatch(impl, kernel, reference, pre, lengths, pos_w, ts_w, timestamps, query_timestamps, buckets,
                    names=(("batch", None, None), _ROWS, None, None, _SEQ, _SEQ, ("batch", None, None)),
                    out_names=("batch",))


def _candidate_layout(hist: jax.Array, cand: jax.Array, n_hist: jax.Array) -> jax.Array:
    """[B, H, ...] history and [B, M, ...] candidates -> [B, H + M, ...] with sequence b's first
    n_hist[b] history rows, then its M candidates, then (masked) filler."""
    width, m = hist.shape[1], cand.shape[1]
    both = jnp.concatenate([hist, cand], axis=1)
    r = jnp.arange(width + m)[None, :]
    src = jnp.clip(jnp.where(r < n_hist[:, None], r, width + r - n_hist[:, None]), 0, width + m - 1)
    return jnp.take_along_axis(both, src.reshape(src.shape + (1,) * (both.ndim - 2)), axis=1)


def candidate_mha(q, k, v, k_hist, v_hist, lengths, *, norm: float, rab_hist, rab_self, pos_w=None, ts_w=None,
                  timestamps=None, request_time=None, impl: str = "auto", blocks: Blocks | None = None) -> jax.Array:
    """M-FALCON's candidate attention (`candidate_attention` in scaling/models/hstu_attention.py):
    q, k [B, M, h, dqk], v [B, M, h, dv] for M candidates, each seeing the cached k_hist/v_hist
    [B, H, h, d] (valid below lengths[b]) and itself -> [B, M, h, dv].

    The reference reads the precomputed biases rab_hist [B, H], rab_self [B]; the kernel computes
    them from pos_w [2 max_len - 1], ts_w, the history's timestamps [B, H] and request_time [B]
    (pass pos_w=None without a relative bias): it lays out [history; candidates] per sequence and
    runs the attention kernel on candidate rows only, so its cost is O(M n) per head, not O(n^2).
    """
    m = q.shape[1]

    def reference(q, k, v, k_hist, v_hist, lengths, rab_hist, rab_self, pos_w, ts_w, timestamps, request_time):
        return candidate_attention(q, k, v, k_hist, v_hist, rab_hist, rab_self, lengths, norm)

    def kernel(q, k, v, k_hist, v_hist, lengths, rab_hist, rab_self, pos_w, ts_w, timestamps, request_time, *,
               interpret):
        n_hist = lengths.astype(jnp.int32)
        q_all = _candidate_layout(jnp.zeros(k_hist.shape, q.dtype), q, n_hist)
        k_all, v_all = _candidate_layout(k_hist, k, n_hist), _candidate_layout(v_hist, v, n_hist)
        ts = qts = None
        if pos_w is not None:
            now = jnp.broadcast_to(request_time[:, None].astype(jnp.int32), (q.shape[0], m))
            ts = _candidate_layout(timestamps.astype(jnp.int32), now, n_hist)
            qts = jnp.broadcast_to(request_time[:, None].astype(jnp.int32), ts.shape)
        out = pallas_mha(q_all, k_all, v_all, n_hist + m, pos_w, ts_w, ts, qts, jnp.full_like(n_hist, m), norm=norm,
                         candidates_only=True, blocks=blocks, interpret=interpret)
        rows = n_hist[:, None] + jnp.arange(m)[None, :]
        return jnp.take_along_axis(out, rows[:, :, None, None], axis=1)

    return dispatch(impl, kernel, reference, q, k, v, k_hist, v_hist, lengths, rab_hist, rab_self, pos_w, ts_w,
                    timestamps, request_time, names=(_HEADS,) * 5 + (_ROWS, _SEQ, _ROWS, None, None, _SEQ, _ROWS),
                    out_names=_HEADS)
