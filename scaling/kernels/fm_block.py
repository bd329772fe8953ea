"""Wukong's FM block as one Pallas kernel: X (X^T Y), flatten, LayerNorm, per tile of examples.

    out = fm_block(x, y, scale, bias, eps=1e-5, impl="auto")      # [B, n * k]

equals `LayerNorm(n * k)(fm_low_rank(x, y.astype(x.dtype)).reshape(B, -1))` of scaling/models/
wukong.py and mlp.py for x [B, n, d], y [n, k], scale/bias [n * k]. A LayerNorm over the flattened
n * k is a LayerNorm over the whole [n, k] tile, so the kernel never flattens: scale and bias are
reshaped to [n, k] outside and the [B, n, k] output is reshaped for free afterwards. The fusion
saves the [B, d, k] and [B, n, k] round trips to memory (the block is memory-bound: ~20 FLOP/byte).

Grid (B / BT,): a program holds Y, scale and bias and walks its BT examples with 2-D dots (Triton
has no batched 3-D dot): P = X^T Y [d, k] (fp32 accumulation, cast to the input dtype as the
reference's einsum rounds it), Z = X P [n, k] in fp32, statistics and the affine in fp32 over the
true n * k entries. Tiles are [n_p, 64 or 32] column chunks of x (`chunk_width`) and [n_p, k_p],
n, d, k rounded up to powers of two >= 16 for tl.dot; x, the output and dX stay at their true
sizes in memory and are read and written with masked loads and stores (zero outside), so XLA
never writes a padded copy of them (at Wukong's d = 160 that copy was 2.1x x). The padding is
masked out of the statistics.

Backward (custom_vjp, a second kernel on the same grid, recomputing Z from X and Y):

    dZ^ = g * scale,  dZ = rstd (dZ^ - mean(dZ^) - Z^ mean(dZ^ Z^)),
    dX = dZ P^T + Y dP^T with dP = X^T dZ,  dY = sum_b X dP,  dscale = sum_b g Z^,  dbias = sum_b g

walking d in column chunks (Z summed over the chunks first, then dP, dX and dY per chunk), so x,
P, dP and dX are never held whole. The forward sums Z over the same chunks (Z = sum_c X_c (X_c^T
Y): P's rows are per column of x), so neither kernel holds a [n, d] tile.

Past the tiles the backward kernel holds (`kernel_fits`: n <= 128, n * k <= 8192 in bf16, 4096
in fp32, padded sizes) the backward is the reference's VJP (XLA), and past the forward's
(n * k <= 8192, d <= 1024) the whole block is. Wukong at the paper's scale (n = 96, d = 160,
k = 48) runs both kernels in bf16, and the forward kernel in fp32.

dX is written per example; dY and dscale are accumulated per program in registers and
written as per-program partials [B / BT, n, k] that XLA sums (no atomics).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from scaling.kernels.dispatch import dispatch
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import contract, corner_mask, ieee_fp32_dots, load_tile, store_tile, tile_dim
from scaling.models.mlp import layer_norm

__all__ = ["fm_block", "reference_fm_block", "pallas_fm_block", "chunk_width", "kernel_fits"]


# The kernels hold x (and P, dP, dX) for this many columns of d at a time. P_c = X_c^T Y and dP_c
# have D_CHUNK rows, and Hopper's wgmma needs >= 64 output rows (else Triton emits Ampere's
# mma.sync), so 64 where it fits: in the forward always, in the backward up to n * k * itemsize of
# 8192 bytes (`chunk_width`: past that 64 columns spill, 712 B at Wukong's paper shape), and
# 32 under IEEE fp32 dots (no tensor-core path; 64 columns spilled up to 6.7 KB there).
D_CHUNK = 64
NARROW_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class _Config:
    n: int  # true sizes
    d: int
    k: int
    n_p: int  # the tile sizes: powers of two >= 16
    d_p: int
    k_p: int
    eps: float
    block_b: int
    interpret: bool
    num_warps: int = 4  # forward
    bwd_num_warps: int = 8
    num_stages: int = 2
    itemsize: int = 2  # x's bytes per element (float32 tiles hold half as many: `kernel_fits`)

    @property
    def kernel_backward(self) -> bool:
        """False: the backward is the reference's VJP (tiles too large for the backward kernel)."""
        return kernel_fits(self.n_p, self.d_p, self.k_p, self.itemsize)[1]

    def d_chunk(self, backward: bool = False) -> int:
        """The width of the column chunks a kernel walks d in."""
        return chunk_width(self.n_p, self.d_p, self.k_p, self.itemsize, backward=backward)


