"""HSTU (Zhai et al., ICML 2024) as in the research code that produced the published tables.

Encoder, for item ids [B, N] (left-aligned, 0 = padding), their timestamps and lengths:

    x = item_emb(ids) * sqrt(D) + pos_emb(0..N-1);  dropout;  padded positions set to 0
    for each layer:
        u, v, q, k = split(silu(LN(x) @ W_uvqk))          # LN without affine; W without bias
        a = hstu_attention(q, k, v, rab_layer(timestamps), lengths, norm)
        x = x + W_o(dropout(u * LN(a))) + b_o             # LN without affine
    out = x / ||x||                                        # L2-normalised next-item query

Init as in the code: W_uvqk normal(0, 0.02); W_o xavier-uniform, b_o 0; item embeddings truncated
normal(0, 0.02) with row 0 (padding) zero; position embeddings xavier-normal; both relative-bias
tables normal(0, 0.02). `attn_norm` is the divisor of the attention (the research code uses the
padded length, 211 for ML-1M's 200 + 10 + 1); 0 means this batch's padded length N.
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
from scaling.kernels.dispatch import IMPL_HELP, KernelImpl
from scaling.kernels.hstu_attention import hstu_mha, projected_mha, projection_fusable
from scaling.kernels.row_norm import gated_layer_norm
from scaling.models.embedding import embedding_table
from scaling.sharding.embedding import lookup, natural_table
from scaling.models.hstu_attention import time_buckets
from scaling.models.mlp import layer_norm_flops
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig, l2_normalize
from scaling.sharding.annotate import logical_param, natural, padded_vector
from scaling.sharding.rules import constrain


# The ladder scales depth, width, heads and history length together (the paper's Fig. 7 grows
# all four); "ml1m"/"ml20m" (+ "_large") are the published configurations (brief, section 3);
# "beauty" (+ "_large") is the Books-like setting at Beauty's shorter histories (max_len 50, dropout 0.5).
_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(embed_dim=24, num_layers=1, num_heads=1, qk_dim=24, v_dim=24, max_len=48),
    "s": dict(embed_dim=32, num_layers=2, num_heads=2, qk_dim=16, v_dim=16, max_len=64),
    "m": dict(embed_dim=48, num_layers=2, num_heads=2, qk_dim=24, v_dim=24, max_len=96),
    "l": dict(embed_dim=64, num_layers=3, num_heads=2, qk_dim=32, v_dim=32, max_len=128),
    "xl": dict(embed_dim=96, num_layers=4, num_heads=4, qk_dim=24, v_dim=24, max_len=160),
    "beauty": dict(embed_dim=64, num_layers=2, num_heads=1, qk_dim=64, v_dim=64, max_len=50, dropout=0.5),
    "beauty_large": dict(embed_dim=64, num_layers=8, num_heads=2, qk_dim=32, v_dim=32, max_len=50, dropout=0.5),
    "ml1m": dict(embed_dim=50, num_layers=2, num_heads=1, qk_dim=50, v_dim=50, max_len=200, dropout=0.2),
    "ml1m_large": dict(embed_dim=50, num_layers=8, num_heads=2, qk_dim=25, v_dim=25, max_len=200, dropout=0.2),
    "ml20m": dict(embed_dim=256, num_layers=4, num_heads=4, qk_dim=64, v_dim=64, max_len=200, dropout=0.2),
    "ml20m_large": dict(embed_dim=256, num_layers=16, num_heads=8, qk_dim=32, v_dim=32, max_len=200, dropout=0.2),
}


@dataclasses.dataclass(frozen=True)
class HSTUConfig(SequenceModelConfig):
    """HSTU hyperparameters (defaults: the published ML-1M configuration). `size` names a preset."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["hstu"] = knob("hstu")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(50, ge=1, help="D: item embedding and residual width")
    num_layers: int = knob(2, ge=1)
    num_heads: int = knob(1, ge=1)
    qk_dim: int = knob(50, ge=1, help="query/key width per head")
    v_dim: int = knob(50, ge=1, help="value width per head")
    max_len: int = knob(200, ge=1, help="most recent events the model reads (positions)")
    num_buckets: int = knob(128, ge=1, help="log-spaced time-gap buckets of the relative bias")
    dropout: float = knob(0.2, ge=0.0, lt=1.0, help="input and output-projection dropout")
    attn_norm: float = knob(0.0, ge=0.0, help="attention divisor; 0 = the padded length N")
    temperature: float = knob(0.05, gt=0.0, help="softmax temperature of the cosine logits")
    relative_bias: bool = knob(True, help="learned position + time bias in attention (false: the newer STU's none)")
    attention_alpha: float = knob(1.0, gt=0.0, help="score scale silu(alpha q.k + rab); the newer STU uses 1/sqrt(qk_dim)")
    attention_impl: Literal["auto", "pallas", "xla", "mosaic"] = knob(
        "auto", help=f"HSTU attention (scaling/kernels/hstu_attention.py). {IMPL_HELP}; mosaic: the Mosaic GPU "
        "kernels on NVIDIA GPUs (Hopper; relative_bias false, qk_dim = v_dim a multiple of 64; bf16 inside), the "
        "jnp reference elsewhere")
    norm_impl: KernelImpl = knob("auto", help="the LayerNorms and the output gate "
                                 f"(scaling/kernels/row_norm.py). {IMPL_HELP}")

    def check(self) -> None:
        if self.attention_impl == "mosaic":
            if self.relative_bias:
                raise ConfigError("attention_impl", "mosaic has no relative bias: set relative_bias: false")
            if self.qk_dim != self.v_dim or self.qk_dim % 64:
                raise ConfigError("attention_impl", f"mosaic needs qk_dim = v_dim, a multiple of 64; got qk_dim "
                                                    f"{self.qk_dim}, v_dim {self.v_dim}")

    def encoder_flops(self, n: int | None = None, *, causal: bool = False) -> float:
        """Forward FLOPs of the encoder over one padded sequence of length n (default max_len).

        Matmuls count 2 x multiply-adds; pointwise ops one FLOP per output element, the project's
        convention (scaling/flops.py): per attention score and head 8 (bias add, SiLU as 4, the
        divisor, the mask) plus 1 per score for the two bias tables' sum; per position and layer
        the two LayerNorms, the SiLU of the projection, the gate and the residual. Attention counts
        the full n x n products as the dense reference computes them; causal=True counts the lower
        triangle with the diagonal, what a kernel that skips masked blocks does. The time buckets
        are computed once per sequence (shared by the layers): 22 per score, as XLA counts the
        integer gap, the float32 log formula and its two edge checks. Gathers are not counted."""
        n = self.max_len if n is None else n
        d, h = self.embed_dim, self.num_heads
        width = 2 * h * self.v_dim + 2 * h * self.qk_dim
        pairs = n * (n + 1) / 2 if causal else n * n
        matmuls = 2 * n * d * width + 2 * pairs * h * (self.qk_dim + self.v_dim) + 2 * n * h * self.v_dim * d
        per_score = 8 * h + 1 if self.relative_bias else 7 * h  # without rab: no bias sum, no bias add
        pointwise = (pairs * per_score + layer_norm_flops(d, n) + layer_norm_flops(h * self.v_dim, n)
                     + n * (4 * width + h * self.v_dim + 2 * d))
        # + the input scale and position add, and the output L2 normalisation (3 per element)
        if self.attention_alpha != 1.0:
            pointwise += n * h * self.qk_dim
        buckets = 22 * pairs if self.relative_bias else 0.0
        return float(self.num_layers * (matmuls + pointwise) + buckets + 5 * n * d)


