"""Embedding tables: a variable type of their own, so optimizers and layouts can tell them apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.sharding.annotate import logical_param


class EmbeddingTable(nnx.Param):
    """An embedding table [rows, dim]. Trained by the embedding optimizer (row-wise Adagrad ...)."""


class FieldEmbedding(nnx.Module):
    """All categorical fields in one stacked table, one row block per field.

    sparse int32 [B, F] (per-field ids) -> float [B, F, dim]. One gather for all fields; the
    stacked layout is what row-wise sharding splits.
    """

    def __init__(self, cardinalities: tuple[int, ...], dim: int, *, rngs: nnx.Rngs, init_scale: float | None = None):
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.dim = dim
        # Row offset of each field's block; a static tuple, so it is a compile-time constant.
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]))
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        table = scale * jax.random.normal(rngs.params(), (int(sum(self.cardinalities)), dim), jnp.float32)
        self.table = logical_param(table, ("vocab", "embed"), EmbeddingTable)

    def __call__(self, sparse: jax.Array) -> jax.Array:
        rows = sparse + jnp.asarray(self.offsets, jnp.int32)[None, :]
        return jnp.take(self.table[...], rows, axis=0)
