"""DLRM (Naumov et al., 2019), the Wukong paper's baseline: dot interactions + MLPs.

    z   = bottom MLP(dense) -> d                 (hidden widths `bottom_mlp`, then a projection)
    Z   = [z ; field embeddings]                 F' = F + 1 rows of width d
    I   = strict upper triangle of Z Z^T         F'(F'-1)/2 values
    logit = top MLP(concat(z, I))                (hidden widths `top_mlp`, then 1 logit)

With no dense features, Z is the field embeddings alone and z is dropped from the top input.
The size ladder scales the top MLP, as the Wukong paper does for its DLRM baseline (Table 5:
TopMLP 2x512 -> 4x512 -> 4x2048 ...), keeping the bottom MLP fixed.
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
from scaling.models.embedding import FieldEmbedding
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.registry import register_model
from scaling.sharding.rules import constrain

__all__ = ["DLRMConfig", "DLRM", "dot_interaction"]

_SIZES: dict[str, dict[str, Any]] = {
    "xxs": dict(top_mlp=(16, 16)),
    "xxs+": dict(top_mlp=(32, 32)),
    "xs": dict(top_mlp=(64, 64)),
    "xs+": dict(top_mlp=(96, 96, 96)),
    "s": dict(top_mlp=(128, 128, 128, 128)),
    "s+": dict(top_mlp=(192, 192, 192, 192)),
    "m": dict(top_mlp=(256, 256, 256, 256)),
    "m+": dict(top_mlp=(384, 384, 384, 384)),
    "l": dict(top_mlp=(512, 512, 512, 512)),
    "l+": dict(top_mlp=(768, 768, 768, 768)),
    "xl": dict(top_mlp=(1024, 1024, 1024, 1024)),
}


@dataclasses.dataclass(frozen=True)
class DLRMConfig(CTRModelConfig):
    """DLRM hyperparameters. `size` names a preset of SIZES (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["dlrm"] = knob("dlrm")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(16, ge=1, help="d: embedding width (the bottom MLP projects dense features to d)")
    bottom_mlp: tuple[int, ...] = knob((64, 32), help="hidden widths of the bottom MLP (then a projection to d)")
    top_mlp: tuple[int, ...] = knob(_SIZES["s"]["top_mlp"], help="hidden widths of the top MLP (then 1 logit)")

    def check(self) -> None:
        check_widths("bottom_mlp", self.bottom_mlp)
        check_widths("top_mlp", self.top_mlp)

    def num_interacting(self, spec: CTRFeatureSpec) -> int:
        """F': the embeddings that interact (fields, plus the dense vector when there is one)."""
        return spec.num_fields + (1 if spec.num_dense > 0 else 0)

    def top_in_features(self, spec: CTRFeatureSpec) -> int:
        f = self.num_interacting(spec)
        return f * (f - 1) // 2 + (self.embed_dim if spec.num_dense > 0 else 0)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        """Forward FLOPs per example: 2 x multiply-adds plus elementwise ops (see scaling.models.mlp).

        The interaction is counted as computed, the full F' x F' Gram matrix (2 F'^2 d), though
        only its strict upper triangle is used. Embedding gathers are excluded.
        """
        d, f = self.embed_dim, self.num_interacting(spec)
        flops = 2.0 * f * f * d
        if spec.num_dense > 0:
            flops += mlp_flops(spec.num_dense, self.bottom_mlp, d)
        return flops + mlp_flops(self.top_in_features(spec), self.top_mlp, 1)


def dot_interaction(z: jax.Array) -> jax.Array:
    """[B, F', d] -> [B, F'(F'-1)/2]: z_i . z_j for i < j, row-major (0,1), (0,2), ..., (1,2), ..."""
    f = z.shape[1]
    gram = jnp.einsum("bfd,bgd->bfg", z, z)
    rows, cols = np.triu_indices(f, k=1)
    return gram.reshape(z.shape[0], f * f)[:, rows * f + cols]


@register_model("dlrm", DLRMConfig)
class DLRM(CTRModel):
    """DLRM CTR model: batch {'sparse' int32 [B, F], 'dense' float [B, D]} -> logits float32 [B]."""

    def __init__(self, config: DLRMConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.embedding = FieldEmbedding(spec.cardinalities, config.embed_dim, rngs=rngs, bags=spec.bag_cardinalities)
        self.bottom = (
            MLP(spec.num_dense, config.bottom_mlp, config.embed_dim, rngs=rngs) if spec.num_dense > 0 else None
        )
        self.top = MLP(config.top_in_features(spec), config.top_mlp, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.embedding(batch["sparse"], batch.get("history"))
        e = constrain(e, ("batch",))  # block boundaries: batch split, the rest whole
        if self.bottom is None:
            features = dot_interaction(e)
        else:
            z = self.bottom(batch["dense"].astype(e.dtype))
            inter = dot_interaction(jnp.concatenate([z[:, None, :], e], axis=1))
            features = jnp.concatenate([z, inter], axis=1)
        features = constrain(features, ("batch",))
        return self.top(features)[:, 0].astype(jnp.float32)

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