def _xavier_uniform(key, fan_in: int, fan_out: int) -> jax.Array:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)


class HSTUBlock(nnx.Module):
    """One sequential transduction unit: x [B, N, D] -> [B, N, D]."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        d, h = cfg.embed_dim, cfg.num_heads
        self.cfg = cfg
        width = 2 * h * cfg.v_dim + 2 * h * cfg.qk_dim
        self.w_uvqk = logical_param(0.02 * jax.random.normal(rngs.params(), (d, width), jnp.float32), ("embed", "mlp"))
        self.w_o = logical_param(_xavier_uniform(rngs.params(), h * cfg.v_dim, d), ("mlp", "embed"))
        self.b_o = logical_param(jnp.zeros((d,), jnp.float32), ("embed",))
        n = cfg.max_len
        # The relative-bias tables [2n - 1] (offsets) and [num_buckets + 1] (time gaps), stored
        # zero-padded to a multiple of 128 entries so that fsdp can split them (an odd length divides
        # no device count); the model reads their natural lengths (`bias_tables`), so the padding
        # never takes part and training is exactly that of the unpadded tables.
        self.pos_w = padded_vector(0.02 * jax.random.normal(rngs.params(), (2 * n - 1,), jnp.float32), "seq")
        self.ts_w = padded_vector(0.02 * jax.random.normal(rngs.params(), (cfg.num_buckets + 1,), jnp.float32), "table")
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def pre_activation(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> LN(x) @ W_uvqk [..., 2 h dv + 2 h dqk], the projection before its SiLU."""
        return gated_layer_norm(x, impl=self.cfg.norm_impl) @ self.w_uvqk[...]

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x [..., D] -> u [..., h*dv] (the gate), v [..., h, dv], q [..., h, dqk], k [..., h, dqk]."""
        cfg = self.cfg
        h, lead = cfg.num_heads, x.shape[:-1]
        uvqk = jax.nn.silu(self.pre_activation(x))
        u, v, q, k = jnp.split(uvqk, [h * cfg.v_dim, 2 * h * cfg.v_dim, 2 * h * cfg.v_dim + h * cfg.qk_dim], axis=-1)
        if cfg.attention_alpha != 1.0:  # scaling q scales every score q.k (and keeps the cache's K as is)
            q = q * cfg.attention_alpha
        return (u, v.reshape(*lead, h, cfg.v_dim), q.reshape(*lead, h, cfg.qk_dim),
                k.reshape(*lead, h, cfg.qk_dim))

    def bias_tables(self) -> tuple[jax.Array, jax.Array]:
        """(pos_w [2 max_len - 1], ts_w [num_buckets + 1]) without their storage padding."""
        return natural(self.pos_w), natural(self.ts_w)

    def position_weights(self, n: int) -> jax.Array:
        """pos_w for a padded length n <= max_len, [2n - 1]: a shorter batch uses the central entries
        (offsets -(n-1)..n-1), so offset j - i reads the same weight whatever the padding."""
        pos_w = natural(self.pos_w)
        if n < self.cfg.max_len:
            pos_w = pos_w[self.cfg.max_len - n : self.cfg.max_len + n - 1]
        return pos_w

    def output(self, x: jax.Array, u: jax.Array, attn: jax.Array) -> jax.Array:
        """Residual output x + W_o(dropout(u * LN(attn))) + b_o; x [..., D], u [..., h*dv], attn [..., h, dv]."""
        gated = gated_layer_norm(attn.reshape(*attn.shape[:-2], -1), u, impl=self.cfg.norm_impl)
        return x + self.dropout(gated) @ self.w_o[...] + self.b_o[...]

    def _bias(self, n: int, timestamps, query_timestamps, buckets) -> dict[str, Any]:
        if not self.cfg.relative_bias:
            return {}
        return dict(pos_w=self.position_weights(n), ts_w=natural(self.ts_w), timestamps=timestamps,
                    query_timestamps=query_timestamps, buckets=buckets)

    def forward_with_kv(self, x: jax.Array, timestamps: jax.Array, lengths: jax.Array,
                        query_timestamps: jax.Array | None = None, *, norm: float | None = None,
                        buckets: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on x [B, N, D], also returning its keys [B, N, h, dqk] and values [B, N, h, dv]
        (what a KV cache keeps). norm: the attention divisor, default `attn_norm or N`; buckets:
        the time buckets [B, N, N] if already computed (the encoder computes them once)."""
        n = x.shape[1]
        u, v, q, k = self.project(x)
        attn = hstu_mha(q, k, v, lengths, norm=norm or self.cfg.attn_norm or n, impl=self.cfg.attention_impl,
                        **self._bias(n, timestamps, query_timestamps, buckets))
        return self.output(x, u, attn), k, v

    def __call__(self, x: jax.Array, timestamps: jax.Array, lengths: jax.Array,
                 query_timestamps: jax.Array | None = None, *, norm: float | None = None,
                 buckets: jax.Array | None = None) -> jax.Array:
        """The block on x [B, N, D] (`forward_with_kv` without the keys and values). Where the
        layout allows (`projection_fusable`), the projection's SiLU and the attention run as one
        op whose kernel backward writes the projection's gradient directly (`projected_mha`)."""
        cfg, n = self.cfg, x.shape[1]
        if cfg.attention_impl in ("xla", "mosaic") or not projection_fusable(cfg.num_heads, cfg.qk_dim, cfg.v_dim):
            return self.forward_with_kv(x, timestamps, lengths, query_timestamps, norm=norm, buckets=buckets)[0]
        u, attn = projected_mha(self.pre_activation(x), lengths, heads=cfg.num_heads, alpha=cfg.attention_alpha,
                                norm=norm or cfg.attn_norm or n, impl=cfg.attention_impl,
                                **self._bias(n, timestamps, query_timestamps, buckets))
        return self.output(x, u, attn)


