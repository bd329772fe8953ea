"""Wide & Deep (Cheng et al., DLRS'16): a linear model over the raw features beside a DNN over
the embeddings, trained jointly, logits added.

    wide:  w0 + sum_f w[id_f] + <v, dense>             one weight per id (`FirstOrder`; multi-hot
                                                       fields weigh the mean of their ids' weights)
    deep:  DNN([flatten(E) ; dense])                   E [F + S, d] the field embeddings, the D
                                                       dense features appended raw; ReLU hidden
                                                       layers, then 1 logit
    logit = wide + deep

The paper's wide part also takes hand-made cross-product features; none are given here (the
benchmarks' fields carry no such list), so the wide part is the first-order term, as in the CTR
libraries' WideDeep. The wide and deep parts own separate tables (the paper trains the wide part
with FTRL, the deep with AdaGrad; here the embedding optimizer trains both tables). The size ladder
scales the DNN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.embedding import FieldEmbedding
from scaling.models.feature_interactions import FirstOrder, first_order_flops
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.registry import register_model

__all__ = ["WideDeepConfig", "WideDeep"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(dnn=(64, 64)),
    "s": dict(dnn=(128, 128, 128)),
    "m": dict(dnn=(256, 256, 256)),
    "l": dict(dnn=(512, 512, 512)),
    "xl": dict(dnn=(1024, 1024, 1024)),
}


@dataclasses.dataclass(frozen=True)
class WideDeepConfig(CTRModelConfig):
    """Wide & Deep hyperparameters; `size` scales the DNN."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["wide_deep"] = knob("wide_deep")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: the deep part's embedding width")
    dnn: tuple[int, ...] = knob(_SIZES["s"]["dnn"], help="hidden widths of the DNN (then 1 logit)")

    def check(self) -> None:
        check_widths("dnn", self.dnn)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        deep_in = spec.num_fields * self.embed_dim + spec.num_dense
        return float(first_order_flops(spec) + mlp_flops(deep_in, self.dnn, 1) + 1)


@register_model("wide_deep", WideDeepConfig)
class WideDeep(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: WideDeepConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.wide = FirstOrder(spec, rngs=rngs)
        self.embedding = FieldEmbedding(spec.cardinalities, config.embed_dim, rngs=rngs, bags=spec.bag_cardinalities)
        self.dnn = MLP(spec.num_fields * config.embed_dim + spec.num_dense, config.dnn, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.embedding(batch["sparse"], batch.get("history"))
        dense = batch["dense"].astype(e.dtype)
        deep = self.dnn(jnp.concatenate([e.reshape(e.shape[0], -1), dense], axis=1))[:, 0]
        return (self.wide(batch["sparse"], dense, batch.get("history")) + deep).astype(jnp.float32)
