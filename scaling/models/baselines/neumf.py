"""NeuMF, neural matrix factorization (He et al., WWW 2017, "Neural Collaborative Filtering"), as a
trained family "neumf".

Two paths with separate embeddings, fused by one linear head:

    gmf(u, i) = p_u^G ⊙ q_i^G                                   [D]   (D = embed_dim)
    mlp(u, i) = relu(W_n ... relu(W_1 [p_u^M ; q_i^M] + b_1) ... + b_n)   (D_M = mlp_layers[0] / 2
                                                                  per side; widths mlp_layers[1:])
    logit(u, i) = h_G . gmf(u, i) + h_M . mlp(u, i) + b         (h^T [gmf ; mlp], the fused head)

`mlp_layers` follows the NCF code: its first entry is the width of the concatenated MLP embeddings,
the rest are the ReLU tower (halving widths, e.g. (64, 32, 16): embeddings 32 + 32 -> 32 -> 16).
The MLP path and h_M, b are `scaling.models.mlp.MLP(mlp_layers[0], mlp_layers[1:], 1)` (its output
Linear is the head's MLP half), h_G a bias-free Linear(D, 1).

Training is NCF's pointwise log loss with sampled negatives (`bce_loss`): each train row is one
user's most recent `max_len` training events, all positives (`TARGETS = "all"`), each with the data
set's `num_negatives` uniform negatives (NCF uses 4 per positive):
    loss = mean over valid positions of -log sigmoid(logit(u, i+)) - sum_m log sigmoid(-logit(u, i_m)).

Evaluation scores every item for each eval user, [B, V + 1], without materialising B x V
concatenations: the GMF part is one matmul (p_u^G ⊙ h_G) Q^G^T, and the first MLP layer splits,
W_1 [p ; q] = W_1^user p + W_1^item q, so the user half is computed once per user and the item
half once per item; only the layers after the first run over the B x (V + 1) pairs. Memory: the
first hidden activation is B (V + 1) mlp_layers[1] floats (eval batch 512 x 12k items x 32 wide is
0.8 GB in float32); no chunking over items is done, so keep eval_batch_size modest for big
catalogues or wide towers.

Size knob: `size` presets d8 ... d128: embed_dim d with the tower (4d, 2d, d) (NCF's pairing of 8
predictive factors with layers [32, 16, 8]). FLOPs per example (one train row): max_len x (1 + M)
candidate pairs, each through the GMF product (D) and its head (2 D), the MLP path and its output
(`mlp_flops`), and the add of the two halves (1); gathers are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import ConfigError, knob
from scaling.data.spec import SequenceSpec
from scaling.models.embedding import EmbeddingTable
from scaling.models.mlp import MLP, Linear, check_widths, mlp_flops
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig
from scaling.sharding.annotate import logical_param
from scaling.train.pairwise_losses import bce_loss

__all__ = ["NeuMFConfig", "NeuMF", "candidates", "rows", "embedding_tables"]

_SIZES: dict[str, dict[str, Any]] = {
    f"d{d}": dict(embed_dim=d, mlp_layers=(4 * d, 2 * d, d)) for d in (8, 16, 32, 64, 128)
}


@dataclasses.dataclass(frozen=True)
class NeuMFConfig(SequenceModelConfig):
    """NeuMF hyperparameters; `size` names a preset (d8 ... d128: GMF dim d, tower (4d, 2d, d))."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES
    NEEDS_LOADED_DATA: ClassVar[bool] = True  # one embedding row per user of the data
    TARGETS: ClassVar[str] = "all"

    name: Literal["neumf"] = knob("neumf")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(16, ge=1, help="D: width of the GMF user and item embeddings")
    mlp_layers: tuple[int, ...] = knob((64, 32, 16), help="MLP path: concat width (2 x MLP embedding), then ReLU widths")
    max_len: int = knob(50, ge=1, help="most recent training events of a user per train row")
    init_scale: float = knob(0.01, gt=0.0, help="embeddings start as N(0, init_scale^2) (NCF: 0.01)")

    def check(self) -> None:
        check_widths("mlp_layers", self.mlp_layers)
        if not self.mlp_layers or self.mlp_layers[0] % 2:
            raise ConfigError("mlp_layers", f"expected an even first width (user half + item half), got {self.mlp_layers!r}")

    @property
    def mlp_embed_dim(self) -> int:
        """D_M: width of each side's MLP embedding (half the first MLP width)."""
        return self.mlp_layers[0] // 2

    def pair_flops(self) -> float:
        """Forward FLOPs of one (user, item) logit: GMF product D + head 2 D, MLP path, final add."""
        return 3.0 * self.embed_dim + mlp_flops(self.mlp_layers[0], self.mlp_layers[1:], 1) + 1.0

    def encoder_flops(self, n: int) -> float:
        return 0.0  # no sequence encoder: the user side is a gathered embedding

    def scoring_flops(self, spec: SequenceSpec) -> float:
        return self.max_len * (1 + spec.num_negatives) * self.pair_flops()

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        """float32 rows gathered per train row: the user, the L targets and the negatives, each a
        GMF row and an MLP row."""
        negatives = spec.num_negatives if spec.shared_negatives else self.max_len * spec.num_negatives
        return float((1 + self.max_len + negatives) * (self.embed_dim + self.mlp_embed_dim) * 4)


