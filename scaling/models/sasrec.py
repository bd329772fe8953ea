"""SASRec (Kang & McAuley, ICDM 2018), trained as in generative-recommenders (sampled softmax over
L2-normalised queries and items, temperature 0.05), as a registered next-item family "sasrec".

Encoder, for item ids [B, N] (left-aligned, 0 = padding) and lengths [B] (timestamps ignored):

    x = item_emb(ids) * sqrt(D) + pos_emb(0..N-1);  dropout;  padded positions set to 0
    for each of `num_blocks` blocks (scaling.models.transformer.TransformerBlock, causal mask):
        "pre":    x = x + drop(attn(LN1(x), x));   x = x + drop(FFN(LN2(x)))
        "sasrec": y = LN1(x);  y = LN2(y + attn(y, x));  x = y + drop(FFN(y))   (reference code)
        padded positions set to 0
    out = LN(x), padded positions 0;  out = out / ||out|| when l2_normalize
Queries out [B, N, D] are scored against `item_table()` = the (L2-normalised) input embedding
table [num_items + 1, D]: one table is shared by inputs and outputs, as in SASRec.

Init: item embeddings truncated normal(0, 0.02), row 0 (padding) zero; position embeddings
truncated normal(0, 1/sqrt(D)); attention and feed-forward kernels xavier-normal, biases 0
(generative-recommenders' choices). LayerNorm epsilon 1e-8 as in both reference codes; the
LayerNorms have a learned scale and shift and there is a final LayerNorm, as in Kang & McAuley's
code (generative-recommenders' SASRec has neither: its LayerNorms are plain and its output goes
straight to the L2 norm).

FLOPs per example (`flops_per_example(spec)`) = encoder at max_len (transformer_block_flops per
block, plus the input scaling/adds, the final LayerNorm, the padding selects and the L2 norm) +
scoring 2 D (1 + negatives) per position. Attention is counted over the full N x N scores (the
dense path), not the causal half.

Size ladder (`SASRecConfig.SIZES`): layers, width, heads and max_len grow together, head width
24-64 and FFN 4 D (the standard Transformer ratio, not SASRec's FFN = D). max_len stops at 200,
ML-1M's published window: most ML-1M/ML-20M users have fewer events, so a longer window would
mostly add padding. At 128 negatives,
flops_per_example runs from ~2.1 MFLOP (xxs) to ~4.7 GFLOP (xl), 3-8x per step. "ml1m" is
the published ML-1M configuration (2 blocks, 1 head, D = FFN = 50, max_len 200, dropout 0.2,
reference-code residuals), ~31 MFLOP/example; it is a reference point, not a ladder step.
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
from scaling.models.mlp import LayerNorm, layer_norm_flops
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig, l2_normalize
from scaling.models.transformer import (
    TransformerBlock,
    causal_mask,
    transformer_block_flops,
    valid_from_lengths,
)
from scaling.sharding.annotate import logical_param
from scaling.sharding.embedding import lookup, natural_table

__all__ = ["SASRec", "SASRecConfig"]

_LN_EPS = 1e-8  # both reference codes

# Ladder steps use standard pre-LN residuals ("pre"); "ml1m" reproduces the published model.
# The ladder mirrors HSTU's (same width, depth, heads and history length at each name, so a
# sweep compares the two at equal shapes), with the published feed-forward width D; "ml1m" and
# "beauty" are the published ML-1M model and its Beauty-length variant (max_len 50, dropout 0.5).
_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(num_blocks=1, embed_dim=24, num_heads=1, ffn_dim=24, max_len=48, block_norm="pre"),
    "s": dict(num_blocks=2, embed_dim=32, num_heads=2, ffn_dim=32, max_len=64, block_norm="pre"),
    "m": dict(num_blocks=2, embed_dim=48, num_heads=2, ffn_dim=48, max_len=96, block_norm="pre"),
    "l": dict(num_blocks=3, embed_dim=64, num_heads=2, ffn_dim=64, max_len=128, block_norm="pre"),
    "xl": dict(num_blocks=4, embed_dim=96, num_heads=4, ffn_dim=96, max_len=160, block_norm="pre"),
    "beauty": dict(num_blocks=2, embed_dim=64, num_heads=1, ffn_dim=64, max_len=50, dropout=0.5,
                   activation="relu", block_norm="sasrec"),
    "ml1m": dict(num_blocks=2, embed_dim=50, num_heads=1, ffn_dim=50, max_len=200, dropout=0.2,
                 activation="relu", block_norm="sasrec"),
}
_DEFAULT = _SIZES["ml1m"]


@dataclasses.dataclass(frozen=True)
class SASRecConfig(SequenceModelConfig):
    """SASRec hyperparameters. `size` names a preset of SIZES (explicit keys override it); the
    defaults are the published ML-1M model ("ml1m")."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["sasrec"] = knob("sasrec")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(_DEFAULT["embed_dim"], ge=1, help="D: item/position embedding and model width")
    num_blocks: int = knob(_DEFAULT["num_blocks"], ge=1, help="Transformer blocks")
    num_heads: int = knob(_DEFAULT["num_heads"], ge=1, help="attention heads (each D / heads wide)")
    ffn_dim: int = knob(_DEFAULT["ffn_dim"], ge=1, help="hidden width of the point-wise feed-forward")
    max_len: int = knob(_DEFAULT["max_len"], ge=1, help="positions per sequence (learned position embeddings)")
    dropout: float = knob(0.2, ge=0.0, lt=1.0, help="dropout on inputs, attention probabilities and FFN")
    l2_normalize: bool = knob(True, help="L2-normalise queries and items (cosine logits / temperature)")
    temperature: float = knob(0.05, gt=0.0, help="softmax temperature of the logits")
    activation: Literal["relu", "gelu"] = knob("relu", help="feed-forward activation")
    block_norm: Literal["pre", "sasrec", "post"] = knob(
        "sasrec", help="residual/LayerNorm placement: pre-LN, the SASRec reference code's, or post-LN")

    def check(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def encoder_flops(self, n: int) -> float:
        """Forward FLOPs of the encoder over one padded sequence of n positions (see module doc).

        Input: scale, position add, padding select (3 n D); blocks; final LayerNorm and padding
        select; L2 norm (square, sum, scale: 3 D + 1 per position). Embedding gathers and the
        causal mask's construction are excluded."""
        d = self.embed_dim
        flops = 3.0 * n * d
        flops += self.num_blocks * transformer_block_flops(n, d, self.num_heads, self.ffn_dim,
                                                           activation=self.activation)
        flops += layer_norm_flops(d, n) + n * d
        if self.l2_normalize:
            flops += n * (3.0 * d + 1)
        return float(flops)


@register_model("sasrec", SASRecConfig)
class SASRec(SequenceModel):
    """SASRec: batch {items, lengths [, timestamps, next_timestamps]} -> queries [B, N, D], N <= max_len.

    `item_table()` is what the queries are scored against (evaluation: the whole catalogue;
    training: `sampled_softmax_loss` gathers targets and negatives from it). `item_embeddings(ids)`
    gives the same rows for just `ids`, normalising each gathered row (3 D + 1 FLOPs a row) instead
    of the whole table once per step: the cheaper path when the catalogue has more rows than a
    step gathers (B L (1 + negatives)).
    """

    def __init__(self, config: SASRecConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d = config.embed_dim
        table = 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (spec.num_items + 1, d), jnp.float32)
        self.item_emb = embedding_table(table.at[0].set(0.0))
        pos = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (config.max_len, d), jnp.float32) / math.sqrt(d)
        self.pos_emb = logical_param(pos, ("seq", "embed"))
        self.input_dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(d, config.num_heads, config.ffn_dim, activation=config.activation,
                             dropout=config.dropout, attn_dropout=config.dropout, norm=config.block_norm,
                             eps=_LN_EPS, rngs=rngs)
            for _ in range(config.num_blocks)
        ])
        self.final_ln = LayerNorm(d, eps=_LN_EPS)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """items int [B, N] (N <= max_len), lengths int [B] -> queries float [B, N, D]; the query at
        position i has seen items 0..i only; padded positions are 0."""
        items, lengths = batch["items"], batch["lengths"]
        n = items.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds SASRec max_len {self.config.max_len}")
        valid = valid_from_lengths(lengths, n)
        x = lookup(self.item_emb, items) * math.sqrt(self.config.embed_dim)
        x = x + self.pos_emb[...][:n][None]
        x = jnp.where(valid[..., None], self.input_dropout(x), 0.0)
        mask = causal_mask(valid)  # built once, shared by every block
        for block in self.blocks:
            x = block(x, mask, valid)
        x = jnp.where(valid[..., None], self.final_ln(x), 0.0)  # LN of a zero row is its shift
        return l2_normalize(x) if self.config.l2_normalize else x

    def item_embeddings(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> [..., D]: rows of `item_table()`, gathered before normalising."""
        rows = lookup(self.item_emb, ids)
        return l2_normalize(rows) if self.config.l2_normalize else rows

    def item_table(self) -> jax.Array:
        """The shared item embeddings [num_items + 1, D] (L2-normalised when l2_normalize)."""
        table = natural_table(self.item_emb)  # a full-table read (not a lookup): GSPMD shards it
        return l2_normalize(table) if self.config.l2_normalize else table

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
