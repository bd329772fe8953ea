"""Wukong (Zhang et al., ICML'24, arXiv 2403.02545): stacked factorization machines for CTR.

    X0 = [sparse field embeddings ; dense MLP output reshaped to num_dense_embeddings x d]  (n0 x d)
    X_{i+1} = LN_d( concat(FMB(X_i), LCB(X_i)) + residual(X_i) )                 (n_F + n_L) x d
    FMB(X)  = reshape(MLP(LN(flatten(X (X^T Y)))), n_F x d)     Y: n_i x k, X^T Y computed first
    LCB(X)  = W_L X                                              W_L: n_L x n_i, no bias
    residual(X) = X, or W_R X (n_i -> n_F + n_L, no bias) when n_i != n_F + n_L
    logit   = top MLP(flatten(X_l))

The FMB MLP's last layer is zero-initialized by default (`fmb_out_init_scale`), so every block
starts as LN(concat(0, W_L X) + residual(X)): near the identity path, which keeps deep stacks
trainable (see reference/synthetic_scaling.md).

Size ladder (`WukongConfig.SIZES`) follows the paper's synergistic upscaling (Table 5): first add
layers, then grow n_F = n_L, k and the FMB MLP width together. FLOPs per example for 26 fields,
13 dense features, d = 16 run from ~34 KFLOP (xxs) to ~15 MFLOP (xl), ~3.4x per step.
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
from scaling.kernels.dispatch import IMPL_HELP, KernelImpl
from scaling.kernels.fm_block import fm_block
from scaling.kernels.residual_norm import residual_layer_norm
from scaling.models.base import CTRModel, CTRModelConfig
from scaling.models.embedding import FieldEmbedding
from scaling.models.mlp import MLP, LayerNorm, check_widths, layer_norm_flops, mlp_flops
from scaling.models.registry import register_model
from scaling.sharding.annotate import logical_param
from scaling.sharding.rules import constrain

__all__ = [
    "WukongConfig",
    "Wukong",
    "WukongLayer",
    "FactorizationMachineBlock",
    "LinearCompressBlock",
    "fm_low_rank",
    "fm_explicit",
    "wukong_layer_flops",
]

# The ladder, smallest first. Each step first deepens, then widens (n_F = n_L, k, FMB MLP).
_SIZES: dict[str, dict[str, Any]] = {
    "xxxs": dict(num_layers=1, num_fm=1, num_lcb=1, fm_rank=2, fmb_mlp_width=16, fmb_mlp_depth=1, top_mlp=(16,)),
    "xxs": dict(num_layers=1, num_fm=2, num_lcb=2, fm_rank=4, fmb_mlp_width=32, fmb_mlp_depth=1, top_mlp=(32,)),
    "xxs+": dict(num_layers=2, num_fm=3, num_lcb=3, fm_rank=6, fmb_mlp_width=48, fmb_mlp_depth=1, top_mlp=(48,)),
    "xs": dict(num_layers=2, num_fm=4, num_lcb=4, fm_rank=8, fmb_mlp_width=64, fmb_mlp_depth=1, top_mlp=(64,)),
    "xs+": dict(num_layers=3, num_fm=6, num_lcb=6, fm_rank=8, fmb_mlp_width=80, fmb_mlp_depth=1, top_mlp=(96,)),
    "s": dict(num_layers=3, num_fm=8, num_lcb=8, fm_rank=8, fmb_mlp_width=96, fmb_mlp_depth=2, top_mlp=(128,)),
    "s+": dict(num_layers=4, num_fm=10, num_lcb=10, fm_rank=10, fmb_mlp_width=128, fmb_mlp_depth=2, top_mlp=(128,)),
    "m": dict(num_layers=4, num_fm=12, num_lcb=12, fm_rank=12, fmb_mlp_width=192, fmb_mlp_depth=2, top_mlp=(128,)),
    "m+": dict(num_layers=5, num_fm=14, num_lcb=14, fm_rank=14, fmb_mlp_width=224, fmb_mlp_depth=2, top_mlp=(192,)),
    "l": dict(num_layers=6, num_fm=16, num_lcb=16, fm_rank=16, fmb_mlp_width=256, fmb_mlp_depth=3, top_mlp=(256,)),
    "l+": dict(num_layers=7, num_fm=20, num_lcb=20, fm_rank=20, fmb_mlp_width=320, fmb_mlp_depth=3, top_mlp=(256,)),
    "xl": dict(num_layers=8, num_fm=24, num_lcb=24, fm_rank=24, fmb_mlp_width=384, fmb_mlp_depth=3, top_mlp=(256,)),
}
_DEFAULT = _SIZES["s"]


@dataclasses.dataclass(frozen=True)
class WukongConfig(CTRModelConfig):
    """Wukong hyperparameters. `size` names a preset of SIZES (explicit keys override it)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["wukong"] = knob("wukong")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(16, ge=1, help="d: the width of every embedding unit")
    num_layers: int = knob(_DEFAULT["num_layers"], ge=1, help="l: interaction layers")
    num_fm: int = knob(_DEFAULT["num_fm"], ge=0, help="n_F: embeddings each FMB emits")
    num_lcb: int = knob(_DEFAULT["num_lcb"], ge=0, help="n_L: embeddings each LCB emits")
    fm_rank: int = knob(_DEFAULT["fm_rank"], ge=1, help="k: columns of the FM projection Y (n_i x k)")
    fmb_mlp_width: int = knob(_DEFAULT["fmb_mlp_width"], ge=1, help="hidden width of the FMB MLP")
    fmb_mlp_depth: int = knob(_DEFAULT["fmb_mlp_depth"], ge=0, help="hidden layers of the FMB MLP")
    dense_mlp: tuple[int, ...] = knob((64, 32), help="hidden widths of the dense-feature MLP (then a projection)")
    num_dense_embeddings: int = knob(1, ge=1, help="d-dim embeddings the dense MLP produces")
    top_mlp: tuple[int, ...] = knob(_DEFAULT["top_mlp"], help="hidden widths of the top MLP (then 1 logit)")
    fmb_out_init_scale: float = knob(0.0, ge=0.0, help="init scale of the FMB MLP's last layer (0 = zero init)")
    fm_impl: KernelImpl = knob("auto", help=f"FMB's X (X^T Y) + LayerNorm (scaling/kernels/fm_block.py). {IMPL_HELP}")
    norm_impl: KernelImpl = knob("auto", help="each layer's concat + residual + LayerNorm "
                                 f"(scaling/kernels/residual_norm.py). {IMPL_HELP}")

    def check(self) -> None:
        if self.num_fm + self.num_lcb < 1:
            raise ConfigError("num_fm", "num_fm + num_lcb must be >= 1 (each layer must emit an embedding)")
        check_widths("dense_mlp", self.dense_mlp)
        check_widths("top_mlp", self.top_mlp)

    @property
    def num_outputs(self) -> int:
        """Embeddings per layer output: n_F + n_L."""
        return self.num_fm + self.num_lcb

    def num_inputs(self, spec: CTRFeatureSpec) -> int:
        """n0: sparse fields plus dense embeddings (none when the data has no dense features)."""
        return spec.num_fields + (self.num_dense_embeddings if spec.num_dense > 0 else 0)

    def flops_per_example(self, spec: CTRFeatureSpec) -> float:
        """Forward FLOPs per example: 2 x multiply-adds plus elementwise ops (see scaling.models.mlp).

        Embedding gathers are excluded (see embedding_bytes_per_example).
        """
        d = self.embed_dim
        flops = 0.0
        if spec.num_dense > 0:
            flops += mlp_flops(spec.num_dense, self.dense_mlp, self.num_dense_embeddings * d)
        n = self.num_inputs(spec)
        for _ in range(self.num_layers):
            flops += wukong_layer_flops(self, n)
            n = self.num_outputs
        return flops + mlp_flops(n * d, self.top_mlp, 1)


