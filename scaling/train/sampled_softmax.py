"""Sampled softmax for next-item training, as HSTU's research code trains (and SASRec with it).

At every valid position the query q [D] scores its target item and M negatives drawn uniformly
from the catalogue (per position, no logQ correction); logits are dot products of the
L2-normalised query and item embeddings divided by the temperature; a negative that happens to
equal the target (an accidental hit) gets logit -5e4; the loss is -log_softmax([pos, negs])[0],
averaged over valid positions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ACCIDENTAL_HIT_LOGIT = -5e4


ItemRows = jax.Array | Callable[[jax.Array], jax.Array]


def _rows_of(items: ItemRows) -> Callable[[jax.Array], jax.Array]:
    return items if callable(items) else (lambda ids: items[ids])


def sampled_scores(queries: jax.Array, items: ItemRows, targets: jax.Array, negatives: jax.Array) -> jax.Array:
    """Dot products [B, L, 1 + M] of each query with its target (column 0) and its negatives.

    queries [B, L, D]; items: the item table [num_items + 1, D], or a function ids [...] -> rows
    [..., D] (a model's `item_embeddings`: only the rows scored are gathered, through the table's
    sharded lookup, and the table is never assembled whole); targets [B, L], negatives [B, L, M]
    or [B, 1, M] (the same negatives at every position of a sequence: one [L, D] x [D, M] matmul)."""
    rows = _rows_of(items)
    pos = jnp.einsum("bld,bld->bl", queries, rows(targets))
    if negatives.shape[1] == 1 and targets.shape[1] != 1:
        neg = jnp.einsum("bld,bmd->blm", queries, rows(negatives[:, 0]))
    else:
        neg = jnp.einsum("bld,blmd->blm", queries, rows(negatives))
    return jnp.concatenate([pos[..., None], neg], axis=-1)


def sampled_softmax_loss(queries: jax.Array, items: ItemRows, targets: jax.Array, negatives: jax.Array,
                         lengths: jax.Array, temperature: float = 0.05) -> jax.Array:
    """queries [B, L, D], items (as `sampled_scores`), targets [B, L], negatives [B, L, M] (or
    [B, 1, M]: the same negatives at every position of a sequence), lengths [B] -> scalar mean loss
    over positions < length."""
    logits = sampled_scores(queries, items, targets, negatives) / temperature
    hit = jnp.concatenate([jnp.zeros_like(targets, bool)[..., None], negatives == targets[..., None]], axis=-1)
    logits = jnp.where(hit, ACCIDENTAL_HIT_LOGIT, logits)
    nll = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
    valid = jnp.arange(targets.shape[1])[None, :] < lengths[:, None]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