@functools.partial(jax.jit, static_argnames=("shapes", "padded"))
def _normal_tables(key: jax.Array, scale: float, shapes: tuple[tuple[int, int], ...],
                   padded: tuple[bool, ...]) -> tuple[jax.Array, ...]:
    # one flat draw: a threefry kernel per table would dominate a small model's build time
    flat = scale * jax.random.normal(key, (sum(n * d for n, d in shapes),), jnp.float32)
    tables, start = [], 0
    for (n, d), pad in zip(shapes, padded):
        t = flat[start : start + n * d].reshape(n, d)
        tables.append(t.at[0].set(0.0) if pad else t)
        start += n * d
    return tuple(tables)


def embedding_tables(rngs: nnx.Rngs, scale: float, shapes: dict[str, tuple[int, int]],
                     padded: tuple[str, ...] = ()) -> dict[str, EmbeddingTable]:
    """{name: EmbeddingTable [rows, dim]} drawn N(0, scale^2); the tables named in `padded` get a
    zero row 0 (the padding item). One jitted draw (eager init compiles a kernel per table)."""
    names = tuple(shapes)
    values = _normal_tables(rngs.params(), scale, tuple(shapes[n] for n in names), tuple(n in padded for n in names))
    return {n: logical_param(v, ("vocab", "embed"), EmbeddingTable) for n, v in zip(names, values)}


def rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [N, D] gathered at int ids [...] -> [..., D]. Ids are in range by construction; "clip"
    mode keeps XLA from adding out-of-range masking (which its cost model counts as FLOPs)."""
    return jnp.take(table, ids, axis=0, mode="clip")


def candidates(targets: jax.Array, negatives: jax.Array) -> jax.Array:
    """Items scored at each position: [B, L, 1 + M], the target then its negatives.

    targets [B, L]; negatives [B, L, M] or [B, 1, M] (shared per row, broadcast over positions)."""
    b, l = targets.shape
    negatives = jnp.broadcast_to(negatives, (b, l, negatives.shape[-1]))
    return jnp.concatenate([targets[..., None], negatives], axis=-1)


@register_model("neumf", NeuMFConfig)
class NeuMF(SequenceModel):
    """GMF embeddings [U, D], [V + 1, D]; MLP embeddings [U, D_M], [V + 1, D_M] (item row 0 is
    padding); the MLP path with the head's MLP half, and the head's GMF half h_G [D, 1]."""

    batch_keys = ("items", "lengths", "users")

    def __init__(self, config: NeuMFConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        users, items, d, dm = max(spec.num_users, 1), spec.num_items + 1, config.embed_dim, config.mlp_embed_dim
        tables = embedding_tables(rngs, config.init_scale, {  # one user row when the count is unknown
            "user_gmf": (users, d), "item_gmf": (items, d), "user_mlp": (users, dm), "item_mlp": (items, dm)},
            padded=("item_gmf", "item_mlp"))
        self.user_gmf, self.item_gmf = tables["user_gmf"], tables["item_gmf"]
        self.user_mlp, self.item_mlp = tables["user_mlp"], tables["item_mlp"]
        self.tower = MLP(config.mlp_layers[0], config.mlp_layers[1:], 1, rngs=rngs)
        self.gmf_head = Linear(config.embed_dim, 1, axes=("embed", None), use_bias=False, rngs=rngs)

    def pair_logits(self, users: jax.Array, items: jax.Array) -> jax.Array:
        """Logits [B, N] of each user's N items: users int32 [B], items int32 [B, N]."""
        pg, qg = rows(self.user_gmf[...], users), rows(self.item_gmf[...], items)
        pm, qm = rows(self.user_mlp[...], users), rows(self.item_mlp[...], items)
        gmf = self.gmf_head(pg[:, None, :] * qg)  # [B, N, 1]
        pm = jnp.broadcast_to(pm[:, None, :], qm.shape)
        mlp = self.tower(jnp.concatenate([pm, qm], axis=-1))  # [B, N, 1], the head's MLP half included
        return (gmf + mlp)[..., 0]

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The user's GMF factors at every position [B, L, D]. NeuMF's score is not a dot product:
        these and `item_table` are the GMF half for inspection; scoring goes through
        `training_forward` and `catalogue_scores`."""
        p = rows(self.user_gmf[...], batch["users"])
        return jnp.broadcast_to(p[:, None, :], (*batch["items"].shape, p.shape[-1]))

    def item_table(self) -> jax.Array:
        """The GMF item embeddings [V + 1, D] (see `__call__`)."""
        return self.item_gmf[...]

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Logits [B, L, 1 + M] of each position's target (column 0) and negatives."""
        items = candidates(batch["targets"], batch["negatives"])
        b, l, n = items.shape
        return self.pair_logits(batch["users"], items.reshape(b, l * n)).reshape(b, l, n)

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """NCF's log loss over the positives and sampled negatives (the temperature is unused)."""
        scores = self.training_forward(batch).astype(jnp.float32)
        return bce_loss(scores, batch["targets"], batch["negatives"], batch["lengths"])

    def catalogue_scores(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Logits [B, V + 1] of every item for each user in batch["users"] [B] (equal to
        `pair_logits` of every pair; the first MLP layer is split into user and item halves)."""
        users = batch["users"]
        pg = rows(self.user_gmf[...], users)
        gmf = (pg * self.gmf_head.kernel[...][:, 0]) @ self.item_gmf[...].T  # h_G . (p ⊙ q) = (p ⊙ h_G) . q
        tower, dm = self.tower, self.config.mlp_embed_dim
        first = tower.layers[0] if len(tower.layers) else tower.out
        kernel = first.kernel[...]
        user_half = rows(self.user_mlp[...], users) @ kernel[:dm]  # [B, W1], once per user
        item_half = self.item_mlp[...] @ kernel[dm:] + first.bias[...]  # [V + 1, W1], once per item
        h = user_half[:, None, :] + item_half[None, :, :]  # [B, V + 1, W1]: the B x V pairs start here
        if len(tower.layers):
            if tower.norms[0] is not None:
                h = tower.norms[0](h)
            h = jax.nn.relu(h)
            for layer, norm in zip(tower.layers[1:], tower.norms[1:]):
                h = layer(h)
                h = jax.nn.relu(norm(h) if norm is not None else h)
            h = tower.out(h)
        return gmf + h[..., 0]
