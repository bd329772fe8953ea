"""FinalMLP (Mao et al., AAAI'23): two MLP streams over gated copies of the embeddings, fused by a
multi-head bilinear layer.

    e = flatten(E)                                   [N d], E: the F field embeddings (S pooled bags
                                                     after them) and the D dense features as fields
                                                     (x_j u_j), N = F + S + D vectors of width d
    feature selection, per stream j = 1, 2:
        g_j = 2 sigmoid(Gate_j(c_j))                 [N d], Gate_j an MLP (ReLU hidden, linear out);
        h_j = g_j * e                                c_j = flatten of the context fields' vectors
                                                     (`context1`/`context2`: indices into the N),
                                                     or a learned d-vector when no field is named
    streams:  o_1 = ReLU(MLP_1(h_1))  [H1],  o_2 = ReLU(MLP_2(h_2))  [H2]   (every layer ReLU'd)
    fusion:   logit = w_1^T o_1 + w_2^T o_2 + sum_{k=1..K} o_{1,k}^T W_k o_{2,k} + b
              o_{j,k}: head k of o_j (K equal chunks, H1/K and H2/K wide), W_k [H1/K, H2/K]

The gate starts near 1 (2 sigmoid(0) = 1) only on average: its output layer has the usual init,
so each stream sees a differently re-weighted copy of e from the start, as in the paper's code
(reczoo/FuxiCTR model_zoo/FinalMLP). The paper's code starts a context-free gate's input at zero;
here it is drawn N(0, 1), since a zero input with zero biases leaves the gate's ReLU layer dead
(ReLU'(0) = 0), so that only its output bias would ever learn. A context-free gate is the same for
every example: it is computed once per batch, and its MLP is not counted per example.

The size ladder grows both streams, the gates' hidden width and the fusion heads together (the
Wukong paper scaled FinalMLP's MLPs, Table 5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.config_schema import ConfigError, knob
from scaling.data.spec import CTRFeatureSpec
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.feature_interactions import FieldVectors
from scaling.models.mlp import MLP, Linear, check_widths, linear_flops, mlp_flops
from scaling.models.registry import register_model
from scaling.sharding.annotate import logical_param

__all__ = ["FinalMLPConfig", "FinalMLP", "FeatureGate", "BilinearFusion", "bilinear_fusion_flops"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(mlp1=(64, 64, 64), mlp2=(64,), gate_hidden=(64,), num_heads=8),
    "s": dict(mlp1=(128, 128, 128), mlp2=(256,), gate_hidden=(128,), num_heads=16),
    "m": dict(mlp1=(256, 256, 256), mlp2=(512,), gate_hidden=(256,), num_heads=32),
    "l": dict(mlp1=(512, 512, 512), mlp2=(1024,), gate_hidden=(512,), num_heads=64),
    "xl": dict(mlp1=(1024, 1024, 1024), mlp2=(2048,), gate_hidden=(1024,), num_heads=128),
}


class FeatureGate(nnx.Module):
    """Context-gated feature selection: field vectors e [B, N, d] -> gate 2 sigmoid(MLP(c)) [B, N d]
    (or [1, N d] for a context-free gate, the same for every example)."""

    def __init__(self, context: tuple[int, ...], dim: int, width: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs):
        self.context = tuple(context)
        self.learned = (logical_param(jax.random.normal(rngs.params(), (dim,)), ("embed",))
                        if not self.context else None)
        self.mlp = MLP(dim * max(1, len(self.context)), hidden, width, rngs=rngs)

    def __call__(self, e: jax.Array) -> jax.Array:
        if self.learned is not None:
            c = self.learned[...][None].astype(e.dtype)
        else:
            c = e[:, jnp.asarray(self.context)].reshape(e.shape[0], -1)
        return 2.0 * jax.nn.sigmoid(self.mlp(c))


def feature_gate_flops(num_context: int, dim: int, width: int, hidden: tuple[int, ...]) -> float:
    """Per example: the gate MLP and its sigmoid (3 FLOPs an element as XLA counts it, the exp
    aside as a transcendental; neither for a context-free gate, computed once per batch), then the
    doubling and the product with e (width each)."""
    mlp = mlp_flops(dim * num_context, hidden, width) + 3.0 * width if num_context else 0.0
    return float(mlp + 2 * width)


class BilinearFusion(nnx.Module):
    """o_1 [B, H1], o_2 [B, H2] -> w_1^T o_1 + w_2^T o_2 + sum_k o_{1,k}^T W_k o_{2,k} + b  [B]."""

    def __init__(self, dim1: int, dim2: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.w1 = Linear(dim1, 1, axes=("mlp", None), rngs=rngs)
        self.w2 = Linear(dim2, 1, axes=("mlp", None), use_bias=False, rngs=rngs)  # one bias b is enough
        a, b = dim1 // num_heads, dim2 // num_heads
        # Xavier normal of the paper code's [K a b, 1] matrix: the bilinear sum starts at unit scale.
        std = float(np.sqrt(2.0 / (num_heads * a * b + 1)))
        self.w12 = logical_param(std * jax.random.normal(rngs.params(), (num_heads, a, b)), ("heads", None, None))

    def __call__(self, o1: jax.Array, o2: jax.Array) -> jax.Array:
        k = self.num_heads
        heads1, heads2 = o1.reshape(o1.shape[0], k, -1), o2.reshape(o2.shape[0], k, -1)
        bilinear = (jnp.einsum("bka,kac->bkc", heads1, self.w12[...].astype(o1.dtype)) * heads2).sum(axis=(1, 2))
        return self.w1(o1)[:, 0] + self.w2(o2)[:, 0] + bilinear


def bilinear_fusion_flops(dim1: int, dim2: int, num_heads: int) -> float:
    """The two linear terms, the heads' o_1 W_k (2 H1 H2 / K), the products with o_2 and their sum
    (2 H2), the two adds."""
    return float(linear_flops(dim1, 1) + linear_flops(dim2, 1, bias=False) + 2.0 * dim1 * dim2 / num_heads
                 + 2 * dim2 + 2)


@dataclasses.dataclass(frozen=True)
class FinalMLPConfig(CTRModelConfig):
    """FinalMLP hyperparameters; `size` names a preset (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["finalmlp"] = knob("finalmlp")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom'")
    embed_dim: int = knob(16, ge=1, help="d: embedding width")
    mlp1: tuple[int, ...] = knob(_SIZES["s"]["mlp1"], help="stream 1's widths (every layer ReLU'd; the last is its output)")
    mlp2: tuple[int, ...] = knob(_SIZES["s"]["mlp2"], help="stream 2's widths (every layer ReLU'd; the last is its output)")
    gate_hidden: tuple[int, ...] = knob(_SIZES["s"]["gate_hidden"], help="hidden widths of each feature-selection gate")
    context1: tuple[int, ...] = knob((0,), help="fields (indices into the F + S + D field vectors) gating stream 1; "
                                                "empty: a learned context vector")
    context2: tuple[int, ...] = knob((1,), help="fields gating stream 2 (as context1)")
    num_heads: int = knob(_SIZES["s"]["num_heads"], ge=1, help="heads K of the bilinear fusion (divides both outputs)")

    def check(self) -> None:
        for key in ("mlp1", "mlp2"):
            widths = getattr(self, key)
            check_widths(key, widths)
            if not widths:
                raise ConfigError(key, "expected at least one width (the stream's output is its last layer)")
            if widths[-1] % self.num_heads:
                raise ConfigError("num_heads", f"{self.num_heads} heads do not divide {key}'s output width {widths[-1]}")
        check_widths("gate_hidden", self.gate_hidden)
        for key in ("context1", "context2"):
            for i, field in enumerate(getattr(self, key)):
                if field < 0:
                    raise ConfigError(f"{key}[{i}]", f"expected a field index >= 0, got {field}")

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        d = self.embed_dim
        width = (spec.num_fields + spec.num_dense) * d
        flops = spec.num_dense * d  # the dense fields
        for context, widths in ((self.context1, self.mlp1), (self.context2, self.mlp2)):
            flops += feature_gate_flops(len(context), d, width, self.gate_hidden)
            flops += mlp_flops(width, widths[:-1], widths[-1]) + widths[-1]  # the stream and its last ReLU
        return float(flops + bilinear_fusion_flops(self.mlp1[-1], self.mlp2[-1], self.num_heads))


@register_model("finalmlp", FinalMLPConfig)
class FinalMLP(CTRModel):
    """batch {'sparse' [B, F], 'dense' [B, D]} -> logits [B]."""

    def __init__(self, config: FinalMLPConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d, n = config.embed_dim, spec.num_fields + spec.num_dense
        for key in ("context1", "context2"):
            if any(field >= n for field in getattr(config, key)):
                raise ConfigError(key, f"a field index is out of range: the data has {n} field vectors")
        self.fields = FieldVectors(spec, d, rngs=rngs)
        self.gate1 = FeatureGate(config.context1, d, n * d, config.gate_hidden, rngs=rngs)
        self.gate2 = FeatureGate(config.context2, d, n * d, config.gate_hidden, rngs=rngs)
        # each stream's last layer is its output (ReLU'd here): MLP's output layer has no activation
        self.mlp1 = MLP(n * d, config.mlp1[:-1], config.mlp1[-1], rngs=rngs)
        self.mlp2 = MLP(n * d, config.mlp2[:-1], config.mlp2[-1], rngs=rngs)
        self.fusion = BilinearFusion(config.mlp1[-1], config.mlp2[-1], config.num_heads, rngs=rngs)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        e = self.fields(batch["sparse"], batch["dense"], batch.get("history"))
        flat = e.reshape(e.shape[0], -1)
        o1 = jax.nn.relu(self.mlp1(self.gate1(e) * flat))
        o2 = jax.nn.relu(self.mlp2(self.gate2(e) * flat))
        return self.fusion(o1, o2).astype(jnp.float32)
