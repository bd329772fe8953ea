"""MaskNet, serial (Wang, She and Zhang, DLP-KDD'21): instance-guided masks over a stack of
MaskBlocks.

    E: the F field embeddings (S pooled bags after them) and the D dense features as fields
       (x_j u_j), N = F + S + D vectors of width d;   V_emb = flatten(E)            [N d]
    V_0 = flatten(LN_f(E))                              each field's vector layer-normalized, with
                                                        its own scale and shift (LN_EMB)
    MaskBlock l (input V_{l-1} [h_{l-1}], output [h_l]):
        mask_l = W2_l ReLU(W1_l V_emb + b1_l) + b2_l    [h_{l-1}]   instance-guided mask: the
                                                        aggregation layer (r h_{l-1} wide, r the
                                                        reduction ratio) and the projection layer
        V_l    = ReLU(LN(U_l (mask_l * V_{l-1})))       [h_l]       U_l [h_{l-1}, h_l], no bias
    logit = w^T V_L + b

Every mask reads the raw embeddings V_emb (not the previous block's output), as in the paper and
its reference code (reczoo/FuxiCTR model_zoo/MaskNet, SerialMaskNet). The aggregation width is
max(1, int(r h_{l-1})), r = 0.1 by default (BARS' tuned Criteo setting; at FuxiCTR's default r = 1
the first mask, N d -> N d -> N d, would be the largest layer at every size and flatten the
ladder). The size ladder grows the blocks: their number and width.
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
from scaling.models.feature_interactions import FieldVectors
from scaling.models.mlp import MLP, LayerNorm, Linear, check_widths, layer_norm_flops, linear_flops, mlp_flops
from scaling.models.registry import register_model

__all__ = ["MaskNetConfig", "MaskNet", "MaskBlock", "mask_block_flops"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(blocks=(64, 64)),
    "s": dict(blocks=(128, 128, 128)),
    "m": dict(blocks=(256, 256, 256)),
    "l": dict(blocks=(512, 512, 512, 512)),
    "xl": dict(blocks=(1024, 1024, 1024, 1024)),
}


def aggregation_width(width: int, ratio: float) -> int:
    """The mask's aggregation layer width for a block input `width` (at least 1)."""
    return max(1, int(width * ratio))


class MaskBlock(nnx.Module):
    """V_emb [B, E], V_in [B, h_in] -> ReLU(LN(U (mask(V_emb) * V_in))) [B, h_out]."""

    def __init__(self, emb_width: int, in_width: int, out_width: int, ratio: float, *, rngs: nnx.Rngs):
        self.mask = MLP(emb_width, (aggregation_width(in_width, ratio),), in_width, rngs=rngs)
        # He init: a ReLU follows (after the LayerNorm, which undoes the scale anyway)
        self.hidden = Linear(in_width, out_width, axes=("embed", "mlp"), use_bias=False, gain=2.0, rngs=rngs)
        self.norm = LayerNorm(out_width, axis_name="mlp")

    def __call__(self, v_emb: jax.Array, v_in: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.hidden(self.mask(v_emb) * v_in)))


def mask_block_flops(emb_width: int, in_width: int, out_width: int, ratio: float) -> float:
    """The mask MLP, the product with the block input (h_in), the bias-free linear, the LayerNorm
    and the ReLU (h_out)."""
    mask = mlp_flops(emb_width, (aggregation_width(in_width, ratio),), in_width)
    return float(mask + in_width + linear_flops(in_width, out_width, bias=False) + layer_norm_flops(out_width)
                 + out_width)


@dataclasses.dataclass(frozen=True)
class MaskNetConfig(CTRModelConfig):
    """Serial MaskNet hyperparameters; `size` names a preset (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["masknet"] = knob("masknet")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width")
    blocks: tuple[int, ...] = knob(_SIZES["s"]["blocks"], help="output width of each MaskBlock, in series")
    reduction_ratio: float = knob(0.1, gt=0.0, help="r: a mask's aggregation width over its block's input width (BARS' Criteo setting)")

    def check(self) -> None:
        check_widths("blocks", self.blocks)
        if not self.blocks:
            raise ConfigError("blocks", "expected at least one MaskBlock")

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        n, d = spec.num_fields + spec.num_dense, self.embed_dim
        flops = spec.num_dense * d + layer_norm_flops(d, n)  # the dense fields, LN_EMB
        width = n * d
        for out in self.blocks:
            flops += mask_block_flops(n * d, width, out, self.reduction_ratio)
            width = out
        return float(flops + linear_flops(width, 1))


@register_model("masknet", MaskNetConfig)
class MaskNet(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: MaskNetConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, n = config.embed_dim, spec.num_fields + spec.num_dense
        self.fields = FieldVectors(spec, d, rngs=rngs)
        self.field_norm = LayerNorm(d, rows=n)
        widths = (n * d, *config.blocks)
        self.blocks = nnx.List([MaskBlock(n * d, widths[i], widths[i + 1], config.reduction_ratio, rngs=rngs)
                                for i in range(len(config.blocks))])
        self.head = Linear(widths[-1], 1, axes=("mlp", None), rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.fields(batch["sparse"], batch["dense"], batch.get("history"))
        v_emb = e.reshape(e.shape[0], -1)
        v = self.field_norm(e).reshape(e.shape[0], -1)
        for block in self.blocks:
            v = block(v_emb, v)
        return self.head(v)[:, 0].astype(jnp.float32)
