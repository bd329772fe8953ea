"""LightGCN (He et al., SIGIR 2020) as a trained family "lightgcn".

Graph: the bipartite user-item graph of the training events (`spec.training_events`: distinct
(user, item) pairs; repeat counts are ignored, the paper's R is binary), no self loops. With
d_u, d_i the degrees in that graph, every edge (u, i) carries w_ui = 1 / sqrt(d_u d_i), the entry
of Â = D^{-1/2} A D^{-1/2}. Propagation, K = num_layers times from the layer-0 embeddings E^(0):

    e_u^(k+1) = sum_{i in N(u)} w_ui e_i^(k)        e_i^(k+1) = sum_{u in N(i)} w_ui e_u^(k)

i.e. E^(k+1) = Â E^(k), computed with sparse ops only (a gather of the edge sources, a scale by
w, and `jax.ops.segment_sum` into the destinations; no dense adjacency). Final embeddings are the
layer mean e = (1 / (K + 1)) sum_{k=0..K} e^(k), and score(u, i) = e_u . e_i.

Loss (BPR, as the paper): over each valid position's positive i+ and the batch's sampled
negatives i- (`bpr_loss`: mean of -log sigmoid(s(u, i+) - s(u, i-))), plus
    l2 * mean over valid positions of 1/2 (||e_u^(0)||^2 + ||e_i+^(0)||^2 + mean_m ||e_i-^(0)||^2)
on the layer-0 rows the step touches (the paper's code; l2 = 1e-4 its default). The paper
samples one negative per positive: data.num_negatives = 1.

Every train step propagates the whole graph, as the paper does; so does every evaluation batch.
The edge list is a constant of the model (numpy arrays in a frozen `BipartiteGraph` held as a
plain attribute, i.e. part of NNX's static graph definition, never a trained or carried state).
Without training events (a spec built from a data config alone, for FLOP reports) the graph is
empty, with one dummy user: the model builds and scores with its layer-0 embeddings.

FLOPs per example (one train row): the step's propagation shared by the rows of its batch,
    (K x 2 directions x E edges x 2 D (scale + add) + (K + 1) (U + V + 1) D (layer mean)) / B_ref,
plus scoring 2 D (1 + M) per position. B_ref is the knob `flops_batch_size`: set it to the run's
train.batch_size (the config cannot see it). The training loop's XLA figure is taken at batch 8,
so for LightGCN it reads higher than the analytic one unless flops_batch_size is 8.

Size knob: presets d{D}_k{K} over embed_dim D in 8 ... 256 and num_layers K in 1 ... 4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import SequenceSpec
from scaling.models.baselines.neumf import candidates, embedding_tables, rows
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig
from scaling.train.pairwise_losses import bpr_loss

__all__ = ["LightGCNConfig", "LightGCN", "BipartiteGraph"]

_SIZES: dict[str, dict[str, Any]] = {
    f"d{d}_k{k}": dict(embed_dim=d, num_layers=k) for d in (8, 16, 32, 64, 128, 256) for k in (1, 2, 3, 4)
}


@dataclasses.dataclass(frozen=True, eq=False)
class BipartiteGraph:
    """The normalised user-item edge list, constants of the model (hashed by identity, so NNX keeps
    it in the static graph definition).

    users int32 [E] (0..num_users-1, sorted), items int32 [E] (1..num_items), weights float32 [E]
    = 1 / sqrt(d_u d_i)."""

    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    num_users: int
    num_items: int

    @classmethod
    def from_spec(cls, spec: SequenceSpec) -> BipartiteGraph:
        """The graph of spec.training_events (empty, with one user, when there are none)."""
        num_users, events = max(spec.num_users, 1), spec.training_events
        if events is None:
            empty = np.zeros(0, np.int32)
            return cls(empty, empty, np.zeros(0, np.float32), num_users, spec.num_items)
        pairs = np.unique(events.users.astype(np.int64) * (spec.num_items + 1) + events.items)  # distinct, sorted
        users, items = pairs // (spec.num_items + 1), pairs % (spec.num_items + 1)
        d_u = np.bincount(users, minlength=num_users)
        d_i = np.bincount(items, minlength=spec.num_items + 1)
        weights = 1.0 / np.sqrt(d_u[users].astype(np.float64) * d_i[items])
        return cls(users.astype(np.int32), items.astype(np.int32), weights.astype(np.float32), num_users, spec.num_items)

    @property
    def num_edges(self) -> int:
        return int(self.users.shape[0])

    def propagate(self, users: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step E^(k+1) = Â E^(k): users [U, D], items [V + 1, D] -> the same shapes."""
        u, i = jnp.asarray(self.users), jnp.asarray(self.items)
        w = jnp.asarray(self.weights, users.dtype)[:, None]
        to_users = jax.ops.segment_sum(w * rows(items, i), u, num_segments=self.num_users,
                                       indices_are_sorted=True)
        to_items = jax.ops.segment_sum(w * rows(users, u), i, num_segments=self.num_items + 1)
        return to_users, to_items


