"""OneTrans's unified tokenizer: behaviour sequences -> S-tokens, non-sequential features -> NS-tokens.

S-tokens. Each of the n behaviour sequences S_i = [e_i1 .. e_iL_i] (an event's features, e.g. its
item and action embeddings concatenated) is projected to width d by a sequence-specific,
position-shared MLP_i, plus a learned sequence-type embedding. The sequences are then merged into
one token stream by one of two rules:
  - timestamp-aware (the paper's default): every event of every sequence, ordered by time;
  - with separators: the sequences one after another in a given order (the paper orders them by
    behaviour impact, purchase > cart > click), a learned [SEP] token after each.
Either way the stream is RIGHT-aligned, as the OneTrans stack expects (scaling/models/onetrans_block.py):
padding first, the most recent (or last-ordered) token at position L-1. Both merges are a stable
sort of the concatenated tokens on a key that puts padding first, then a gather: no Python loops
over examples, static shapes.

NS-tokens (auto-split, the paper's default): one MLP over the concatenation of all non-sequential
features, its output split into N tokens of width d: split(MLP(concat(NS)), N).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.models.mlp import MLP, mlp_flops
from scaling.sharding.annotate import logical_param

__all__ = ["NSTokenizer", "SequenceTokenizer", "merge_by_time", "merge_with_separators", "right_align"]

# Sorts before every real timestamp (int32 seconds): where padding goes.
_PAD_KEY = jnp.iinfo(jnp.int32).min


def right_align(tokens: jax.Array, valid: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reorder tokens [B, L, d] by `key` [B, L] ascending with padding first (a stable sort), so
    the valid tokens end up at the end in key order. Returns (tokens [B, L, d], valid [B, L])."""
    order = jnp.argsort(jnp.where(valid, key, _PAD_KEY), axis=1, stable=True)
    return jnp.take_along_axis(tokens, order[..., None], axis=1), jnp.take_along_axis(valid, order, axis=1)


def merge_by_time(tokens: Sequence[jax.Array], timestamps: Sequence[jax.Array], valid: Sequence[jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
    """Timestamp-aware merge: tokens_i [B, L_i, d], timestamps_i int32 [B, L_i], valid_i bool
    [B, L_i] -> (merged [B, sum L_i, d], valid [B, sum L_i]), events ordered by time (ties keep
    sequence order), right-aligned."""
    return right_align(jnp.concatenate(tokens, axis=1), jnp.concatenate(valid, axis=1),
                       jnp.concatenate(timestamps, axis=1).astype(jnp.int32))


def merge_with_separators(tokens: Sequence[jax.Array], valid: Sequence[jax.Array], separators: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
    """Timestamp-agnostic merge: sequence 0, [SEP_0], sequence 1, [SEP_1], ... (each sequence's
    valid events in their own order), right-aligned. tokens_i [B, L_i, d], valid_i [B, L_i],
    separators [n, d] -> (merged [B, sum L_i + n, d], valid)."""
    batch = tokens[0].shape[0]
    parts, masks = [], []
    for i, (t, v) in enumerate(zip(tokens, valid)):
        parts += [t, jnp.broadcast_to(separators[i], (batch, 1, t.shape[-1])).astype(t.dtype)]
        masks += [v, jnp.ones((batch, 1), jnp.bool_)]
    merged, ok = jnp.concatenate(parts, axis=1), jnp.concatenate(masks, axis=1)
    position = jnp.broadcast_to(jnp.arange(merged.shape[1], dtype=jnp.int32), ok.shape)
    return right_align(merged, ok, position)


class SequenceTokenizer(nnx.Module):
    """n sequence-specific, position-shared MLPs: event features [B, L_i, f_i] -> [B, L_i, d], plus a
    learned type embedding per sequence; padded events -> 0."""

    def __init__(self, in_features: Sequence[int], dim: int, hidden: Sequence[int] = (), *, rngs: nnx.Rngs):
        self.mlps = nnx.List([MLP(f, tuple(hidden), dim, rngs=rngs) for f in in_features])
        self.type_emb = logical_param(0.02 * jax.random.normal(rngs.params(), (len(in_features), dim)),
                                      (None, "embed"))

    def __call__(self, events: Sequence[jax.Array], valid: Sequence[jax.Array]) -> list[jax.Array]:
        return [jnp.where(v[..., None], mlp(e) + self.type_emb[i], 0.0)
                for i, (mlp, e, v) in enumerate(zip(self.mlps, events, valid))]

    @staticmethod
    def flops(in_features: Sequence[int], lengths: Sequence[int], dim: int, hidden: Sequence[int] = ()) -> float:
        """Forward FLOPs for one example: each event through its sequence's MLP, the type add and
        the padding select."""
        return float(sum(n * (mlp_flops(f, tuple(hidden), dim) + 2 * dim) for f, n in zip(in_features, lengths)))


class NSTokenizer(nnx.Module):
    """Auto-split: features [B, F] -> MLP -> [B, N * d] -> N tokens [B, N, d]."""

    def __init__(self, in_features: int, num_tokens: int, dim: int, hidden: Sequence[int] = (), *, rngs: nnx.Rngs):
        self.num_tokens, self.dim = num_tokens, dim
        self.mlp = MLP(in_features, tuple(hidden), num_tokens * dim, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.mlp(features).reshape(features.shape[0], self.num_tokens, self.dim)

    @staticmethod
    def flops(in_features: int, num_tokens: int, dim: int, hidden: Sequence[int] = ()) -> float:
        return float(mlp_flops(in_features, tuple(hidden), num_tokens * dim))