def reference_fm_block(x, y, scale, bias, *, eps: float = 1e-5) -> jax.Array:
    """The model's jnp computation: fm_low_rank, flatten, LayerNorm (fp32 statistics, the affine
    in the input dtype), [B, n * k]."""
    p = jnp.einsum("bnd,nk->bdk", x, y.astype(x.dtype))
    fm = jnp.einsum("bnd,bdk->bnk", x, p).reshape(x.shape[0], -1)
    return layer_norm(fm, scale, bias, eps)


def _standardized(z, cfg: _Config):
    """(Z^ fp32, rstd, mask) of Z [n, k] (tile shape) over its true n * k entries."""
    mask = corner_mask(cfg.n_p, cfg.k_p, cfg.n, cfg.k)
    count = cfg.n * cfg.k
    mean = jnp.sum(z) / count  # padded entries of z are exact zeros
    centred = jnp.where(mask, z - mean, 0.0)
    rstd = lax.rsqrt(jnp.sum(centred * centred) / count + cfg.eps)
    return centred * rstd, rstd, mask


def _x_chunk(x_ref, e, c, width: int, cfg: _Config):
    """(columns [c w, (c + 1) w) of example e's x [n_p, w] (zero outside the true [n, d]), their
    mask, the first column)."""
    start = c * width
    mask = corner_mask(cfg.n_p, width, cfg.n, cfg.d - start)
    return load_tile(x_ref, e, mask, col=start), mask, start


