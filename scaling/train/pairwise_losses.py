"""Sampled objectives of the user-item baselines, over `sampled_scores` [B, L, 1 + M] (column 0 the
target, then M negatives), masked to the valid positions (< lengths).

    bpr_loss:  mean over valid (position, negative) of -log sigmoid(s_pos - s_neg)   (Rendle et al. 2009)
    bce_loss:  mean over valid positions of -log sigmoid(s_pos) - sum_m log sigmoid(-s_neg_m)
               (NCF's pointwise log loss with M sampled negatives per positive; He et al. 2017)

A negative that equals its target (an accidental hit) is left out of both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masks(scores: jax.Array, targets: jax.Array, negatives: jax.Array, lengths: jax.Array):
    valid = jnp.arange(targets.shape[1])[None, :] < lengths[:, None]  # [B, L]
    keep = negatives != targets[..., None]  # [B, L, M] ([B, 1, M] negatives broadcast)
    keep = jnp.broadcast_to(keep, scores[..., 1:].shape) & valid[..., None]
    return valid, keep


def bpr_loss(scores: jax.Array, targets: jax.Array, negatives: jax.Array, lengths: jax.Array) -> jax.Array:
    """scores [B, L, 1 + M], targets [B, L], negatives [B, L, M] or [B, 1, M], lengths [B] -> scalar."""
    _, keep = _masks(scores, targets, negatives, lengths)
    pairwise = jax.nn.softplus(scores[..., 1:] - scores[..., :1])  # -log sigmoid(pos - neg)
    return jnp.sum(jnp.where(keep, pairwise, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def bce_loss(scores: jax.Array, targets: jax.Array, negatives: jax.Array, lengths: jax.Array) -> jax.Array:
    """scores [B, L, 1 + M] (logits), targets [B, L], negatives, lengths [B] -> scalar per positive."""
    valid, keep = _masks(scores, targets, negatives, lengths)
    positive = jax.nn.softplus(-scores[..., 0])
    negative = jnp.sum(jnp.where(keep, jax.nn.softplus(scores[..., 1:]), 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, positive + negative, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
