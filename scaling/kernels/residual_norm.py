"""The Wukong layer's output as one Pallas kernel: concatenate, add the residual, LayerNorm.

    y = residual_layer_norm(first, second, res, scale, bias, eps=1e-5, impl="auto")

equals `layer_norm(concatenate([first, second], axis=1) + res, scale, bias, eps)` (scaling/models/
mlp.py) for first [B, n1, d], second [B, n2, d] (or None), res [B, n1 + n2, d] and scale, bias [d]:
each row (example, field) is normalized over its d entries. As XLA compiles it, the concatenated
sum is written, read back for the statistics and the output, and the backward's gradient is
written once more to split it between the parts: about 15 passes over [B, n, d] per layer in
benchmarks/gpu_aot.py's Wukong step. The kernels take the parts and the residual as they are:

  forward   reads the parts and the residual once and writes y (3 passes)
  backward  recomputes the row statistics from the same inputs, reads the cotangent, and writes
            the parts' gradients and the residual's (the same values: d res = d concat) directly
            (5 passes); d scale and d bias are summed per program in registers and written as
            per-program partials [B / BT, d] that XLA sums (no atomics)

Grid (B / BT,): a program walks its BT examples and, within each part, blocks of ROWS fields,
loaded at their true sizes with masked loads (d is padded to a power of two in registers only).
The sum is taken in the inputs' dtype, as the model adds before it normalizes; statistics are
fp32 over the true d entries; the affine is applied in the inputs' dtype as the reference does.
The backward computes in fp32 throughout:

    x^ = (x - mean) rstd,  g^ = g scale,  dx = rstd (g^ - mean(g^) - x^ mean(g^ x^)),
    d scale = sum_rows g x^,  d bias = sum_rows g
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
from scaling.kernels.row_norm import standardize_rows, standardized_rows_grad
from scaling.kernels.sharded import out_struct
from scaling.kernels.tiles import cdiv, corner_mask, load_tile, store_tile, tile_dim
from scaling.models.mlp import layer_norm

__all__ = ["residual_layer_norm", "reference_residual_layer_norm", "pallas_residual_layer_norm"]

ROWS = 16  # fields a program normalizes at a time


@dataclasses.dataclass(frozen=True)
class _Config:
    parts: tuple[int, ...]  # fields of each part
    d: int
    d_p: int  # d rounded up to a power of two (the register tile)
    eps: float
    block_b: int
    interpret: bool
    num_warps: int = 4
    bwd_num_warps: int = 8
    num_stages: int = 2

    def walk(self, body, carry):
        """carry = body(p, row, out_row, n, carry) over every ROWS-field block of every part p (n
        fields, the block's first field `row` in the part and `out_row` in the output)."""
        offset = 0
        for p, n in enumerate(self.parts):
            def step(c, carry, p=p, n=n, offset=offset):
                row = c * ROWS
                return body(p, row, offset + row, n, carry)

            carry = lax.fori_loop(0, cdiv(n, ROWS), step, carry)
            offset += n
        return carry


def reference_residual_layer_norm(first, second, res, scale, bias, *, eps: float = 1e-5) -> jax.Array:
    """The model's jnp computation: concatenate, add, `layer_norm`."""
    out = first if second is None else jnp.concatenate([first, second], axis=1)
    return layer_norm(out + res, scale, bias, eps)


def _normalized(part_ref, res_ref, e, row, out_row, n, cfg: _Config):
    """(x^ fp32 [ROWS, d_p], rstd [ROWS, 1], mask) of fields [row, row + ROWS) of a part (n fields)
    of example e: x = part + residual, summed in their dtype, normalized over the true d."""
    mask = corner_mask(ROWS, cfg.d_p, n - row, cfg.d)
    x = (load_tile(part_ref, e, mask, row) + load_tile(res_ref, e, mask, out_row)).astype(jnp.float32)
    xhat, rstd = standardize_rows(x, mask, cfg.d, cfg.eps)
    return xhat, rstd, mask


def _forward_kernel(*refs, cfg: _Config):
    parts, (res_ref, scale_ref, bias_ref, o_ref) = refs[:len(cfg.parts)], refs[len(cfg.parts):]
    dtype = o_ref.dtype
    scale, bias = scale_ref[...].astype(dtype)[None, :], bias_ref[...].astype(dtype)[None, :]

    def example(e, carry):
        def block(p, row, out_row, n, carry):
            xhat, _, mask = _normalized(parts[p], res_ref, e, row, out_row, n, cfg)
            store_tile(o_ref, e, xhat.astype(dtype) * scale + bias, mask, out_row)
            return carry

        return cfg.walk(block, carry)

    lax.fori_loop(0, cfg.block_b, example, 0)


def _backward_kernel(*refs, cfg: _Config):
    count = len(cfg.parts)
    parts, (res_ref, scale_ref, g_ref), rest = refs[:count], refs[count:count + 3], refs[count + 3:]
    d_parts, (dres_ref, dscale_ref, dbias_ref) = rest[:count], rest[count:]
    scale = scale_ref[...][None, :]

    def example(e, carry):
        def block(p, row, out_row, n, carry):
            dscale, dbias = carry
            xhat, rstd, mask = _normalized(parts[p], res_ref, e, row, out_row, n, cfg)
            g = load_tile(g_ref, e, mask, out_row).astype(jnp.float32)
            dx = standardized_rows_grad(g * scale, xhat, rstd, mask, cfg.d).astype(dres_ref.dtype)
            store_tile(d_parts[p], e, dx, mask, row)
            store_tile(dres_ref, e, dx, mask, out_row)
            return dscale + jnp.sum(g * xhat, axis=0), dbias + jnp.sum(g, axis=0)

        return cfg.walk(block, carry)

    zeros = jnp.zeros((cfg.d_p,), jnp.float32)
    dscale, dbias = lax.fori_loop(0, cfg.block_b, example, (zeros, zeros))
    dscale_ref[...] = dscale
    dbias_ref[...] = dbias


def _specs(cfg: _Config):
    """(per-part specs, the residual's / output's spec, the [d_p] vectors' spec): BT examples per
    program at true sizes."""
    rows = sum(cfg.parts)
    parts = [pl.BlockSpec((cfg.block_b, n, cfg.d), lambda i: (i, 0, 0)) for n in cfg.parts]
    return parts, pl.BlockSpec((cfg.block_b, rows, cfg.d), lambda i: (i, 0, 0)), pl.BlockSpec((cfg.d_p,), lambda i: (0,))


def _call_forward(parts, res, scale, bias, cfg: _Config):
    part_specs, tensor, vector = _specs(cfg)
    b = res.shape[0]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=out_struct(res.shape, res.dtype, *parts, res, scale, bias),
        grid=(b // cfg.block_b,),
        in_specs=[*part_specs, tensor, vector, vector],
        out_specs=tensor,
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=10 * res.size, transcendentals=res.size // cfg.d,
                                      bytes_accessed=3 * res.size * res.dtype.itemsize),
        interpret=cfg.interpret,
        name="residual_layer_norm_fwd",
    )(*parts, res, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rln(parts, res, scale, bias, cfg: _Config):
    return _call_forward(parts, res, scale, bias, cfg)


def _rln_fwd(parts, res, scale, bias, cfg):
    return _call_forward(parts, res, scale, bias, cfg), (parts, res, scale)


def _rln_bwd(cfg: _Config, residuals, g):
    parts, res, scale = residuals
    part_specs, tensor, vector = _specs(cfg)
    programs = res.shape[0] // cfg.block_b
    inputs = (*parts, res, scale, g)
    partial = pl.BlockSpec((None, cfg.d_p), lambda i: (i, 0))
    partial_struct = out_struct((programs, cfg.d_p), jnp.float32, *inputs)
    *d_parts, d_res, dscale, dbias = pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg),
        out_shape=(*(out_struct(p.shape, p.dtype, *inputs) for p in parts), out_struct(res.shape, res.dtype, *inputs),
                   partial_struct, partial_struct),
        grid=(programs,),
        in_specs=[*part_specs, tensor, vector, tensor],
        out_specs=(*part_specs, tensor, partial, partial),
        compiler_params=pltr.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages),
        cost_estimate=pl.CostEstimate(flops=20 * res.size, transcendentals=res.size // cfg.d,
                                      bytes_accessed=5 * res.size * res.dtype.itemsize),
        interpret=cfg.interpret,
        name="residual_layer_norm_bwd",
    )(*inputs)
    return tuple(d_parts), d_res, dscale.sum(0).astype(scale.dtype), dbias.sum(0).astype(scale.dtype)


