"""DIN (Zhou et al., KDD'18) as a ranking family: target attention over each behaviour sequence.

    h_ij  = item_emb + action_emb + gap_ij * w_gap          event j of sequence i   [B, S, L, d]
    u_i   = TargetAttention_i(h_i, candidate_emb)           one pooled vector per sequence
    logit = MLP(concat(u_1..u_S, candidate_emb, features))

The candidate and the history share the item table (`ranking_inputs.py`), so the activation unit
compares them directly; `w_gap` lets an event's age shift its vector (DIN itself has no time
signal; the ranking view's teacher discounts old events, so the baseline gets the same inputs as
the others). The size ladder scales the embedding width and the MLP, DIN's natural knobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import RankingSpec
from scaling.models.base import CTRModel
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.ranking_inputs import GAP_FLOPS, RankingInputs, RankingModelConfig
from scaling.models.registry import register_model
from scaling.models.target_attention import TargetAttention
from scaling.sharding.annotate import logical_param

__all__ = ["DINConfig", "DIN"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(embed_dim=16, mlp=(64, 32)),
    "s": dict(embed_dim=16, mlp=(128, 64)),
    "m": dict(embed_dim=32, mlp=(256, 128)),
    "l": dict(embed_dim=32, mlp=(512, 256, 128)),
    "xl": dict(embed_dim=64, mlp=(1024, 512, 256)),
}


@dataclasses.dataclass(frozen=True)
class DINConfig(RankingModelConfig):
    """DIN hyperparameters; `size` names a preset of SIZES."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["din"] = knob("din")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: item and action embedding width")
    field_dim: int = knob(8, ge=1, help="embedding width of the other categorical fields")
    attention_hidden: tuple[int, ...] = knob((80, 40), help="hidden widths of the activation unit")
    mlp: tuple[int, ...] = knob(_SIZES["s"]["mlp"], help="hidden widths of the prediction MLP")
    seq_len: int = knob(0, ge=0, help="most recent events read per sequence (0: all the data gives)")

    def check(self) -> None:
        check_widths("attention_hidden", self.attention_hidden)
        check_widths("mlp", self.mlp)

    def flops_per_example(self, spec: RankingSpec) -> float:
        """Events (add, select, gap; the gap's vector: multiply and add), the S target attentions,
        the MLP. Gathers are not counted."""
        L, S, d = self.events_read(spec), spec.num_sequences, self.embed_dim
        events = S * L * (2 * d + GAP_FLOPS + 2 * d)
        attention = S * TargetAttention.flops(L, d, self.attention_hidden)
        top = mlp_flops(S * d + d + self.feature_width(spec), self.mlp, 1)
        return float(events + attention + top)


@register_model("din", DINConfig)
class DIN(CTRModel):
    """Ranking batch (RankingSpec) -> logits [B]."""

    def __init__(self, config: DINConfig, spec: RankingSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, S = config.embed_dim, spec.num_sequences
        self.inputs = RankingInputs(spec, d, config.field_dim, config.seq_len, rngs=rngs)
        self.gap_vector = logical_param(0.02 * jax.random.normal(rngs.params(), (d,)), ("embed",))
        self.attention = nnx.List([TargetAttention(d, config.attention_hidden, rngs=rngs) for _ in range(S)])
        self.mlp = MLP(S * d + d + config.feature_width(spec), config.mlp, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        events, gaps, _, valid = self.inputs.history(batch)
        events = events + gaps[..., None] * self.gap_vector[...]
        target = self.inputs.candidate(batch)
        pooled = [att(events[:, i], valid[:, i], target) for i, att in enumerate(self.attention)]
        x = jnp.concatenate([*pooled, target, self.inputs.features(batch)], axis=-1)
        return self.mlp(x)[:, 0].astype(jnp.float32)

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
