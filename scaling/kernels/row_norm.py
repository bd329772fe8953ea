"""HSTU's LayerNorms as one Pallas kernel each: normalize rows, optionally times a gate.

    y = gated_layer_norm(x, gate=None, eps=1e-6, impl="auto")         # [..., d]

equals HSTU's non-affine LayerNorm (scaling/models/hstu.py) `layer_norm(x)`, or `gate *
layer_norm(x)` with a gate (the block's output u * LN(attention)): statistics in fp32 over the
row's d entries, the normalized row cast to x's dtype, then the gate's product in that dtype.

As XLA compiled HSTU's step, the two LayerNorms of a block and the gate took about 23 passes over
a [B N, d] activation per layer, forward and backward (benchmarks/gpu_aot.py). The kernels make
the fewest a fused LayerNorm can:

  forward   reads x (and the gate) and writes y: 2 passes (3 with the gate)
  backward  recomputes the row statistics from x, reads the cotangent (and the gate) and writes
            dx (and d gate = g * LN(x)): 3 passes (5 with the gate)

Grid (M / R,) over the M = B N rows; a program holds R rows of d entries (d padded to a power of
two in registers only; loads and stores are masked at the true d and M). R = `block_rows`: 16 at
HSTU's d = 1024 in bf16, fewer for wider rows or fp32, so that a program's tiles stay within
registers (the gated backward uses 245 registers at d = 1024, bf16, R = 16).

    x^ = (x - mean) rstd,  g^ = g (x gate),  dx = rstd (g^ - mean(g^) - x^ mean(g^ x^))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from scaling.kernels.dispatch import dispatch
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import corner_mask, load_tile, store_tile, tile_dim
from scaling.models.mlp import layer_norm

__all__ = ["gated_layer_norm", "reference_gated_layer_norm", "pallas_gated_layer_norm", "block_rows"]

ROW_WARPS = 8  # warps per program
TILE_ELEMENTS = 16384  # R x d_p of one program's 16-bit tiles (half that for fp32): `block_rows`


def block_rows(d_p: int, itemsize: int) -> int:
    """R, the rows one program normalizes: TILE_ELEMENTS / d_p for 16-bit inputs, half for fp32,
    between 1 and 64 (a power of two, as d_p is)."""
    return max(1, min(64, TILE_ELEMENTS // (d_p * max(1, itemsize // 2))))


@dataclasses.dataclass(frozen=True)
class _Config:
    rows: int  # M, the true number of rows
    block: int  # R, rows per program
    d: int
    d_p: int
    eps: float
    gated: bool
    interpret: bool
    num_warps: int = ROW_WARPS
    num_stages: int = 2


def reference_gated_layer_norm(x, gate=None, *, eps: float = 1e-6) -> jax.Array:
    """HSTU's jnp LayerNorm (no scale or shift; fp32 statistics: mlp.layer_norm), times the gate if
    given."""
    y = layer_norm(x, eps=eps)
    return y if gate is None else gate * y


def _block(cfg: _Config):
    """(this program's first row, the block's index on the [1, M, d] view's leading axis: 0, traced,
    which load_tile's masked loads past d need in interpret mode)."""
    first = pl.program_id(0) * cfg.block
    return first, first - first


def standardize_rows(x: jax.Array, mask: jax.Array, d: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """(x^ [R, d_p], rstd [R, 1]) of fp32 rows x [R, d_p] over their true d entries: x^ = (x - mean)
    rstd. Entries of x outside `mask` must be zeros (masked loads); they stay zeros in x^."""
    centred = jnp.where(mask, x - jnp.sum(x, axis=1, keepdims=True) / d, 0.0)
    rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / d + eps)
    return centred * rstd, rstd


def standardized_rows_grad(g: jax.Array, xhat: jax.Array, rstd: jax.Array, mask: jax.Array, d: int) -> jax.Array:
    """dx [R, d_p] for the fp32 cotangent g of x^ = `standardize_rows(x)`: rstd (g - mean(g) - x^
    mean(g x^)), zeros outside `mask`."""
    mean_g = jnp.sum(g, axis=1, keepdims=True) / d
    mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / d
    return jnp.where(mask, rstd * (g - mean_g - xhat * mean_gx), 0.0)


def _normalized(x_ref, cfg: _Config):
    """(x^ fp32 [R, d_p], rstd [R, 1], mask) of this program's rows."""
    first, e = _block(cfg)
    mask = corner_mask(cfg.block, cfg.d_p, cfg.rows - first, cfg.d)
    xhat, rstd = standardize_rows(load_tile(x_ref, e, mask).astype(jnp.float32), mask, cfg.d, cfg.eps)
    return xhat, rstd, mask


def _forward_kernel(*refs, cfg: _Config):
    x_ref, *gate_ref, o_ref = refs
    xhat, _, mask = _normalized(x_ref, cfg)
    e = _block(cfg)[1]
    y = xhat.astype(o_ref.dtype)
    if cfg.gated:
        y = load_tile(gate_ref[0], e, mask) * y
    store_tile(o_ref, e, y, mask)


def _backward_kernel(*refs, cfg: _Config):
    if cfg.gated:
        x_ref, gate_ref, g_ref, dx_ref, dgate_ref = refs
    else:
        x_ref, g_ref, dx_ref = refs
    xhat, rstd, mask = _normalized(x_ref, cfg)
    e = _block(cfg)[1]
    g = load_tile(g_ref, e, mask)
    if cfg.gated:
        store_tile(dgate_ref, e, g * xhat.astype(g.dtype), mask)
        g = g.astype(jnp.float32) * load_tile(gate_ref, e, mask).astype(jnp.float32)
    dx = standardized_rows_grad(g.astype(jnp.float32), xhat, rstd, mask, cfg.d)
    store_tile(dx_ref, e, dx.astype(dx_ref.dtype), mask)


def _spec(cfg: _Config):
    """R rows of the [1, M, d] view per program (the leading 1: load_tile's example axis)."""
    return pl.BlockSpec((1, cfg.block, cfg.d), lambda i: (0, i, 0))


def _call_forward(x, gate, cfg: _Config):
    inputs = (x,) if gate is None else (x, gate)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=out_struct(x.shape, x.dtype, *inputs),
        grid=(x.shape[1] // cfg.block,),
        in_specs=[_spec(cfg)] * len(inputs),
        out_specs=_spec(cfg),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=8 * x.size, transcendentals=cfg.rows,
                                      bytes_accessed=(len(inputs) + 1) * x.size * x.dtype.itemsize),
        interpret=cfg.interpret,
        name="row_layer_norm_fwd",
    )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _norm(x, gate, cfg: _Config):
    return _call_forward(x, gate, cfg)


