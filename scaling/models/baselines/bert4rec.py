"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained with the Cloze objective,
as a trained next-item family "bert4rec".

Item table E [V + 2, D]: row 0 padding, 1..V the items, V + 1 the [mask] token. For ids x [B, N]
(left-aligned, 0 = padding) and lengths [B]:

    h = dropout(LN(E[x] + P[0..N-1])),  padded positions 0          (learned positions P [max_len, D])
    for each of `num_blocks` blocks: h = TransformerBlock(h, padding mask)   (scaling.models.transformer;
        no causal mask: every valid position attends every valid position; post-LN by default, as BERT)
    g = LN_o(GELU(h W_p + b_p))                                      the output transform (BERT's head)
    score(i) = g . E[i] + b_o[i]     for items i in 0..V (0 never ranked), b_o a learned output bias

so the output projection shares the input table (Eq. 7 of the paper, plus BERT's LayerNorm).

Training (`TARGETS = "all"`: a row is the user's most recent max_len training events): the Cloze
task. Each valid position is masked with probability mask_prob; a non-empty row with none masked
gets one uniformly drawn position masked (at least one per row); masked items are replaced by the
[mask] token (always: the reference code's choice, no 80/10/10 rule). The randomness comes from the
module's own `cloze` random stream, which the loop carries and folds with the step like dropout's.
The loss is the cross-entropy of the original item at each masked position, averaged over the
masked positions of the batch: a softmax over the whole catalogue (full_softmax, the paper) or a
sampled softmax over the item and the batch's negatives of that position (accidental hits out).

Scored positions form a fixed budget of K = B max_predictions slots per batch (max_predictions = 0:
ceil(mask_prob max_len), the expected masked count of a full row), so every step has the same
shapes and a deterministic FLOP count. Each row's first masked position takes a slot first (the
at-least-one guarantee survives the budget), then the rest in batch order (rows come in a random
order each epoch); masks beyond the budget are undone, so at most K positions are masked. With
padded rows (real data) the budget is seldom reached; with full rows it trims a few percent of masks.

Evaluation (`catalogue_scores`): [mask] is appended right after the user's history (when the
history fills max_len its oldest item is dropped first) and every item is scored at that position.
No mask is drawn at evaluation.

FLOPs per example (one train row, L = max_len; `training_forward` is the encoder over L positions,
the output transform at the max_predictions scored slots and their logits): encoder (positions add,
input LayerNorm, padding select, `transformer_block_flops` per block, attention counted over the
full L x L scores); per slot the transform (2 D^2 + D bias + GELU + LayerNorm) and (2 D + 1) per
logit (dot product, bias) over V + 1 items (full softmax) or 1 + M (sampled). The slots are the
expectation mask_prob x L at full rows, whatever the row's real length: padded positions count, as
the encoder's do. The Cloze draws, the loss's softmax and the gathers are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import ConfigError, knob
from scaling.data.spec import SequenceSpec
from scaling.models.embedding import embedding_table
from scaling.models.mlp import LayerNorm, Linear, layer_norm_flops, linear_flops
from scaling.models.registry import register_model
from scaling.models.sasrec import SASRecConfig
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig
from scaling.models.transformer import (
    ACTIVATION_FLOPS,
    TransformerBlock,
    padding_mask,
    transformer_block_flops,
    valid_from_lengths,
)
from scaling.sharding.annotate import logical_param
from scaling.sharding.embedding import lookup, natural_table
from scaling.train.sampled_softmax import ACCIDENTAL_HIT_LOGIT

__all__ = ["BERT4Rec", "BERT4RecConfig"]

_LN_EPS = 1e-12  # BERT's

# The ladder has SASRec's shapes at each name (blocks, width, heads, max_len: sweeps compare the
# two at equal shapes) with BERT's feed-forward width 4 D. "beauty" and "ml1m" are the published
# models (D 64, 2 blocks, 2 heads, FFN 256, dropout 0.1; mask_prob 0.6 on Beauty, 0.2 on ML-1M).
_LADDER = ("xs", "s", "m", "l", "xl")
_SIZES: dict[str, dict[str, Any]] = {
    name: {**{k: SASRecConfig.SIZES[name][k] for k in ("num_blocks", "embed_dim", "num_heads", "max_len")},
           "ffn_dim": 4 * SASRecConfig.SIZES[name]["embed_dim"]}
    for name in _LADDER
}
_SIZES["beauty"] = dict(num_blocks=2, embed_dim=64, num_heads=2, ffn_dim=256, max_len=50, mask_prob=0.6)
_SIZES["ml1m"] = dict(num_blocks=2, embed_dim=64, num_heads=2, ffn_dim=256, max_len=200, mask_prob=0.2)
_DEFAULT = _SIZES["ml1m"]


@dataclasses.dataclass(frozen=True)
class BERT4RecConfig(SequenceModelConfig):
    """BERT4Rec hyperparameters; `size` names a preset of SIZES. The defaults are the published
    ML-1M model."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES
    TARGETS: ClassVar[str] = "all"

    name: Literal["bert4rec"] = knob("bert4rec")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(_DEFAULT["embed_dim"], ge=1, help="D: item/position embedding and model width")
    num_blocks: int = knob(_DEFAULT["num_blocks"], ge=1, help="Transformer blocks")
    num_heads: int = knob(_DEFAULT["num_heads"], ge=1, help="attention heads (each D / heads wide)")
    ffn_dim: int = knob(_DEFAULT["ffn_dim"], ge=1, help="hidden width of the point-wise feed-forward")
    max_len: int = knob(_DEFAULT["max_len"], ge=1, help="positions per row (learned position embeddings)")
    dropout: float = knob(0.1, ge=0.0, lt=1.0, help="dropout on inputs, attention probabilities and FFN")
    mask_prob: float = knob(0.2, gt=0.0, lt=1.0, help="Cloze: probability each valid position is masked")
    max_predictions: int = knob(0, ge=0, help="scored slots per row, pooled over the batch; 0 = ceil(mask_prob max_len)")
    full_softmax: bool = knob(True, help="softmax over the whole catalogue (else over the batch's negatives)")
    activation: Literal["relu", "gelu"] = knob("gelu", help="feed-forward and output-transform activation")
    block_norm: Literal["pre", "sasrec", "post"] = knob("post", help="residual/LayerNorm placement (BERT: post)")

    def check(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.max_predictions > self.max_len:
            raise ConfigError("max_predictions", f"{self.max_predictions} exceeds max_len {self.max_len}")

    @property
    def predictions(self) -> int:
        """Scored slots per row (the batch has B times as many)."""
        return self.max_predictions or max(1, math.ceil(self.mask_prob * self.max_len))

    def encoder_flops(self, n: int) -> float:
        """Position add, input LayerNorm, padding select, and the bidirectional blocks over n positions."""
        d = self.embed_dim
        flops = 2.0 * n * d + layer_norm_flops(d, n)
        flops += self.num_blocks * transformer_block_flops(n, d, self.num_heads, self.ffn_dim,
                                                           activation=self.activation)
        return float(flops)

    def head_flops(self) -> float:
        """The output transform of one position: Linear D -> D, activation, LayerNorm."""
        d = self.embed_dim
        return float(linear_flops(d, d) + ACTIVATION_FLOPS[self.activation] * d + layer_norm_flops(d))

    def scoring_flops(self, spec: SequenceSpec) -> float:
        """Per row: `predictions` slots, each transformed and scored against V + 1 (or 1 + M) items."""
        items = spec.num_items + 1 if self.full_softmax else 1 + spec.num_negatives
        return float(self.predictions * (self.head_flops() + items * (2.0 * self.embed_dim + 1)))

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        """float32 rows gathered per row: the L inputs, and with the sampled softmax the slots' items
        (the full softmax reads the whole table once per batch, not per row)."""
        rows = self.max_len + (0 if self.full_softmax else self.predictions * (1 + spec.num_negatives))
        return float(rows * self.embed_dim * 4)


@register_model("bert4rec", BERT4RecConfig)
class BERT4Rec(SequenceModel):
    """Bidirectional encoder; `__call__` -> output-transformed vectors [B, N, D] of the unmasked rows."""

    batch_keys = ("items", "lengths")

    def __init__(self, config: BERT4RecConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, v = config.embed_dim, spec.num_items
        self.mask_id = v + 1
        normal = lambda shape: 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)  # BERT init
        self.item_emb = embedding_table(normal((v + 2, d)).at[0].set(0.0))
        self.pos_emb = logical_param(normal((config.max_len, d)), ("seq", "embed"))
        self.input_ln = LayerNorm(d, eps=_LN_EPS)
        self.input_dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(d, config.num_heads, config.ffn_dim, activation=config.activation,
                             dropout=config.dropout, attn_dropout=config.dropout, norm=config.block_norm,
                             kv_norm=True, eps=_LN_EPS, rngs=rngs)
            for _ in range(config.num_blocks)
        ])
        self.head = Linear(d, d, axes=("embed", "mlp"), rngs=rngs)
        self.head_ln = LayerNorm(d, axis_name="mlp", eps=_LN_EPS)
        self.out_bias = embedding_table(jnp.zeros((v + 1, 1), jnp.float32), ("vocab", None))
        self.cloze_rngs = rngs["cloze"].fork()  # the masks' stream: the loop folds the step into it

    # ---------------------------------------------------------------------------------- encoder
    def encode(self, items: jax.Array, lengths: jax.Array) -> jax.Array:
        """ids int [B, N] (N <= max_len; may hold mask_id), lengths [B] -> hidden [B, N, D]; every
        valid position sees every valid position; padded positions are 0."""
        n = items.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds BERT4Rec max_len {self.config.max_len}")
        valid = valid_from_lengths(lengths, n)
        x = lookup(self.item_emb, items) + self.pos_emb[...][:n][None]
        x = jnp.where(valid[..., None], self.input_dropout(self.input_ln(x)), 0.0)
        mask = padding_mask(valid)  # bidirectional: only padding is hidden
        for block in self.blocks:
            x = block(x, mask, valid)
        return x

    def transform(self, h: jax.Array) -> jax.Array:
        """The output transform [..., D] -> [..., D]: LN(act(h W_p + b_p)), scored against E."""
        y = self.head(h)
        y = jax.nn.gelu(y, approximate=False) if self.config.activation == "gelu" else jax.nn.relu(y)
        return self.head_ln(y)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self.transform(self.encode(batch["items"], batch["lengths"]))

    def item_table(self) -> jax.Array:
        """E's item rows [V + 1, D] (0 padding, 1..V); the [mask] row is an input only."""
        return natural_table(self.item_emb)[: self.spec.num_items + 1]  # full-table read: GSPMD shards it

    def score_all(self, g: jax.Array) -> jax.Array:
        """Transformed vectors g [K, D] -> logits [K, V + 1] of every item (plus its output bias)."""
        return g @ self.item_table().T + natural_table(self.out_bias)[:, 0]

    # ------------------------------------------------------------------------------------ Cloze
    def cloze(self, items: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Draw the Cloze masks (module docstring). items [B, N], lengths [B] -> (inputs [B, N] with
        masked items replaced by mask_id, slots int [K] flat positions b N + t of the scored masked
        positions, slot_valid bool [K]); K = B predictions, filled in order, the unused ones False."""
        b, n = items.shape
        k = b * min(self.config.predictions, n)
        valid = valid_from_lengths(lengths, n)
        masked = valid & (jax.random.uniform(self.cloze_rngs(), (b, n)) < self.config.mask_prob)
        forced = jnp.floor(jax.random.uniform(self.cloze_rngs(), (b,)) * lengths).astype(jnp.int32)
        none = ~jnp.any(masked, axis=1)
        masked = masked | (none[:, None] & valid & (jnp.arange(n)[None, :] == forced[:, None]))
        # slot order: each row's first masked position, then the others in batch order
        first = (masked & (jnp.cumsum(masked, axis=1) == 1)).reshape(-1)
        rest = masked.reshape(-1) & ~first
        num_first = jnp.sum(first)
        rank = jnp.where(first, jnp.cumsum(first) - 1, num_first + jnp.cumsum(rest) - 1)
        keep = (first | rest) & (rank < k)
        slots = jnp.zeros(k, jnp.int32).at[jnp.where(keep, rank, k)].set(jnp.arange(b * n, dtype=jnp.int32), mode="drop")
        slot_valid = jnp.arange(k) < jnp.sum(keep)
        inputs = jnp.where(keep.reshape(b, n), self.mask_id, items)
        return inputs, slots, slot_valid

    def _cloze_logits(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One Cloze draw -> (logits, ids, slot_valid [K]): full softmax: logits [K, V + 1] and ids
        [K, 1] the slots' items; sampled: logits [K, 1 + M] of ids [K, 1 + M] (the item, then the
        negatives of its position)."""
        items, lengths = batch["items"], batch["lengths"]
        b, n = items.shape
        inputs, slots, slot_valid = self.cloze(items, lengths)
        h = self.encode(inputs, lengths).reshape(b * n, -1)
        g = self.transform(jnp.take(h, slots, axis=0))
        targets = jnp.where(slot_valid, jnp.take(items.reshape(-1), slots), 0)[:, None]
        if self.config.full_softmax:
            return self.score_all(g), targets, slot_valid
        negatives = batch["negatives"]  # [B, N, M] or [B, 1, M] (one draw per row)
        rows, cols = slots // n, (slots % n) * (negatives.shape[1] != 1)
        ids = jnp.concatenate([targets, negatives[rows, cols]], axis=-1)
        logits = jnp.einsum("kd,kmd->km", g, lookup(self.item_emb, ids))
        return logits + lookup(self.out_bias, ids)[..., 0], ids, slot_valid

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The counted forward: one Cloze draw, the encoder over all L positions, and the logits of
        the K = B predictions slots (filled or not); the loss reads the filled ones only."""
        return self._cloze_logits(batch)[0]

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Mean cross-entropy of the original items at the batch's masked positions."""
        logits, ids, slot_valid = self._cloze_logits(batch)
        logits = logits.astype(jnp.float32) / temperature
        if self.config.full_softmax:
            logits = logits.at[:, 0].set(ACCIDENTAL_HIT_LOGIT)  # padding is no item
            positive = jnp.take_along_axis(logits, ids, axis=1)[:, 0]
        else:  # a negative equal to the item (an accidental hit) leaves the softmax
            hit = (ids == ids[:, :1]).at[:, 0].set(False)
            logits = jnp.where(hit, ACCIDENTAL_HIT_LOGIT, logits)
            positive = logits[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - positive
        return jnp.sum(jnp.where(slot_valid, nll, 0.0)) / jnp.maximum(jnp.sum(slot_valid), 1)

    # ------------------------------------------------------------------------------- evaluation
    def eval_inputs(self, items: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """History ids [B, N], lengths [B] -> (ids with [mask] right after the history, new lengths,
        the [mask]'s position [B]); a full row drops its oldest item first."""
        n = items.shape[1]
        full = lengths >= n
        shifted = jnp.where(full[:, None], jnp.roll(items, -1, axis=1), items)
        at = jnp.minimum(lengths, n - 1)
        inputs = jnp.where(jnp.arange(n)[None, :] == at[:, None], self.mask_id, shifted)
        return inputs, jnp.minimum(lengths + 1, n), at

    def catalogue_scores(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        """Scores [B, V + 1] of every item at a [mask] appended to each history (no Cloze draw)."""
        inputs, lengths, at = self.eval_inputs(batch["items"], batch["lengths"])
        h = self.encode(inputs, lengths)
        g = self.transform(jnp.take_along_axis(h, at[:, None, None], axis=1)[:, 0])
        return self.score_all(g).astype(jnp.float32) / temperature

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
