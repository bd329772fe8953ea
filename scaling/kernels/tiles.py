"""Tile arithmetic every Pallas kernel here shares (Triton block structure: power-of-two tiles
>= 16, 2-D dots accumulated in fp32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

__all__ = ["TILE_FIELDS", "KernelTiles", "cdiv", "contract", "corner_mask", "dot", "heavy_first", "ieee_fp32_dots",
           "load_tile", "store_tile", "tile_dim"]

# An attention kernel's tiles, BQ x BK each: the forward's, dK/dV's (a held key block, query blocks
# streamed past it) and dQ's (a held query block, key blocks streamed)
TILE_FIELDS = ("block_q", "block_k", "dkdv_block_q", "dkdv_block_k", "dq_block_q", "dq_block_k")


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """The tile sizes (TILE_FIELDS: powers of two >= 16, None for the kernel's default) and Triton
    launch knobs an attention kernel's forward and backward take (hstu_attention.Blocks,
    flash_attention.FlashBlocks add their own defaults and knobs)."""

    block_q: int | None = None
    block_k: int | None = None
    dkdv_block_q: int | None = None
    dkdv_block_k: int | None = None
    dq_block_q: int | None = None
    dq_block_k: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in TILE_FIELDS:
            size = getattr(self, name)
            if size is not None and (size < 16 or size & (size - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")

    def filled(self, defaults: tuple[int, ...]) -> tuple[int, ...]:
        """The six tile sizes, each given one or else its entry of `defaults` (TILE_FIELDS order)."""
        return tuple(d if size is None else size for size, d in zip((getattr(self, n) for n in TILE_FIELDS), defaults))

    @classmethod
    def uniform(cls, size: int, **knobs):
        """Every tile size `size` (tests use small ones); knobs: the other fields."""
        return cls(*(size,) * len(TILE_FIELDS), **knobs)


def tile_dim(n: int) -> int:
    """The tile extent for a dimension of n: a power of two >= 16 (Triton's tl.dot minimum)."""
    return max(16, pl.next_power_of_2(n))


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size` (x itself when it is that long already)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def heavy_first(i, count):
    """The query block grid step i computes: the last first. Causal rows near the end see the most
    keys, so launching them first keeps the last wave of programs short."""
    return count - 1 - i


def cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a static one (lax.div: Triton-safe)."""
    return lax.div(a + (b - 1), b)


def ieee_fp32_dots() -> bool:
    """Whether float32 dots lower as IEEE fp32 (JAX's default matmul precision 'highest'), with no
    tensor-core path, rather than TF32 (`contract`): the kernels' tiles for that mode differ."""
    return str(jax.config.jax_default_matmul_precision) in ("highest", "float32")


def contract(a: jax.Array, b: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """2-D a and b contracted over a's axis axes[0] and b's axes[1], accumulated in fp32: the
    tensor cores' bf16 path for bf16 operands; fp32 operands follow JAX's default matmul precision
    as XLA's own fp32 matmuls on a GPU do (TF32 by default, IEEE fp32 under
    jax_default_matmul_precision=highest, which the tests set)."""
    return lax.dot_general(a, b, (((axes[0],), (axes[1],)), ((), ())), preferred_element_type=jnp.float32)


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """2-D a @ b (or a @ b^T), as `contract`."""
    return contract(a, b, (1, 1) if trans_b else (1, 0))


def corner_mask(rows: int, cols: int, true_rows, true_cols) -> jax.Array:
    """bool [rows, cols]: True inside the [true_rows, true_cols] corner (ints or traced scalars)."""
    shape = (rows, cols)
    rows_in = lax.broadcasted_iota(jnp.int32, shape, 0) < true_rows
    return rows_in & (lax.broadcasted_iota(jnp.int32, shape, 1) < true_cols)


def load_tile(ref, e, mask: jax.Array, row=0, col=0) -> jax.Array:
    """Example e's mask-shaped tile from a [BT, rows, cols] ref starting at (row, col), zero outside
    `mask`: arrays keep their true sizes in memory and tiles are read past their edges masked, so
    no padded copy of them is ever written."""
    return pltr.load(ref.at[e, pl.ds(row, mask.shape[0]), pl.ds(col, mask.shape[1])], mask=mask, other=0)


def store_tile(ref, e, value: jax.Array, mask: jax.Array, row=0, col=0) -> None:
    """`load_tile`'s store: value's entries inside `mask` to example e's tile at (row, col)."""
    pltr.store(ref.at[e, pl.ds(row, mask.shape[0]), pl.ds(col, mask.shape[1])], value, mask=mask)