def _norm_fwd(x, gate, cfg):
    return _call_forward(x, gate, cfg), (x, gate)


def _norm_bwd(cfg: _Config, residuals, g):
    x, gate = residuals
    inputs = (x, g) if gate is None else (x, gate, g)
    outs = (x,) if gate is None else (x, gate)
    grads = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg),
        out_shape=tuple(out_struct(o.shape, o.dtype, *inputs) for o in outs),
        grid=(x.shape[1] // cfg.block,),
        in_specs=[_spec(cfg)] * len(inputs),
        out_specs=tuple(_spec(cfg) for _ in outs),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=12 * x.size, transcendentals=cfg.rows,
                                      bytes_accessed=(len(inputs) + len(outs)) * x.size * x.dtype.itemsize),
        interpret=cfg.interpret,
        name="row_layer_norm_bwd",
    )(*inputs)
    return (grads[0], None) if gate is None else tuple(grads)


_norm.defvjp(_norm_fwd, _norm_bwd)


def pallas_gated_layer_norm(x, gate=None, *, eps: float = 1e-6, interpret: bool = False) -> jax.Array:
    """The kernel path of `gated_layer_norm`: rows viewed as [1, M, d] (free reshapes)."""
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"the gate {gate.shape} must have x's shape {x.shape}")
    d = x.shape[-1]
    rows = x.size // d
    d_p = tile_dim(d)
    block = block_rows(d_p, jnp.dtype(x.dtype).itemsize)
    padded = -(-rows // block) * block  # whole blocks (a copy only when M is not a multiple of R)

    def view(a):
        a = a.reshape(1, rows, d)
        return a if padded == rows else jnp.pad(a, ((0, 0), (0, padded - rows), (0, 0)))

    cfg = _Config(rows=rows, block=block, d=d, d_p=d_p, eps=float(eps), gated=gate is not None, interpret=interpret)
    out = _norm(view(x), None if gate is None else view(gate.astype(x.dtype)), cfg)
    return out[:, :rows].reshape(x.shape)


def gated_layer_norm(x, gate=None, *, eps: float = 1e-6, impl: str = "auto") -> jax.Array:
    """HSTU's LayerNorm of x [..., d] (times gate [..., d] if given) by `impl` (auto | pallas |
    xla, dispatch.py)."""
    kernel = functools.partial(pallas_gated_layer_norm, eps=eps)
    reference = functools.partial(reference_gated_layer_norm, eps=eps)
    batch = ("batch",)
    return dispatch(impl, kernel, reference, x, gate, names=(batch, batch if gate is not None else None),
                    out_names=batch)