def wukong_layer_flops(config: WukongConfig, num_inputs: int) -> float:
    """Forward FLOPs per example of one Wukong layer whose input has `num_inputs` embeddings."""
    n, d, k = num_inputs, config.embed_dim, config.fm_rank
    n_out = config.num_outputs
    flops = 0.0
    if config.num_fm > 0:
        flops += 2 * (2.0 * n * d * k)  # X^T Y, then X (X^T Y)
        flops += layer_norm_flops(n * k)
        flops += mlp_flops(n * k, (config.fmb_mlp_width,) * config.fmb_mlp_depth, config.num_fm * d)
    flops += 2.0 * config.num_lcb * n * d  # LCB
    if n != n_out:
        flops += 2.0 * n_out * n * d  # residual projection
    flops += n_out * d  # residual add
    return flops + layer_norm_flops(d, n_out)


def fm_low_rank(x: jax.Array, y: jax.Array) -> jax.Array:
    """Optimized FM: X (X^T Y) for X [B, n, d], Y [n, k] -> [B, n, k], in O(n d k)."""
    p = jnp.einsum("bnd,nk->bdk", x, y)
    return jnp.einsum("bnd,bdk->bnk", x, p)


def fm_explicit(x: jax.Array, y: jax.Array) -> jax.Array:
    """The same product in its explicit form (X X^T) Y, in O(n^2 d); a reference for tests."""
    gram = jnp.einsum("bnd,bmd->bnm", x, x)
    return jnp.einsum("bnm,mk->bnk", gram, y)


def _field_mixing(num_out: int, num_in: int, rngs: nnx.Rngs) -> nnx.Param:
    """A [num_out, num_in] matrix mixing embeddings along the field axis (LeCun init, no bias).

    Only the input field axis is named: one parameter never names the same logical axis twice.
    """
    w = jax.random.normal(rngs.params(), (num_out, num_in), jnp.float32) / np.sqrt(num_in)
    return logical_param(w, (None, "fields"))


