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

    Multi-hot fields (`bags`, their cardinalities; e.g. a behaviour history) have row blocks after
    the single-hot ones: history int32 [B, S, L] (0 = padding) -> the mean of each bag's rows,
    appended as S more fields: [B, F + S, dim] (an empty bag gives 0).
    """

    def __init__(self, cardinalities: tuple[int, ...], dim: int, *, rngs: nnx.Rngs, init_scale: float | None = None,
                 bags: tuple[int, ...] = ()):
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.bags = tuple(int(c) for c in bags)
        self.dim = dim
        # Row offset of each field's block; a static tuple, so it is a compile-time constant.
        sizes = self.cardinalities + self.bags
        starts = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        self.offsets, self.bag_offsets = starts[: len(self.cardinalities)], starts[len(self.cardinalities):]
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        table = scale * jax.random.normal(rngs.params(), (int(sum(sizes)), dim), jnp.float32)
        self.table = logical_param(table, ("vocab", "embed"), EmbeddingTable)

    def __call__(self, sparse: jax.Array, history: jax.Array | None = None) -> jax.Array:
        rows = sparse + jnp.asarray(self.offsets, jnp.int32)[None, :]
        out = jnp.take(self.table[...], rows, axis=0)
        if not self.bags:
            return out
        if history is None:
            raise ValueError(f"this embedding has {len(self.bags)} multi-hot fields; the batch has no 'history'")
        valid = history > 0
        vectors = jnp.take(self.table[...], history + jnp.asarray(self.bag_offsets, jnp.int32)[None, :, None], axis=0)
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(vectors.dtype)
        pooled = jnp.where(valid[..., None], vectors, 0.0).sum(2) / count
        return jnp.concatenate([out, pooled], axis=1)