@register_model("hstu", HSTUConfig)
class HSTU(SequenceModel):
    """items, timestamps [B, N], lengths [B] (+ query times) -> L2-normalised queries [B, N, D];
    `item_table()` holds the L2-normalised item embeddings they are scored against."""

    def __init__(self, cfg: HSTUConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        table = 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (spec.num_items + 1, d), jnp.float32)
        self.item_emb = embedding_table(table.at[0].set(0.0))
        std = math.sqrt(2.0 / (cfg.max_len + d))  # xavier-normal
        self.pos_emb = logical_param(std * jax.random.normal(rngs.params(), (cfg.max_len, d), jnp.float32), ("seq", "embed"))
        self.input_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([HSTUBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self.encode(batch["items"], batch["timestamps"], batch["lengths"], batch.get("next_timestamps"))

    def embed(self, items: jax.Array, positions: jax.Array) -> jax.Array:
        """The encoder input: item_emb(items) * sqrt(D) + pos_emb(positions), [..., D]."""
        return lookup(self.item_emb, items) * math.sqrt(self.cfg.embed_dim) + self.pos_emb[...][positions]

    def encode(self, items: jax.Array, timestamps: jax.Array, lengths: jax.Array,
               query_timestamps: jax.Array | None = None) -> jax.Array:
        """query_timestamps [B, N]: the time of the event each position predicts (`next_timestamps`
        of a train batch; at inference the request time at the last position)."""
        n = items.shape[1]
        valid = (jnp.arange(n)[None, :] < lengths[:, None])[..., None]
        x = self.embed(items, jnp.arange(n)[None])
        x = jnp.where(valid, self.input_dropout(x), 0.0)
        x = constrain(x, ("batch",))  # block boundaries: batch split, the rest whole
        buckets = time_buckets(timestamps, self.cfg.num_buckets, query_timestamps) if self.cfg.relative_bias else None
        for block in self.blocks:
            x = constrain(block(x, timestamps, lengths, query_timestamps, buckets=buckets), ("batch",))
        return l2_normalize(x)

    def item_table(self) -> jax.Array:
        """L2-normalised item embeddings [num_items + 1, D] (the research code's item_l2_norm); the
        whole table in natural order (a full-table read, not a lookup: GSPMD shards it)."""
        return l2_normalize(natural_table(self.item_emb))

    def item_embeddings(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> [..., D]: rows of `item_table()`, looked up, then normalised."""
        return l2_normalize(lookup(self.item_emb, ids))
