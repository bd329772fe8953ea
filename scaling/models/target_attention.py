"""DIN's target attention (Zhou et al., KDD'18): pool a behaviour history by its relevance to the
candidate, shared by DIN and any ranker that wants a candidate-aware history summary.

For history embeddings h_j [d] (j valid) and the candidate's embedding t [d]:

    a_j = MLP([h_j, t, h_j - t, h_j * t])         (the "activation unit": hidden ReLU layers -> 1)
    u   = sum_j a_j h_j                           (DIN keeps the raw weights: no softmax, so the
                                                   pooled norm carries how much of the history is relevant)

`normalize=True` uses softmax_j(a_j) instead (attention-style weights that sum to 1).
FLOPs per example (forward): L x (MLP(4d -> hidden -> 1) + 2d for the difference and product)
plus 2 L d for the weighted sum, plus L for the padding select.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.models.mlp import MLP, mlp_flops
from scaling.models.transformer import MASKED_SCORE

__all__ = ["TargetAttention"]


class TargetAttention(nnx.Module):
    """(history [B, L, d], valid bool [B, L], target [B, d]) -> pooled [B, d]."""

    def __init__(self, dim: int, hidden: Sequence[int] = (80, 40), *, normalize: bool = False, rngs: nnx.Rngs):
        self.dim, self.hidden, self.normalize = dim, tuple(hidden), normalize
        self.unit = MLP(4 * dim, self.hidden, 1, rngs=rngs)

    def weights(self, history: jax.Array, valid: jax.Array, target: jax.Array) -> jax.Array:
        """The attention weight of each history position [B, L] (0 at padding)."""
        t = jnp.broadcast_to(target[:, None, :], history.shape)
        a = self.unit(jnp.concatenate([history, t, history - t, history * t], axis=-1))[..., 0]
        if self.normalize:
            a = jax.nn.softmax(jnp.where(valid, a, MASKED_SCORE), axis=-1)
        return jnp.where(valid, a, 0.0)

    def __call__(self, history: jax.Array, valid: jax.Array, target: jax.Array) -> jax.Array:
        return jnp.einsum("bl,bld->bd", self.weights(history, valid, target), history)

    @staticmethod
    def flops(length: int, dim: int, hidden: Sequence[int] = (80, 40)) -> float:
        """Forward FLOPs per example (module docstring; without `normalize`)."""
        return float(length * (mlp_flops(4 * dim, tuple(hidden), 1) + 2 * dim + 2 * dim + 1))
