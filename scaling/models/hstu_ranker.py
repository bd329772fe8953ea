"""HSTU as a ranker (Zhai et al., ICML 2024, section 2.2): the history with the candidate appended,
read by the HSTU layers of 3/7; the candidate's output token scores the impression.

    tokens  = the S sequences' events merged by time, LEFT-aligned  (item_emb + action_emb)  [B, T, d]
    x       = [tokens[:n] ; candidate_emb ; padding] * sqrt(d)       the candidate at position n
    times   = [history times ; request_time ; 0]
    x       = HSTUBlock^K(x, times, lengths = n + 1)                 causal pointwise attention with
                                                                     the relative position/time bias
    logit   = MLP(concat(LN(x[n]), features))

Target-aware in HSTU's sense: the candidate attends every history event (and itself) through the
same SiLU attention and time buckets the retrieval model uses; history tokens never see the
candidate, so the history's keys and values are candidate-independent (M-FALCON,
`hstu_mfalcon.py`, scores many candidates from one cached history on the same principle). There is
no position embedding: the relative bias carries order and time. `HSTUConfig.encoder_flops`
counts the layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import RankingSpec
from scaling.kernels.dispatch import IMPL_HELP, KernelImpl
from scaling.models.base import CTRModel
from scaling.models.hstu import HSTUBlock, HSTUConfig
from scaling.models.hstu_attention import next_timestamps, time_buckets
from scaling.models.mlp import MLP, LayerNorm, check_widths, layer_norm_flops, mlp_flops
from scaling.models.ranking_inputs import RankingInputs, RankingModelConfig
from scaling.models.registry import register_model

__all__ = ["HSTURankerConfig", "HSTURanker"]

_LATEST = jnp.iinfo(jnp.int32).max  # sorts padding after every real timestamp

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(embed_dim=24, num_layers=1, num_heads=1, qk_dim=24, v_dim=24),
    "s": dict(embed_dim=32, num_layers=2, num_heads=2, qk_dim=16, v_dim=16),
    "m": dict(embed_dim=48, num_layers=2, num_heads=2, qk_dim=24, v_dim=24),
    "l": dict(embed_dim=64, num_layers=3, num_heads=2, qk_dim=32, v_dim=32),
    "xl": dict(embed_dim=96, num_layers=4, num_heads=4, qk_dim=24, v_dim=24),
}


@dataclasses.dataclass(frozen=True)
class HSTURankerConfig(RankingModelConfig):
    """HSTU-as-ranker hyperparameters (the HSTU ladder of 3/7 without its history length, which
    the data fixes here); `size` names a preset."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["hstu_ranker"] = knob("hstu_ranker")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(32, ge=1, help="d: item/action embedding and residual width")
    field_dim: int = knob(8, ge=1, help="embedding width of the other categorical fields")
    num_layers: int = knob(2, ge=1)
    num_heads: int = knob(2, ge=1)
    qk_dim: int = knob(16, ge=1, help="query/key width per head")
    v_dim: int = knob(16, ge=1, help="value width per head")
    num_buckets: int = knob(128, ge=1, help="log-spaced time-gap buckets of the relative bias")
    dropout: float = knob(0.0, ge=0.0, lt=1.0, help="output-projection dropout")
    seq_len: int = knob(0, ge=0, help="most recent events read per sequence (0: all the data gives)")
    head_mlp: tuple[int, ...] = knob((64,), help="hidden widths of the head over the candidate token")
    attention_impl: KernelImpl = knob("auto", help=f"HSTU attention. {IMPL_HELP}")
    norm_impl: KernelImpl = knob("auto", help=f"HSTU's LayerNorms and output gate. {IMPL_HELP}")

    def check(self) -> None:
        check_widths("head_mlp", self.head_mlp)

    def tokens(self, spec: RankingSpec) -> int:
        """The encoder's length: every event of every sequence, then the candidate."""
        return spec.num_sequences * self.events_read(spec) + 1

    def hstu_config(self, spec: RankingSpec) -> HSTUConfig:
        """The HSTU layers' config (attention divided by the padded length, as in 3/7)."""
        return HSTUConfig(embed_dim=self.embed_dim, num_layers=self.num_layers, num_heads=self.num_heads,
                          qk_dim=self.qk_dim, v_dim=self.v_dim, max_len=self.tokens(spec),
                          num_buckets=self.num_buckets, dropout=self.dropout, attention_impl=self.attention_impl,
                          norm_impl=self.norm_impl)

    def flops_per_example(self, spec: RankingSpec) -> float:
        """Events (add, padding select), the candidate's placement, the HSTU layers (3/7's count),
        the candidate token's LayerNorm and the head. Gathers and the merge's sort are not counted."""
        n, d = self.tokens(spec), self.embed_dim
        events = (n - 1) * 2 * d + 2 * n * d
        head = layer_norm_flops(d) + mlp_flops(d + self.feature_width(spec), self.head_mlp, 1)
        return float(events + self.hstu_config(spec).encoder_flops(n) + head)


@register_model("hstu_ranker", HSTURankerConfig)
class HSTURanker(CTRModel):
    """Ranking batch (RankingSpec) -> logits [B]."""

    def __init__(self, config: HSTURankerConfig, spec: RankingSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.hstu = config.hstu_config(spec)
        self.inputs = RankingInputs(spec, config.embed_dim, config.field_dim, config.seq_len, rngs=rngs)
        self.blocks = nnx.List([HSTUBlock(self.hstu, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = LayerNorm(config.embed_dim)
        self.head = MLP(config.embed_dim + config.feature_width(spec), config.head_mlp, 1, rngs=rngs)

    def sequence(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """-> (x [B, T+1, d], times [B, T+1], query times [B, T+1], n [B]: the candidate's position)."""
        events, _, times, valid = self.inputs.history(batch)
        B, d = events.shape[0], events.shape[-1]
        x, ts, ok = events.reshape(B, -1, d), times.reshape(B, -1), valid.reshape(B, -1)
        order = jnp.argsort(jnp.where(ok, ts, _LATEST), axis=1, stable=True)
        x, ts = jnp.take_along_axis(x, order[..., None], axis=1), jnp.take_along_axis(ts, order, axis=1)
        n = ok.sum(1)
        x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
        ts = jnp.concatenate([jnp.where(jnp.take_along_axis(ok, order, axis=1), ts, 0), jnp.zeros_like(ts[:, :1])], 1)
        at = jnp.arange(x.shape[1])[None, :] == n[:, None]
        request = batch["request_time"].astype(ts.dtype)
        x = jnp.where(at[..., None], self.inputs.candidate(batch)[:, None, :], x) * math.sqrt(d)
        ts = jnp.where(at, request[:, None], ts)
        query = jnp.where(at, request[:, None], next_timestamps(ts))
        return x, ts, query, n

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        x, ts, query, n = self.sequence(batch)
        buckets = time_buckets(ts, self.hstu.num_buckets, query)
        for block in self.blocks:
            x = block(x, ts, n + 1, query, buckets=buckets)
        out = jnp.take_along_axis(x, n[:, None, None], axis=1)[:, 0]
        h = jnp.concatenate([self.norm(out), self.inputs.features(batch)], axis=-1)
        return self.head(h)[:, 0].astype(jnp.float32)

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
