"""xDeepFM (Lian et al., KDD'18): a Compressed Interaction Network beside a DNN and a linear term.

    X^0 = e [N, d]   (the F field embeddings and the D dense features as fields, N = F + D)
    CIN layer k:  X^k_h = sum_{i, j} W^k_{h,i,j} (X^{k-1}_i * X^0_j)     [H_k, d]   (vector-wise, degree k+1)
    p^k = sum over d of X^k                                           [H_k]     (sum pooling)
    logit = LR(ids, dense) + w^T [p^1 ; ... ; p^K] + b + DNN(flatten(e))

The size ladder grows the CIN (layers x width, the Wukong paper's knob) and the DNN together.
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
from scaling.models.feature_interactions import FieldVectors, FirstOrder, first_order_flops
from scaling.models.mlp import MLP, Linear, check_widths, linear_flops, mlp_flops
from scaling.models.registry import register_model
from scaling.sharding.annotate import logical_param

__all__ = ["XDeepFMConfig", "XDeepFM", "CompressedInteraction"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(cin=(16, 16), dnn=(64, 64)),
    "s": dict(cin=(32, 32, 32), dnn=(128, 128)),
    "m": dict(cin=(64, 64, 64), dnn=(256, 256, 256)),
    "l": dict(cin=(128, 128, 128), dnn=(512, 512, 512)),
    "xl": dict(cin=(256, 256, 256), dnn=(1024, 1024, 1024)),
}


class CompressedInteraction(nnx.Module):
    """The CIN: x0 [B, N, d] -> sum-pooled feature maps of every layer [B, sum_k H_k]."""

    def __init__(self, num_fields: int, widths: tuple[int, ...], *, rngs: nnx.Rngs):
        self.weights = nnx.List()
        previous = num_fields
        for h in widths:
            fan_in = previous * num_fields
            self.weights.append(logical_param(jax.random.normal(rngs.params(), (h, previous, num_fields)) / np.sqrt(fan_in),
                                              ("mlp", None, "fields")))
            previous = h

    def __call__(self, x0: jax.Array) -> jax.Array:
        x, pooled = x0, []
        for w in self.weights:
            z = x[:, :, None, :] * x0[:, None, :, :]                   # [B, H_{k-1}, N, d]
            x = jnp.einsum("bijd,hij->bhd", z, w[...].astype(x0.dtype))  # [B, H_k, d]
            pooled.append(x.sum(axis=-1))
        return jnp.concatenate(pooled, axis=1)


def cin_flops(num_fields: int, widths: tuple[int, ...], dim: int) -> float:
    """Per layer: the outer products (H_{k-1} N d), the compression (2 H_k H_{k-1} N d) and the
    sum pooling (H_k d)."""
    flops, previous = 0.0, num_fields
    for h in widths:
        flops += previous * num_fields * dim + 2.0 * h * previous * num_fields * dim + h * dim
        previous = h
    return float(flops)


@dataclasses.dataclass(frozen=True)
class XDeepFMConfig(CTRModelConfig):
    """xDeepFM hyperparameters; `size` names a preset (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["xdeepfm"] = knob("xdeepfm")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width")
    cin: tuple[int, ...] = knob(_SIZES["s"]["cin"], help="feature maps H_k of each CIN layer")
    dnn: tuple[int, ...] = knob(_SIZES["s"]["dnn"], help="hidden widths of the DNN (then 1 logit)")

    def check(self) -> None:
        check_widths("cin", self.cin)
        check_widths("dnn", self.dnn)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        n, d = spec.num_fields + spec.num_dense, self.embed_dim
        return float(first_order_flops(spec) + spec.num_dense * d + cin_flops(n, self.cin, d)
                     + linear_flops(sum(self.cin), 1) + mlp_flops(n * d, self.dnn, 1) + 2)


@register_model("xdeepfm", XDeepFMConfig)
class XDeepFM(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: XDeepFMConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, n = config.embed_dim, spec.num_fields + spec.num_dense
        self.fields = FieldVectors(spec, d, rngs=rngs)
        self.linear = FirstOrder(spec, rngs=rngs)
        self.cin = CompressedInteraction(n, config.cin, rngs=rngs)
        self.cin_head = Linear(sum(config.cin), 1, axes=("mlp", None), rngs=rngs)
        self.dnn = MLP(n * d, config.dnn, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.fields(batch["sparse"], batch["dense"], batch.get("history"))
        dense = batch["dense"].astype(e.dtype)
        logit = (self.linear(batch["sparse"], dense, batch.get("history")) + self.cin_head(self.cin(e))[:, 0]
                 + self.dnn(e.reshape(e.shape[0], -1))[:, 0])
        return logit.astype(jnp.float32)
