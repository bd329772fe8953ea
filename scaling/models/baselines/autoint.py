"""AutoInt+ (Song et al., CIKM'19): multi-head self-attention over the fields, plus a DNN.

    e: the F field embeddings and the D dense features as fields (x_j u_j), N = F + D vectors of width d
    layer l (input X [N, d_l]):   head h: softmax(Q_h K_h^T / sqrt(dh)) V_h,  Q_h = X W_Q,h (no bias) ...
                                  X' = ReLU(concat_h(head_h) + X W_res)          [N, H dh]
    logit = w^T flatten(X_L) + b  +  DNN(flatten(e))                              (the "+": a DNN logit)

The scores are scaled by 1/sqrt(dh) (the paper's code makes scaling optional). The size ladder
grows the attention (layers, heads, head width) and the DNN together, the Wukong paper's knobs.
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
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.feature_interactions import FieldVectors
from scaling.models.mlp import MLP, Linear, check_widths, linear_flops, mlp_flops
from scaling.models.registry import register_model
from scaling.models.transformer import SOFTMAX_FLOPS_PER_SCORE, dot_product_attention
from scaling.sharding.annotate import logical_param

__all__ = ["AutoIntConfig", "AutoInt", "FieldSelfAttention"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(attention_layers=2, num_heads=2, head_dim=8, dnn=(64, 64)),
    "s": dict(attention_layers=3, num_heads=2, head_dim=16, dnn=(128, 128, 128)),
    "m": dict(attention_layers=3, num_heads=4, head_dim=16, dnn=(256, 256, 256)),
    "l": dict(attention_layers=3, num_heads=4, head_dim=32, dnn=(512, 512, 512)),
    "xl": dict(attention_layers=4, num_heads=8, head_dim=32, dnn=(1024, 1024, 1024)),
}


class FieldSelfAttention(nnx.Module):
    """One AutoInt layer: X [B, N, d_in] -> ReLU(multi-head attention + X W_res) [B, N, H dh]."""

    def __init__(self, d_in: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        std = 1.0 / np.sqrt(d_in)
        shape, axes = (d_in, num_heads, head_dim), ("embed", "heads", "kv")
        self.w_q = logical_param(std * jax.random.normal(rngs.params(), shape), axes)
        self.w_k = logical_param(std * jax.random.normal(rngs.params(), shape), axes)
        self.w_v = logical_param(std * jax.random.normal(rngs.params(), shape), axes)
        self.w_res = logical_param(std * jax.random.normal(rngs.params(), shape), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v, res = (jnp.einsum("bnd,dhk->bnhk", x, w[...].astype(x.dtype))
                        for w in (self.w_q, self.w_k, self.w_v, self.w_res))
        out = jax.nn.relu(dot_product_attention(q, k, v, None) + res)
        return out.reshape(x.shape[0], x.shape[1], -1)


def field_attention_flops(n: int, d_in: int, num_heads: int, head_dim: int) -> float:
    """Q, K, V and the residual projection (4 x 2 N d_in H dh), the query scaling, the full N x N
    scores and weighted values (2 x 2 N^2 H dh), the unmasked softmax, the residual add and ReLU."""
    inner = num_heads * head_dim
    return float(8.0 * n * d_in * inner + n * inner + 4.0 * n * n * inner
                 + (SOFTMAX_FLOPS_PER_SCORE - 2) * n * n * num_heads + 2 * n * inner)


@dataclasses.dataclass(frozen=True)
class AutoIntConfig(CTRModelConfig):
    """AutoInt+ hyperparameters; `size` names a preset (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["autoint"] = knob("autoint")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width")
    attention_layers: int = knob(3, ge=1, help="self-attention layers over the fields")
    num_heads: int = knob(2, ge=1, help="attention heads per layer")
    head_dim: int = knob(16, ge=1, help="width of each head (a layer outputs num_heads x head_dim per field)")
    dnn: tuple[int, ...] = knob(_SIZES["s"]["dnn"], help="hidden widths of the DNN beside the attention (then 1 logit)")

    def check(self) -> None:
        check_widths("dnn", self.dnn)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        n, d, inner = spec.num_fields + spec.num_dense, self.embed_dim, self.num_heads * self.head_dim
        flops = spec.num_dense * d  # the dense fields
        width = d
        for _ in range(self.attention_layers):
            flops += field_attention_flops(n, width, self.num_heads, self.head_dim)
            width = inner
        flops += linear_flops(n * inner, 1) + mlp_flops(n * d, self.dnn, 1) + 1
        return float(flops)


@register_model("autoint", AutoIntConfig)
class AutoInt(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: AutoIntConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, inner = config.embed_dim, config.num_heads * config.head_dim
        n = spec.num_fields + spec.num_dense
        self.fields = FieldVectors(spec, d, rngs=rngs)
        self.layers = nnx.List([FieldSelfAttention(d if i == 0 else inner, config.num_heads, config.head_dim, rngs=rngs)
                                for i in range(config.attention_layers)])
        self.head = Linear(n * inner, 1, axes=("embed", None), rngs=rngs)
        self.dnn = MLP(n * d, config.dnn, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.fields(batch["sparse"], batch["dense"], batch.get("history"))
        x = e
        for layer in self.layers:
            x = layer(x)
        logit = self.head(x.reshape(x.shape[0], -1))[:, 0] + self.dnn(e.reshape(e.shape[0], -1))[:, 0]
        return logit.astype(jnp.float32)