@dataclasses.dataclass(frozen=True)
class LightGCNConfig(SequenceModelConfig):
    """LightGCN hyperparameters; `size` names a (dim, layers) preset d8_k1 ... d256_k4."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES
    TARGETS: ClassVar[str] = "all"
    NEEDS_LOADED_DATA: ClassVar[bool] = True  # user table and propagation FLOPs depend on the graph

    name: Literal["lightgcn"] = knob("lightgcn")
    size: str = knob("custom", help=f"preset name (d8_k1 ... d256_k4, {len(_SIZES)} in all) or 'custom' (no preset)")
    embed_dim: int = knob(64, ge=1, help="D: width of the user and item embeddings")
    num_layers: int = knob(3, ge=0, help="K: propagation layers (the final embedding averages layers 0..K)")
    l2: float = knob(1e-4, ge=0.0, help="L2 penalty on the layer-0 rows a step touches (the paper's 1e-4)")
    max_len: int = knob(50, ge=1, help="most recent training events of a user per train row")
    init_scale: float = knob(0.1, gt=0.0, help="layer-0 embeddings start as N(0, init_scale^2)")
    flops_batch_size: int = knob(128, ge=1, help="train rows sharing one step's propagation, for FLOPs "
                                 "per example only: set it to train.batch_size")

    def encoder_flops(self, n: int) -> float:
        return 0.0  # the query is a row of the propagated table (counted in propagation_flops)

    def propagation_flops(self, spec: SequenceSpec) -> float:
        """Forward FLOPs of one whole-graph propagation and layer mean (once per step)."""
        edges = BipartiteGraph.from_spec(spec).num_edges
        nodes = max(spec.num_users, 1) + spec.num_items + 1
        d, k = self.embed_dim, self.num_layers
        return 2.0 * k * edges * 2 * d + (k + 1.0) * nodes * d

    def flops_per_example(self, spec: SequenceSpec) -> float:
        return self.propagation_flops(spec) / self.flops_batch_size + self.scoring_flops(spec)

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        """float32 rows gathered per train row: the user, the L targets and the negatives, plus the
        row's share (1 / flops_batch_size) of the propagation's 2 K E edge-source gathers."""
        negatives = spec.num_negatives if spec.shared_negatives else self.max_len * spec.num_negatives
        edges = BipartiteGraph.from_spec(spec).num_edges
        rows = 1 + self.max_len + negatives + 2 * self.num_layers * edges / self.flops_batch_size
        return float(rows * self.embed_dim * 4)


@register_model("lightgcn", LightGCNConfig)
class LightGCN(SequenceModel):
    """Layer-0 user embeddings [U, D] and item embeddings [V + 1, D] (row 0 padding, no edges),
    propagated over the training graph."""

    batch_keys = ("items", "lengths", "users")

    def __init__(self, config: LightGCNConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.graph = BipartiteGraph.from_spec(spec)  # static: a plain attribute, not nnx state
        d = config.embed_dim
        tables = embedding_tables(rngs, config.init_scale, {
            "user_emb": (self.graph.num_users, d), "item_emb": (spec.num_items + 1, d)}, padded=("item_emb",))
        self.user_emb, self.item_emb = tables["user_emb"], tables["item_emb"]

    def propagate(self) -> tuple[jax.Array, jax.Array]:
        """Final embeddings, the mean of layers 0..K: (users [U, D], items [V + 1, D])."""
        users, items = self.user_emb[...], self.item_emb[...]
        sum_u, sum_i = users, items
        for _ in range(self.config.num_layers):
            users, items = self.graph.propagate(users, items)
            sum_u, sum_i = sum_u + users, sum_i + items
        scale = 1.0 / (self.config.num_layers + 1)
        return sum_u * scale, sum_i * scale

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The user's final embedding at every position [B, L, D] (order is ignored)."""
        e_u = rows(self.propagate()[0], batch["users"])
        return jnp.broadcast_to(e_u[:, None, :], (*batch["items"].shape, e_u.shape[-1]))

    def item_table(self) -> jax.Array:
        """The final item embeddings [V + 1, D]."""
        return self.propagate()[1]

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """One whole-graph propagation, then scores [B, L, 1 + M] of each position's target and negatives."""
        users, items = self.propagate()
        e_u = rows(users, batch["users"])  # [B, D]: the same query at every position
        return jnp.einsum("bd,blnd->bln", e_u, rows(items, candidates(batch["targets"], batch["negatives"])))

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """BPR over the positives and sampled negatives + the L2 term (temperature unused)."""
        targets, negatives, lengths = batch["targets"], batch["negatives"], batch["lengths"]
        loss = bpr_loss(self.training_forward(batch).astype(jnp.float32), targets, negatives, lengths)
        if self.config.l2:
            sq = lambda table, ids: jnp.sum(jnp.square(rows(table, ids).astype(jnp.float32)), -1)  # noqa: E731
            valid = (jnp.arange(targets.shape[1])[None] < lengths[:, None]).astype(jnp.float32)
            items = self.item_emb[...]
            per_position = (sq(self.user_emb[...], batch["users"])[:, None] + sq(items, targets)
                            + jnp.mean(sq(items, negatives), -1))
            loss = loss + self.config.l2 * 0.5 * jnp.sum(per_position * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return loss

    def catalogue_scores(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Scores [B, V + 1] of every item for each user in batch["users"] [B] (one propagation)."""
        users, items = self.propagate()
        return rows(users, batch["users"]) @ items.T
