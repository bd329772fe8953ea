"""The contract of next-item (sequential) model families: HSTU, SASRec, and those built on them.

A family is an `nnx.Module` registered with `register_model(name, ConfigClass)`:

    class HSTU(SequenceModel):
        def __init__(self, config: HSTUConfig, spec: SequenceSpec, *, rngs: nnx.Rngs): ...
        def __call__(self, batch) -> queries float [B, L, D]   # one next-item query per position
        def item_table(self) -> float [num_items + 1, D]       # what queries are scored against
        def item_embeddings(ids) -> float [..., D]            # its rows for ids (default: item_table()[ids])

The batch is `SequenceSpec`'s (items, timestamps, next_timestamps, lengths, users; models that
ignore time ignore the timestamps). The task calls two methods, whose defaults are the sequential
models' objective; a family with another objective overrides them:

    training_loss(batch, temperature) -> scalar   default: each valid position's query against its
                                                  target and sampled negatives, sampled softmax
                                                  (`scaling.train.sampled_softmax`)
    catalogue_scores(batch, temperature) -> [B, V + 1]   default: the query at position length - 1
                                                  dotted with the whole `item_table()`

The config's `TARGETS` picks the train batches: "next" (position t predicts event t + 1, the
sequential models) or "all" (every training event is a target of its user: BPR-MF, NeuMF,
LightGCN, BERT4Rec's Cloze objective).

The config (a `SequenceModelConfig`) defines `embed_dim` and `max_len` and exposes, without
building the model:
    encoder_flops(n) -> float                   forward FLOPs of the encoder over n positions
    flops_per_example(spec) -> float            encoder at max_len + scoring (1 + negatives) items
                                                at each of the max_len positions (2 D each)
    embedding_bytes_per_example(spec) -> float  float32 rows gathered: inputs, targets, negatives
An "example" is one training sequence (one user's most recent max_len + 1 events).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig
from scaling.data.spec import SequenceSpec
from scaling.sharding.embedding import tables_permuted
from scaling.train.sampled_softmax import sampled_scores, sampled_softmax_loss


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x [..., D] / max(||x||, eps); a zero row (padding) stays 0 with a finite (zero) gradient."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


class SequenceModelConfig(ModelConfig):
    """Shared by next-item family configs (which define `embed_dim`, `max_len`, `encoder_flops`)."""

    TASK = "next_item"
    TARGETS = "next"  # or "all": see the module docstring

    def encoder_flops(self, n: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def scoring_flops(self, spec: SequenceSpec) -> float:
        """Training-time scoring: each of max_len queries dotted with its target and the negatives."""
        return 2.0 * self.max_len * (1 + spec.num_negatives) * self.embed_dim

    def flops_per_example(self, spec: SequenceSpec) -> float:
        return float(self.encoder_flops(self.max_len) + self.scoring_flops(spec))

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        """float32 rows gathered per sequence: the inputs, the targets and the negatives (M per
        position, or M per sequence when shared)."""
        negatives = spec.num_negatives if spec.shared_negatives else self.max_len * spec.num_negatives
        return float((2 * self.max_len + negatives) * self.embed_dim * 4)


class SequenceModel(nnx.Module):
    """Base class of next-item families: batch -> queries [B, L, D]; `item_table()` [V + 1, D]."""

    TASK = "next_item"
    batch_keys: tuple[str, ...] = ("items", "timestamps", "next_timestamps", "lengths", "users")

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_table(self) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_embeddings(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> rows [..., D] of `item_table()`. Families override it to look the rows
        up first (through the table's sharded lookup) and transform only those."""
        return self.item_table()[ids]

    def scored_items(self, dtype=None) -> jax.Array | Callable[[jax.Array], jax.Array]:
        """Where sampled scores read item rows: the whole `item_table()` (transformed once per step,
        e.g. L2-normalised), or, when the placement stores tables permuted (row_wise, table_wise),
        `item_embeddings`: assembling the table in natural order would move all of it between
        devices every step, for the B x L x (1 + M) rows scored."""
        if tables_permuted():
            return self.item_embeddings if dtype is None else (lambda ids: self.item_embeddings(ids).astype(dtype))
        table = self.item_table()
        return table if dtype is None else table.astype(dtype)

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The dense math of a training step before the loss (what the FLOP count covers): the
        queries' dot products [B, L, 1 + M] with each position's target and negatives."""
        return sampled_scores(self(batch), self.scored_items(), batch["targets"], batch["negatives"])

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Sampled softmax of every valid position's query over its target and the negatives."""
        queries = self(batch).astype(jnp.float32)
        return sampled_softmax_loss(queries, self.scored_items(jnp.float32), batch["targets"], batch["negatives"],
                                    batch["lengths"], temperature)

    def catalogue_scores(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Scores [B, num_items + 1] of every item for the query at each sequence's last position."""
        queries = self(batch).astype(jnp.float32)
        last = jnp.take_along_axis(queries, jnp.maximum(batch["lengths"] - 1, 0)[:, None, None], axis=1)[:, 0]
        return last @ self.item_table().astype(jnp.float32).T / temperature