def _z(x_ref, y, e, cfg: _Config, width: int) -> jax.Array:
    """Z = X (X^T Y) [n_p, k_p] fp32 of example e, summed over x's column chunks: P's rows are
    per column of x, so Z = sum_c X_c P_c with P_c = X_c^T Y (cast to x's dtype, as the reference
    rounds P)."""

    def add(c, z):
        x, _, _ = _x_chunk(x_ref, e, c, width, cfg)
        return z + contract(x, contract(x, y, (0, 0)).astype(x.dtype), (1, 0))

    return lax.fori_loop(0, cfg.d_p // width, add, jnp.zeros((cfg.n_p, cfg.k_p), jnp.float32))


def _forward_kernel(x_ref, y_ref, scale_ref, bias_ref, o_ref, *, cfg: _Config):
    y = y_ref[...].astype(x_ref.dtype)
    scale, bias = scale_ref[...], bias_ref[...]

    def example(e, carry):
        zhat, _, mask = _standardized(_z(x_ref, y, e, cfg, cfg.d_chunk()), cfg)
        store_tile(o_ref, e, (zhat * scale + bias).astype(o_ref.dtype), mask)
        return carry

    lax.fori_loop(0, cfg.block_b, example, 0)


def _backward_kernel(x_ref, y_ref, scale_ref, g_ref, dx_ref, dy_ref, dscale_ref, *, cfg: _Config):
    y = y_ref[...].astype(x_ref.dtype)
    scale = scale_ref[...]
    count = cfg.n * cfg.k
    width = cfg.d_chunk(backward=True)

    def example(e, carry):
        dy, dscale = carry
        zhat, rstd, mask = _standardized(_z(x_ref, y, e, cfg, width), cfg)
        g = load_tile(g_ref, e, mask).astype(jnp.float32)
        dzhat = g * scale
        dz = jnp.where(mask, rstd * (dzhat - jnp.sum(dzhat) / count - zhat * (jnp.sum(dzhat * zhat) / count)), 0.0)
        dz = dz.astype(x_ref.dtype)
        dscale = dscale + g * zhat  # before the chunk loop: g and Z^ die here

        def chunk_grads(c, dy):  # per column chunk: P_c, dP_c = X_c^T dZ, dX_c = dZ P_c^T + Y dP_c^T
            x, x_mask, start = _x_chunk(x_ref, e, c, width, cfg)
            p = contract(x, y, (0, 0)).astype(x.dtype)
            dp = contract(x, dz, (0, 0)).astype(x.dtype)
            dx = contract(dz, p, (1, 1)) + contract(y, dp, (1, 1))
            store_tile(dx_ref, e, dx.astype(dx_ref.dtype), x_mask, col=start)
            return dy + contract(x, dp, (1, 0))

        return lax.fori_loop(0, cfg.d_p // width, chunk_grads, dy), dscale

    zeros = jnp.zeros(dy_ref.shape, jnp.float32)
    dy, dscale = lax.fori_loop(0, cfg.block_b, example, (zeros, zeros))
    dy_ref[...] = dy
    dscale_ref[...] = dscale


def _specs(cfg: _Config):
    """(x / dX, output / cotangent, whole tile) specs: x [B, n, d] and the output [B, n, k] at their
    true sizes, BT examples per program; Y, scale and bias [n_p, k_p] padded (they are small)."""
    return (pl.BlockSpec((cfg.block_b, cfg.n, cfg.d), lambda i: (i, 0, 0)),
            pl.BlockSpec((cfg.block_b, cfg.n, cfg.k), lambda i: (i, 0, 0)),
            pl.BlockSpec((cfg.n_p, cfg.k_p), lambda i: (0, 0)))


def _call_forward(x, y, scale, bias, cfg: _Config):
    b = x.shape[0]
    n, d, k = cfg.n_p, cfg.d_p, cfg.k_p  # the work is done on the tiles
    x_spec, out_spec, whole = _specs(cfg)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=out_struct((b, cfg.n, cfg.k), x.dtype, x, y, scale, bias),
        grid=(b // cfg.block_b,),
        in_specs=[x_spec, whole, whole, whole],
        out_specs=out_spec,
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=b * (4 * n * d * k + 8 * n * k), transcendentals=b,
                                      bytes_accessed=x.dtype.itemsize * (x.size + b * cfg.n * cfg.k) + 12 * n * k),
        interpret=cfg.interpret,
        name="wukong_fm_block_fwd",
    )(x, y, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fm(x, y, scale, bias, cfg: _Config):
    return _call_forward(x, y, scale, bias, cfg)


def _fm_fwd(x, y, scale, bias, cfg):
    return _call_forward(x, y, scale, bias, cfg), (x, y, scale)


def _reference_bwd(cfg: _Config, residuals, g):
    """The backward through the jnp reference, for tiles the backward kernel cannot hold. Takes and
    returns the kernel's operand shapes (Y, scale and bias padded to [n_p, k_p])."""
    x, y, scale = residuals
    n, k = cfg.n, cfg.k

    def forward(x, y, scale, bias):
        return reference_fm_block(x, y, scale.reshape(-1), bias.reshape(-1), eps=cfg.eps)

    bias = jnp.zeros((n, k), scale.dtype)  # the output's bias gradient does not depend on its value
    _, pullback = jax.vjp(forward, x, y[:n, :k], scale[:n, :k], bias)
    dx, dy, dscale, dbias = pullback(g.reshape(g.shape[0], n * k))
    pad = functools.partial(_pad, shape=(cfg.n_p, cfg.k_p))
    return dx, pad(dy).astype(y.dtype), pad(dscale).astype(scale.dtype), pad(dbias).astype(scale.dtype)


def _fm_bwd(cfg: _Config, residuals, g):
    if not cfg.kernel_backward:
        return _reference_bwd(cfg, residuals, g)
    x, y, scale = residuals
    b = x.shape[0]
    n, d, k = cfg.n_p, cfg.d_p, cfg.k_p
    programs = b // cfg.block_b
    x_spec, tile, whole = _specs(cfg)
    partial = pl.BlockSpec((None, n, k), lambda i: (i, 0, 0))
    part_shape = out_struct((programs, n, k), jnp.float32, x, y, scale, g)
    dx, dy, dscale = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg),
        out_shape=(out_struct(x.shape, x.dtype, x, y, scale, g), part_shape, part_shape),
        grid=(programs,),
        in_specs=[x_spec, whole, whole, tile],
        out_specs=(x_spec, partial, partial),
        compiler_params=pltr.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=b * (12 * n * d * k + 20 * n * k), transcendentals=b,
                                      bytes_accessed=x.dtype.itemsize * (2 * x.size + b * cfg.n * cfg.k)
                                      + 12 * programs * n * k),
        interpret=cfg.interpret,
        name="wukong_fm_block_bwd",
    )(x, y, scale, g)
    # dbias = sum_b g: one more register tile in the kernel, a plain reduction of g here
    dbias = jnp.pad(g.astype(jnp.float32).sum(0), ((0, n - cfg.n), (0, k - cfg.k)))
    return dx, dy.sum(0).astype(y.dtype), dscale.sum(0).astype(scale.dtype), dbias.astype(scale.dtype)


