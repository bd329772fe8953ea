"""OneTrans (Zhang et al., WWW'26) as a ranking family: one Transformer over behaviour-sequence and
feature tokens, scored from its final feature tokens.

    events_i  = [item_emb + action_emb, gap]                      each sequence i: [B, L, de + 1]
    S-tokens  = merge(SequenceTokenizer(events_1..events_S))      [B, T, d]  (T = S L by time, or
                                                                  S L + S with [SEP] tokens)
    NS-tokens = NSTokenizer(concat(features, candidate_emb))      [B, N, d]  (auto-split)
    out       = OneTransStack(S-tokens, NS-tokens)                [B, N, d]  (pyramid, mixed params)
    logit     = MLP(flatten(out))                                 [B]

The pieces are `scaling/models/onetrans_tokenizer.py` and `onetrans_block.py`; the inputs
(`ranking_inputs.py`) are shared with DIN and HSTU-as-ranker. Cross-request caching at inference:
`sequence_cache(batch)` runs the S side once per request, `candidate_logits(cache, candidates)`
scores C candidates per request from their NS-tokens alone; the logits equal the full forward of
each (request, candidate) pair (tests/test_onetrans_model.py).

The size ladder grows depth, width, heads and NS count together (the paper's OneTrans-S -> L
grows depth and width); `seq_len` (events read per sequence) is the fifth knob.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import ConfigError, knob
from scaling.data.spec import RankingSpec
from scaling.kernels.dispatch import IMPL_HELP, KernelImpl
from scaling.models.base import CTRModel
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.onetrans_block import OneTransStack, onetrans_stack_flops, pyramid_schedule
from scaling.models.onetrans_tokenizer import NSTokenizer, SequenceTokenizer, merge_by_time, merge_with_separators
from scaling.models.ranking_inputs import GAP_FLOPS, RankingInputs, RankingModelConfig
from scaling.models.registry import register_model
from scaling.models.transformer import Activation
from scaling.sharding.annotate import logical_param

__all__ = ["OneTransConfig", "OneTrans"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, num_ns=4),
    "s": dict(dim=48, num_layers=2, num_heads=2, ffn_dim=128, num_ns=4),
    "m": dict(dim=64, num_layers=2, num_heads=4, ffn_dim=256, num_ns=8),
    "l": dict(dim=96, num_layers=3, num_heads=4, ffn_dim=384, num_ns=8),
    "xl": dict(dim=128, num_layers=4, num_heads=4, ffn_dim=512, num_ns=12),
}


@dataclasses.dataclass(frozen=True)
class OneTransConfig(RankingModelConfig):
    """OneTrans hyperparameters; `size` names a preset of SIZES."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["onetrans"] = knob("onetrans")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="de: item and action embedding width")
    field_dim: int = knob(8, ge=1, help="embedding width of the other categorical fields")
    dim: int = knob(_SIZES["s"]["dim"], ge=1, help="d: token width")
    num_layers: int = knob(_SIZES["s"]["num_layers"], ge=1)
    num_heads: int = knob(_SIZES["s"]["num_heads"], ge=1)
    ffn_dim: int = knob(_SIZES["s"]["ffn_dim"], ge=1, help="FFN hidden width")
    num_ns: int = knob(_SIZES["s"]["num_ns"], ge=1, help="N: NS-tokens (auto-split of one MLP)")
    ns_hidden: tuple[int, ...] = knob((), help="hidden widths of the NS tokenizer's MLP")
    seq_len: int = knob(0, ge=0, help="most recent events read per sequence (0: all the data gives)")
    merge: Literal["time", "separators"] = knob("time", help="S-token merge: by timestamp, or [SEP]-separated")
    pyramid: bool = knob(True, help="shrink the S queries linearly across layers")
    pyramid_multiple: int = knob(8, ge=1, help="pyramid lengths are multiples of this")
    activation: Activation = knob("relu", help="FFN activation")
    head_mlp: tuple[int, ...] = knob((64,), help="hidden widths of the head over the final NS-tokens")
    attention_impl: KernelImpl = knob("auto", help=f"the stack's softmax attention (scaling/kernels/flash_attention.py). "
                                                   f"{IMPL_HELP}")

    def check(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError("num_heads", f"expected a divisor of dim ({self.dim}), got {self.num_heads}")
        check_widths("ns_hidden", self.ns_hidden)
        check_widths("head_mlp", self.head_mlp)

    def tokens(self, spec: RankingSpec) -> int:
        """T: S-tokens after the merge."""
        events = spec.num_sequences * self.events_read(spec)
        return events + (spec.num_sequences if self.merge == "separators" else 0)

    def schedule(self, spec: RankingSpec) -> tuple[int, ...]:
        return pyramid_schedule(self.tokens(spec), self.num_ns, self.num_layers, multiple=self.pyramid_multiple,
                                enabled=self.pyramid)

    def ns_width(self, spec: RankingSpec) -> int:
        return self.feature_width(spec) + self.embed_dim

    def flops_per_example(self, spec: RankingSpec) -> float:
        """Forward FLOPs: event embeddings (the item + action add, the padding select, the gap), the
        tokenizers, the stack and the head; gathers and the merge's sort are not counted."""
        L, S, de = self.events_read(spec), spec.num_sequences, self.embed_dim
        events = S * L * (2 * de + GAP_FLOPS)
        tokenizer = SequenceTokenizer.flops([de + 1] * S, [L] * S, self.dim)
        ns = NSTokenizer.flops(self.ns_width(spec), self.num_ns, self.dim, self.ns_hidden)
        stack = onetrans_stack_flops(self.tokens(spec), self.num_ns, self.dim, self.num_heads, self.ffn_dim,
                                     self.schedule(spec), activation=self.activation)
        return float(events + tokenizer + ns + stack + mlp_flops(self.num_ns * self.dim, self.head_mlp, 1))


@register_model("onetrans", OneTransConfig)
class OneTrans(CTRModel):
    """Ranking batch (RankingSpec) -> logits [B]."""

    def __init__(self, config: OneTransConfig, spec: RankingSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        c = config
        self.inputs = RankingInputs(spec, c.embed_dim, c.field_dim, c.seq_len, rngs=rngs)
        S = spec.num_sequences
        self.tokenizer = SequenceTokenizer([c.embed_dim + 1] * S, c.dim, rngs=rngs)
        self.separators = (logical_param(0.02 * jax.random.normal(rngs.params(), (S, c.dim)), (None, "embed"))
                           if c.merge == "separators" else None)
        self.ns_tokenizer = NSTokenizer(c.ns_width(spec), c.num_ns, c.dim, c.ns_hidden, rngs=rngs)
        self.stack = OneTransStack(c.num_layers, c.dim, c.num_heads, c.ffn_dim, c.num_ns, c.schedule(spec),
                                   activation=c.activation, attention_impl=c.attention_impl, rngs=rngs)
        self.head = MLP(c.num_ns * c.dim, c.head_mlp, 1, rngs=rngs)

    def s_tokens(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """-> (S-tokens [B, T, d] right-aligned, valid [B, T])."""
        events, gaps, times, valid = self.inputs.history(batch)
        S = events.shape[1]
        feats = [jnp.concatenate([events[:, i], gaps[:, i, :, None]], axis=-1) for i in range(S)]
        tokens = self.tokenizer(feats, [valid[:, i] for i in range(S)])
        if self.separators is None:
            return merge_by_time(tokens, [times[:, i] for i in range(S)], [valid[:, i] for i in range(S)])
        return merge_with_separators(tokens, [valid[:, i] for i in range(S)], self.separators[...])

    def ns_tokens(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """NS-tokens [..., N, d] for a batch whose sparse/dense have leading axes [...] ([B] or [B, C])."""
        x = jnp.concatenate([self.inputs.features(batch), self.inputs.candidate(batch)], axis=-1)
        lead = x.shape[:-1]
        return self.ns_tokenizer(x.reshape(-1, x.shape[-1])).reshape(*lead, self.config.num_ns, self.config.dim)

    def _logits(self, ns_out: jax.Array) -> jax.Array:
        return self.head(ns_out.reshape(*ns_out.shape[:-2], -1))[..., 0].astype(jnp.float32)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        s, s_valid = self.s_tokens(batch)
        return self._logits(self.stack(s, self.ns_tokens(batch), s_valid))

    # -- cross-request KV caching ----------------------------------------------------------------
    def sequence_cache(self, batch: Mapping[str, jax.Array]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """Stage I, once per request: each layer's S keys/values (batch: the requests' history
        keys and request_time)."""
        s, s_valid = self.s_tokens(batch)
        return self.stack.sequence_cache(s, s_valid)

    def candidate_logits(self, cache: list[tuple[jax.Array, jax.Array, jax.Array]],
                         candidates: Mapping[str, jax.Array]) -> jax.Array:
        """Stage II: candidates {'sparse' [B, C, F], 'dense' [B, C, D]} (C per request) -> logits [B, C]."""
        return self._logits(self.stack.candidate_forward(cache, self.ns_tokens(candidates)))

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