_rln.defvjp(_rln_fwd, _rln_bwd)


def pallas_residual_layer_norm(first, second, res, scale, bias, *, eps: float = 1e-5, block_b: int = 8,
                               interpret: bool = False) -> jax.Array:
    """The kernel path of `residual_layer_norm`: scale and bias padded to d_p (they are small), B
    padded to a whole number of programs only when it is not one already."""
    parts = (first,) if second is None else (first, second)
    b, rows, d = res.shape
    if sum(p.shape[1] for p in parts) != rows or any(p.shape[::2] != (b, d) for p in parts):
        raise ValueError(f"the parts {[p.shape for p in parts]} must stack along axis 1 to res {res.shape}")
    d_p = tile_dim(d)
    block_b = max(1, min(block_b, b))
    b_p = -(-b // block_b) * block_b
    cfg = _Config(parts=tuple(p.shape[1] for p in parts), d=d, d_p=d_p, eps=float(eps), block_b=block_b,
                  interpret=interpret)

    def pad(x):
        return x if b_p == b else jnp.pad(x, ((0, b_p - b), (0, 0), (0, 0)))

    vectors = (jnp.pad(t.astype(jnp.float32), (0, d_p - d)) for t in (scale, bias))
    out = _rln(tuple(pad(p) for p in parts), pad(res), *vectors, cfg)
    return out[:b]


def residual_layer_norm(first, second, res, scale, bias, *, eps: float = 1e-5, impl: str = "auto") -> jax.Array:
    """LayerNorm(concatenate([first, second], axis=1) + res) [B, n1 + n2, d] by `impl` (auto |
    pallas | xla, dispatch.py); second may be None (one part)."""
    kernel = functools.partial(pallas_residual_layer_norm, eps=eps)
    reference = functools.partial(reference_residual_layer_norm, eps=eps)
    batch = ("batch",)
    return dispatch(impl, kernel, reference, first, second, res, scale, bias,
                    names=(batch, batch if second is not None else None, batch, None, None), out_names=batch)