class FactorizationMachineBlock(nnx.Module):
    """FMB: [B, n, d] -> [B, n_F, d] = reshape(MLP(LN(flatten(X (X^T Y)))))."""

    def __init__(
        self,
        num_inputs: int,
        embed_dim: int,
        num_fm: int,
        rank: int,
        mlp_width: int,
        mlp_depth: int,
        *,
        out_init_scale: float = 0.0,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.num_fm, self.embed_dim, self.impl = num_fm, embed_dim, impl
        y = jax.random.normal(rngs.params(), (num_inputs, rank), jnp.float32) / np.sqrt(num_inputs)
        self.y = logical_param(y, ("fields", "rank"))
        self.norm = LayerNorm(num_inputs * rank, axis_name="embed")
        self.mlp = MLP(
            num_inputs * rank,
            (mlp_width,) * mlp_depth,
            num_fm * embed_dim,
            in_axis="embed",
            out_init_scale=out_init_scale,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        # = self.norm(fm_low_rank(x, y).reshape(b, -1)), fused (impl "xla" computes exactly that)
        normed = fm_block(x, self.y[...], self.norm.scale[...], self.norm.bias[...], eps=self.norm.eps,
                          impl=self.impl)
        h = self.mlp(normed)
        return h.reshape(b, self.num_fm, self.embed_dim)


class LinearCompressBlock(nnx.Module):
    """LCB: [B, n, d] -> [B, n_L, d] = W_L X, W_L [n_L, n] (no bias, no activation)."""

    def __init__(self, num_inputs: int, num_lcb: int, *, rngs: nnx.Rngs):
        self.weight = _field_mixing(num_lcb, num_inputs, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("ln,bnd->bld", self.weight[...].astype(x.dtype), x)


class WukongLayer(nnx.Module):
    """X -> LN_d(concat(FMB(X), LCB(X)) + residual(X)), [B, n_i, d] -> [B, n_F + n_L, d]."""

    def __init__(self, num_inputs: int, config: WukongConfig, *, rngs: nnx.Rngs):
        c = config
        self.fmb = (
            FactorizationMachineBlock(
                num_inputs,
                c.embed_dim,
                c.num_fm,
                c.fm_rank,
                c.fmb_mlp_width,
                c.fmb_mlp_depth,
                out_init_scale=c.fmb_out_init_scale,
                impl=c.fm_impl,
                rngs=rngs,
            )
            if c.num_fm > 0
            else None
        )
        self.lcb = LinearCompressBlock(num_inputs, c.num_lcb, rngs=rngs) if c.num_lcb > 0 else None
        # Residual: identity when the shapes match, else a learned n_i -> n_F + n_L compression.
        self.residual = _field_mixing(c.num_outputs, num_inputs, rngs) if num_inputs != c.num_outputs else None
        self.norm = LayerNorm(c.embed_dim, axis_name="embed")
        self.norm_impl = c.norm_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        parts = []
        if self.fmb is not None:
            parts.append(self.fmb(x))
        if self.lcb is not None:
            parts.append(self.lcb(x))
        res = x if self.residual is None else jnp.einsum("on,bnd->bod", self.residual[...].astype(x.dtype), x)
        # concat + residual + LayerNorm in one kernel (or, off GPU / impl=xla, the same jnp math)
        return residual_layer_norm(parts[0], parts[1] if len(parts) > 1 else None, res, self.norm.scale[...],
                                   self.norm.bias[...], eps=self.norm.eps, impl=self.norm_impl)


@register_model("wukong", WukongConfig)
class Wukong(CTRModel):
    """Wukong CTR model: batch {'sparse' int32 [B, F], 'dense' float [B, D]} -> logits float32 [B]."""

    def __init__(self, config: WukongConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d = config.embed_dim
        self.embedding = FieldEmbedding(spec.cardinalities, d, rngs=rngs, bags=spec.bag_cardinalities)
        self.num_dense_embeddings = config.num_dense_embeddings if spec.num_dense > 0 else 0
        self.dense_mlp = (
            MLP(spec.num_dense, config.dense_mlp, self.num_dense_embeddings * d, rngs=rngs)
            if self.num_dense_embeddings
            else None
        )
        layers, n = [], config.num_inputs(spec)
        for _ in range(config.num_layers):
            layers.append(WukongLayer(n, config, rngs=rngs))
            n = config.num_outputs
        self.layers = nnx.List(layers)
        self.top = MLP(n * d, config.top_mlp, 1, rngs=rngs)

    def embed(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """X0 [B, n0, d]: sparse field embeddings, then the dense MLP's embeddings."""
        x = self.embedding(batch["sparse"], batch.get("history"))
        if self.dense_mlp is None:
            return x
        dense = self.dense_mlp(batch["dense"].astype(x.dtype))
        dense = dense.reshape(dense.shape[0], self.num_dense_embeddings, self.config.embed_dim)
        return jnp.concatenate([x, dense], axis=1)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        x = constrain(self.embed(batch), ("batch",))  # block boundaries: batch split, the rest whole
        for layer in self.layers:
            x = constrain(layer(x), ("batch",))
        logits = self.top(x.reshape(x.shape[0], -1))[:, 0]
        return logits.astype(jnp.float32)

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)
