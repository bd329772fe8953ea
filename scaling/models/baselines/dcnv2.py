"""DCNv2 (Wang et al., WWW'21): a cross network of explicit bounded-degree interactions beside (or
under) a DNN.

    x0 = [flatten(E) ; dense]                                D' = F d + D
    cross: x_{l+1} = x0 * (W_l x_l + b_l) + x_l              W_l full [D', D'] or low-rank U_l V_l^T
    parallel: logit = w^T [cross(x0) ; DNN(x0)] + b
    stacked:  logit = w^T DNN(cross(x0)) + b

The size ladder follows the Wukong paper's DCNv2 baseline: 2 cross layers of rank r fixed, the deep
MLP scaled ("scaling the cross net gave nothing").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config_schema import ConfigError, knob
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.embedding import FieldEmbedding
from scaling.models.feature_interactions import CrossNetwork, cross_network_flops
from scaling.models.mlp import MLP, Linear, check_widths, linear_flops, mlp_flops
from scaling.models.registry import register_model

__all__ = ["DCNv2Config", "DCNv2"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(dnn=(64, 64)),
    "s": dict(dnn=(128, 128, 128)),
    "m": dict(dnn=(256, 256, 256, 256)),
    "l": dict(dnn=(512, 512, 512, 512)),
    "xl": dict(dnn=(1024, 1024, 1024, 1024)),
}


@dataclasses.dataclass(frozen=True)
class DCNv2Config(CTRModelConfig):
    """DCNv2 hyperparameters; `size` scales the deep MLP."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["dcnv2"] = knob("dcnv2")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width")
    structure: Literal["parallel", "stacked"] = knob("parallel", help="cross beside the DNN, or the DNN on the cross output")
    cross_layers: int = knob(2, ge=1, help="cross layers")
    cross_rank: int = knob(64, ge=0, help="rank r of each cross layer's W = U V^T (0: full rank)")
    dnn: tuple[int, ...] = knob(_SIZES["s"]["dnn"], help="hidden widths of the deep MLP")

    def check(self) -> None:
        check_widths("dnn", self.dnn)
        if not self.dnn:
            raise ConfigError("dnn", "expected at least one hidden width (the head reads the last)")

    def width(self, spec: CTRFeatureSpec) -> int:
        return spec.num_fields * self.embed_dim + spec.num_dense

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        w = self.width(spec)
        flops = cross_network_flops(w, self.cross_layers, self.cross_rank)
        hidden = self.dnn[-1]
        # the DNN's hidden layers (mlp_flops to the last hidden width, plus its ReLU)
        flops += mlp_flops(w, self.dnn[:-1], hidden) + hidden
        head_in = w + hidden if self.structure == "parallel" else hidden
        return flops + linear_flops(head_in, 1)


@register_model("dcnv2", DCNv2Config)
class DCNv2(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: DCNv2Config, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        w = config.width(spec)
        self.embedding = FieldEmbedding(spec.cardinalities, config.embed_dim, rngs=rngs, bags=spec.bag_cardinalities)
        self.cross = CrossNetwork(w, config.cross_layers, config.cross_rank, rngs=rngs)
        # the DNN's last hidden layer is its output (ReLU applied here), the head is a separate Linear
        self.dnn = MLP(w, config.dnn[:-1], config.dnn[-1], rngs=rngs)
        hidden = config.dnn[-1]
        head_in = w + hidden if config.structure == "parallel" else hidden
        self.head = Linear(head_in, 1, axes=("embed", None), rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.embedding(batch["sparse"], batch.get("history"))
        x0 = jnp.concatenate([e.reshape(e.shape[0], -1), batch["dense"].astype(e.dtype)], axis=1)
        if self.config.structure == "parallel":
            h = jnp.concatenate([self.cross(x0), jax.nn.relu(self.dnn(x0))], axis=1)
        else:
            h = jax.nn.relu(self.dnn(self.cross(x0)))
        return self.head(h)[:, 0].astype(jnp.float32)