_fm.defvjp(_fm_fwd, _fm_bwd)


def _pad(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if a.shape == shape:
        return a
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def tile_sizes(n: int, d: int, k: int) -> tuple[int, int, int]:
    """(n_p, d_p, k_p): the tile sizes the kernels compute with, powers of two >= 16 (tl.dot)."""
    return tile_dim(n), tile_dim(d), tile_dim(k)


def kernel_fits(n_p: int, d_p: int, k_p: int, itemsize: int = 2) -> tuple[bool, bool]:
    """(forward, backward): whether each kernel holds its tiles in registers, as compiled for
    sm_90a (python -m benchmarks.kernel_compile --op fm; padded sizes n_p x d_p x k_p; x of
    `itemsize` bytes).

    Both kernels walk d in column chunks (`chunk_width`), so d costs them loop trips, not
    registers; their [n, k] tiles (Z, Z^, dZ, dY, dscale) decide. bf16, 64-column chunks: the
    forward spills nothing up to n * k = 8192 at any d <= 1024 (at most 88 KiB of shared memory;
    with 32-column chunks it spilled 88-188 B at n * k = 16384); the backward nothing up to
    n * k = 4096, and with 32-column chunks at Wukong's n = 96, d = 160, k = 48 (255 registers,
    52 KiB), 4 B at (128, 128, 64) and 8 B at (128, 512, 64), 240-264 B at n = 256. float32 (TF32
    dots): the forward likewise (at most 160 KiB); the backward nothing up to n * k = 4096,
    344-428 B at n * k = 8192. Before the chunks the forward held [n, d] whole: in bf16 176 KiB at
    (128, 256, 64), in fp32 288 KiB there, more than an H100 block may have (227 KiB), so fp32
    Wukong at the paper's scale could not have launched; and the backward at (128, 256, 64)
    spilled 2.7 KB and needed 240 KiB.

    IEEE fp32 dots (matmul precision 'highest', a checking mode) need far more registers: the
    backward spills 348-1124 B per thread from (48, 64, 24) on, the forward 640-724 B at n = 128
    (25 KB before its chunks); correct there, not fast."""
    forward = n_p * k_p <= 8192 and d_p <= 1024
    backward = forward and n_p <= 128 and n_p * k_p <= (8192 if itemsize <= 2 else 4096)
    return forward, backward


def chunk_width(n_p: int, d_p: int, k_p: int, itemsize: int = 2, *, backward: bool = False) -> int:
    """The columns of d a kernel holds at a time for padded sizes (D_CHUNK's comment). The
    backward takes 64 while its [n, k] register tiles leave room for 64-column chunks of x, P, dP
    and dX: compiled for sm_90a (kernel_compile --op fm), every shape up to n * k * itemsize = 8192
    bytes holds them (at most 226 registers), all dots then on wgmma; at Wukong's (96, 160, 48)
    in bf16 they spilled 712 B, in fp32 at (128, 64, 32) 40 B. Under IEEE fp32 dots both kernels
    take 32."""
    if itemsize > 2 and ieee_fp32_dots():
        width = NARROW_CHUNK
    elif backward and n_p * k_p * itemsize > 8192:
        width = NARROW_CHUNK
    else:
        width = D_CHUNK
    return min(d_p, width)


def launch_warps(n_p: int, d_p: int, k_p: int) -> tuple[int, int]:
    """(forward, backward) num_warps for padded sizes, by the register tiles each kernel holds.
    Compiled for sm_90a (python -m benchmarks.kernel_compile --op fm), the backward's tiles spilled
    at 4 warps from (n, d, k) = (64, 128, 32) or (128, 64, 32) on (before its d chunks); at 8
    warps every backward `kernel_fits` admits holds (the spills are in its docstring)."""
    return (4 if n_p * k_p <= 4096 else 8), (4 if n_p * max(d_p, k_p) <= 1024 else 8)


def pallas_fm_block(x, y, scale, bias, *, eps: float = 1e-5, block_b: int = 32, interpret: bool = False) -> jax.Array:
    """The kernel path of `fm_block`: tiles of n, d, k rounded up to powers of two >= 16 (loaded
    masked from x at its true size), Y, scale and bias padded to the tile, B padded to a whole
    number of programs only when it is not one already."""
    b, n, d = x.shape
    k = y.shape[1]
    if y.shape[0] != n or scale.shape != (n * k,) or bias.shape != (n * k,):
        raise ValueError(f"x [B, n, d], y [n, k], scale/bias [n * k] must agree: {x.shape}, {y.shape}, {scale.shape}")
    n_p, d_p, k_p = tile_sizes(n, d, k)
    itemsize = jnp.dtype(x.dtype).itemsize
    if not kernel_fits(n_p, d_p, k_p, itemsize)[0]:
        warnings.warn(f"FM block tiles (n, d, k) = ({n_p}, {d_p}, {k_p}) are larger than the kernel holds; "
                      "running the XLA reference", stacklevel=2)
        return reference_fm_block(x, y, scale, bias, eps=eps)
    block_b = max(1, min(block_b, b))
    b_p = -(-b // block_b) * block_b
    fwd_warps, bwd_warps = launch_warps(n_p, d_p, k_p)
    cfg = _Config(n=n, d=d, k=k, n_p=n_p, d_p=d_p, k_p=k_p, eps=float(eps), block_b=block_b, interpret=interpret,
                  num_warps=fwd_warps, bwd_num_warps=bwd_warps, itemsize=itemsize)
    scale32, bias32 = (_pad(t.astype(jnp.float32).reshape(n, k), (n_p, k_p)) for t in (scale, bias))
    out = _fm(_pad(x, (b_p, n, d)), _pad(y, (n_p, k_p)), scale32, bias32, cfg)
    return out[:b].reshape(b, n * k)


def fm_block(x, y, scale, bias, *, eps: float = 1e-5, impl: str = "auto", block_b: int = 32) -> jax.Array:
    """LayerNorm(flatten(X (X^T Y))) [B, n * k] by `impl` (auto | pallas | xla, dispatch.py)."""
    kernel = functools.partial(pallas_fm_block, eps=eps, block_b=block_b)
    reference = functools.partial(reference_fm_block, eps=eps)
    return dispatch(impl, kernel, reference, x, y, scale, bias, names=(("batch",), None, None, None),
                    out_names=("batch",))
