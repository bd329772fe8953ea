"""Embedding tables: a variable type of their own, so optimizers and layouts can tell them apart.

A table that models read by id is made with `embedding_table`, which lays it out for the active
embedding placement (`scaling.sharding.embedding`: replicated, row_wise, table_wise, gspmd) and
records the layout in its metadata; models read it with `lookup` / `lookup_fields` /
`lookup_bags` (and `natural_table` for the whole table in natural order), never by indexing the
stored array, whose row order depends on the placement.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.sharding.annotate import logical_param
from scaling.sharding.embedding import LAYOUT_KEY, lookup_bags, lookup_fields, place_table


class EmbeddingTable(nnx.Param):
    """An embedding table [rows, dim]. Trained by the embedding optimizer (row-wise Adagrad ...)."""


def embedding_table(natural: jax.Array, axes: Sequence[str | None] = ("vocab", "embed"), *,
                    blocks: Sequence[int] = (), singles: int | None = None) -> EmbeddingTable:
    """natural [V, D] -> an EmbeddingTable holding it in the active placement's stored layout (the
    same values under every placement). blocks/singles: a field table's per-field rows and how
    many of them are single-hot (`scaling.sharding.embedding.new_layout`)."""
    stored, layout = place_table(natural, blocks=blocks, singles=singles)
    return logical_param(stored, axes, EmbeddingTable, metadata={LAYOUT_KEY: layout})


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
        # One table per field for table_wise; the stored layout depends on the active placement.
        self.table = embedding_table(table, blocks=sizes, singles=len(self.cardinalities))

    def __call__(self, sparse: jax.Array, history: jax.Array | None = None) -> jax.Array:
        out = lookup_fields(self.table, sparse)
        if not self.bags:
            return out
        if history is None:
            raise ValueError(f"this embedding has {len(self.bags)} multi-hot fields; the batch has no 'history'")
        return jnp.concatenate([out, lookup_bags(self.table, history).astype(out.dtype)], axis=1)
