"""What every ranking family reads from a ranking batch (`RankingSpec`), embedded once here.

    events      item_emb(history) + action_emb(history_actions)       [B, S, L, d]   (0 at padding)
    gaps        log1p(request_time - history_times) / log1p(1 year)   [B, S, L]      (0 at padding)
    candidate   item_emb(sparse[:, -1])                               [B, d]         (same table as events)
    features    concat(field embeddings of sparse[:, :-1], dense)     [B, (F-1) e + D]

The candidate shares the item table with the history, so a ranker can compare them directly (DIN's
target attention, HSTU's and OneTrans's attention); the other categorical fields have their own
stacked table of width e. `seq_len` > 0 keeps only the most recent seq_len events of each
sequence (the batch is right-aligned, so that is a slice), the models' sequence-length knob.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import ModelConfig
from scaling.data.spec import RankingSpec
from scaling.models.embedding import FieldEmbedding, embedding_table
from scaling.sharding.embedding import lookup

__all__ = ["RankingInputs", "RankingModelConfig", "GAP_FLOPS"]

_YEAR_LOG = math.log1p(365 * 86400.0)
GAP_FLOPS = 5  # per event: the difference, the clamp, log1p, the scale, the padding select


class RankingModelConfig(ModelConfig):
    """Base of ranking family configs (which define `embed_dim`, `field_dim` and `seq_len`)."""

    TASK: ClassVar[str] = "ranking"

    def events_read(self, spec: RankingSpec) -> int:
        """L: events the model reads per sequence."""
        return min(self.seq_len, spec.seq_len) if self.seq_len else spec.seq_len

    def embedding_bytes_per_example(self, spec: RankingSpec) -> float:
        """float32 rows gathered: 2 per event (item, action), the candidate, the other fields."""
        events = spec.num_sequences * self.events_read(spec)
        return float(4 * ((2 * events + 1) * self.embed_dim + (spec.num_sparse - 1) * self.field_dim))

    def feature_width(self, spec: RankingSpec) -> int:
        """Width of `RankingInputs.features`: (F - 1) field embeddings and the dense features."""
        return (spec.num_sparse - 1) * self.field_dim + spec.num_dense


class RankingInputs(nnx.Module):
    """The shared embeddings of a ranking family (module docstring)."""

    def __init__(self, spec: RankingSpec, dim: int, field_dim: int, seq_len: int = 0, *, rngs: nnx.Rngs):
        if not isinstance(spec, RankingSpec):
            raise TypeError(f"ranking families need a ranking data set (e.g. data.name: synthetic_ranking), got {spec}")
        self.seq_len = seq_len
        items = 0.02 * jax.random.normal(rngs.params(), (spec.num_items + 1, dim), jnp.float32)
        self.items = embedding_table(items.at[0].set(0.0))
        actions = 0.02 * jax.random.normal(rngs.params(), (spec.num_actions, dim), jnp.float32)
        self.actions = embedding_table(actions, (None, "embed"))
        self.fields = FieldEmbedding(spec.cardinalities[:-1], field_dim, rngs=rngs)

    def history(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """-> (events [B, S, L, d], gaps [B, S, L] (the events' dtype), times int32 [B, S, L], valid
        bool [B, S, L])."""
        items, actions, times = batch["history"], batch["history_actions"], batch["history_times"]
        if self.seq_len and self.seq_len < items.shape[-1]:
            items, actions, times = (a[..., -self.seq_len:] for a in (items, actions, times))
        valid = items > 0
        events = lookup(self.items, items) + lookup(self.actions, actions)
        events = jnp.where(valid[..., None], events, 0.0)
        age = jnp.maximum(batch["request_time"][:, None, None] - times, 0).astype(jnp.float32)
        # in float32, then the events' dtype: a float32 gap beside bf16 events would promote every
        # layer after their concatenation to float32
        gaps = jnp.where(valid, jnp.log1p(age) * (1.0 / _YEAR_LOG), 0.0).astype(events.dtype)
        return events, gaps, times, valid

    def candidate(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[B, d]: the candidate's item embedding."""
        return lookup(self.items, batch["sparse"][..., -1])

    def features(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[..., (F-1) e + D]: the non-sequential features besides the candidate, flat (leading
        axes as the batch's: [B] or [B, C] for C candidates per request)."""
        sparse = batch["sparse"][..., :-1]
        lead = sparse.shape[:-1]
        e = self.fields(sparse.reshape(-1, sparse.shape[-1])).reshape(*lead, -1)
        return jnp.concatenate([e, batch["dense"].astype(e.dtype)], axis=-1)

