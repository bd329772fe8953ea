"""BPR matrix factorization (Rendle et al., UAI 2009) as a trained family "bpr_mf".

    score(u, i) = p_u . q_i   (+ b_i when item_bias)
    loss = mean over (u, i+, i-) of -log sigmoid(score(u, i+) - score(u, i-))
           + l2 * mean over the batch of (||p_u||^2 + ||q_i+||^2 + mean_m ||q_i-||^2)

Each train row is one user's most recent `max_len` training events, every one a positive
(`TARGETS = "all"`), each with the data set's sampled negatives (uniform over the catalogue; one
draw per row when shared_negatives). Evaluation scores the whole catalogue with the user's
factors, which saw only training events (MF cannot read the validation item without refitting;
the neighbourhood methods and ALS fold-in can).

Size knob: the rank (`embed_dim`); presets d8 ... d256. FLOPs per example (one train row): the
scores, (2 (D + 1) + 3) (1 + M) per position (see `scoring_flops`); the sigmoid-loss pointwise
work is left out and gathers are not counted, as everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import SequenceSpec
from scaling.models.embedding import embedding_table
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig
from scaling.sharding.embedding import lookup, natural_table
from scaling.train.pairwise_losses import bpr_loss
from scaling.train.sampled_softmax import sampled_scores

_SIZES: dict[str, dict[str, Any]] = {f"d{d}": dict(embed_dim=d) for d in (8, 16, 32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class BPRMFConfig(SequenceModelConfig):
    """BPR-MF hyperparameters; `size` names a rank preset (d8 ... d256)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES
    NEEDS_LOADED_DATA: ClassVar[bool] = True  # one embedding row per user of the data
    TARGETS: ClassVar[str] = "all"

    name: Literal["bpr_mf"] = knob("bpr_mf")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(64, ge=1, help="rank of the user and item factors")
    max_len: int = knob(50, ge=1, help="most recent training events of a user per train row")
    l2: float = knob(1e-4, ge=0.0, help="L2 penalty on the factors a step touches")
    item_bias: bool = knob(True, help="a learned per-item bias b_i (popularity)")
    init_scale: float = knob(0.1, gt=0.0, help="factors start as N(0, init_scale^2)")

    def encoder_flops(self, n: int) -> float:
        return 0.0  # the query is a gathered user factor

    def scoring_flops(self, spec: SequenceSpec) -> float:
        """2 (D + bias) per score, plus the 3 per score XLA counts around the sampled scores (it
        matters here, where there is no encoder: 14% of the total at D = 8)."""
        return self.max_len * (1 + spec.num_negatives) * (2.0 * (self.embed_dim + int(self.item_bias)) + 3.0)


@register_model("bpr_mf", BPRMFConfig)
class BPRMF(SequenceModel):
    """User factors [U, D], item factors [V + 1, D] (row 0 padding) and item biases."""

    batch_keys = ("items", "lengths", "users")

    def __init__(self, config: BPRMFConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, s = config.embed_dim, config.init_scale
        # one row when the user count is unknown (FLOP counts from a data config alone)
        users = s * jax.random.normal(rngs.params(), (max(spec.num_users, 1), d), jnp.float32)
        items = s * jax.random.normal(rngs.params(), (spec.num_items + 1, d), jnp.float32)
        self.user_emb = embedding_table(users)
        self.item_emb = embedding_table(items.at[0].set(0.0))
        self.item_b = embedding_table(jnp.zeros((spec.num_items + 1, 1), jnp.float32), ("vocab", None))

    def _augment(self, users: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(queries [B, D'], item table [V + 1, D']): a trailing 1 / bias column adds b_i to the dot."""
        p, q = lookup(self.user_emb, users), natural_table(self.item_emb)  # the items: a full-table read
        if self.config.item_bias:
            p = jnp.concatenate([p, jnp.ones_like(p[:, :1])], axis=-1)
            q = jnp.concatenate([q, natural_table(self.item_b)], axis=-1)
        return p, q

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The user's factors at every position [B, L, D] (MF ignores order)."""
        p = lookup(self.user_emb, batch["users"])
        return jnp.broadcast_to(p[:, None, :], (*batch["items"].shape, p.shape[-1]))

    def item_table(self) -> jax.Array:
        return natural_table(self.item_emb)

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Scores [B, L, 1 + M] of each position's target and negatives (bias included)."""
        p, q = self._augment(batch["users"])
        queries = jnp.broadcast_to(p[:, None, :], (*batch["targets"].shape, p.shape[-1]))
        return sampled_scores(queries, q, batch["targets"], batch["negatives"])

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        p, q = self._augment(batch["users"])
        targets, negatives = batch["targets"], batch["negatives"]
        loss = bpr_loss(self.training_forward(batch), targets, negatives, batch["lengths"])
        if self.config.l2:
            valid = (jnp.arange(targets.shape[1])[None] < batch["lengths"][:, None]).astype(jnp.float32)
            d = self.config.embed_dim
            pos = jnp.sum(jnp.square(q[targets][..., :d]), -1)
            neg = jnp.mean(jnp.sum(jnp.square(q[negatives][..., :d]), -1), -1)
            per_position = jnp.sum(jnp.square(p[:, :d]), -1)[:, None] + pos + neg
            loss = loss + self.config.l2 * jnp.sum(per_position * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return loss

    def catalogue_scores(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        p, q = self._augment(batch["users"])
        return p @ q.T
