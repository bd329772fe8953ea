"""DeepFM (Guo et al., IJCAI'17): an FM and a DNN over the same embeddings, logits added.

    logit = w0 + sum_f w[id_f] + <v, dense> + sum_{i<j} <e_i, e_j> + DNN(flatten(e))

e: the F field embeddings and the D dense features as fields (x_j u_j), F + D vectors of width d.
The size ladder scales the DNN (the FM part is fixed by d), as the CTR zoo scales deep parts.
The FM terms (`FMTerms`, shared with the plain FM of `linear_fm.py`) live in
`scaling/models/feature_interactions.py`.
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
from scaling.models.feature_interactions import FMTerms, fm_flops, fm_pairwise
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.registry import register_model

__all__ = ["DeepFMConfig", "DeepFM"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(dnn=(64, 64)),
    "s": dict(dnn=(128, 128, 128)),
    "m": dict(dnn=(256, 256, 256)),
    "l": dict(dnn=(512, 512, 512)),
    "xl": dict(dnn=(1024, 1024, 1024)),
}


@dataclasses.dataclass(frozen=True)
class DeepFMConfig(CTRModelConfig):
    """DeepFM hyperparameters; `size` scales the DNN."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["deepfm"] = knob("deepfm")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width, shared by the FM and the DNN")
    dnn: tuple[int, ...] = knob(_SIZES["s"]["dnn"], help="hidden widths of the DNN (then 1 logit)")

    def check(self) -> None:
        check_widths("dnn", self.dnn)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        n = spec.num_fields + spec.num_dense
        return fm_flops(spec, self.embed_dim) + mlp_flops(n * self.embed_dim, self.dnn, 1) + 1


@register_model("deepfm", DeepFMConfig)
class DeepFM(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: DeepFMConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        self.terms = FMTerms(spec, config.embed_dim, rngs=rngs)
        self.dnn = MLP((spec.num_fields + spec.num_dense) * config.embed_dim, config.dnn, 1, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e, first = self.terms(batch)
        deep = self.dnn(e.reshape(e.shape[0], -1))[:, 0]
        return (first + fm_pairwise(e) + deep).astype(jnp.float32)
