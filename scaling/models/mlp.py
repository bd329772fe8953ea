"""Shared dense blocks for every family: Linear, LayerNorm, MLP, and their FLOP formulas.

Parameters are created through `logical_param`, so each carries logical axis names. An MLP
alternates its kernels' axes ("embed", "mlp") -> ("mlp", "embed") -> ... (the Megatron pattern),
so no kernel names the same logical axis twice and a tensor-parallel rule splits consecutive
layers column-wise then row-wise.

Compute dtype follows the inputs and parameters (a caller that wants bf16 casts both); LayerNorm
statistics are always taken in float32.

FLOP convention (per example, forward), shared by every family through the helpers below and
cross-checked against XLA's `cost_analysis()` in tests/test_flops.py:
  - a matmul [in] x [in, out] costs 2 * in * out (2 x multiply-adds);
  - elementwise ops cost one FLOP per output element: bias add, ReLU, residual add;
  - LayerNorm of one n-vector costs 8n + 2, as XLA counts it (mean, centre, square, variance,
    normalize, scale, shift; the rsqrt is a transcendental, not a FLOP).
Elementwise terms are a few percent of the total at the smallest sizes and negligible at the
largest; they are counted so that the analytic figure and XLA's agree closely at every size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.sharding.annotate import logical_param

__all__ = [
    "Linear",
    "LayerNorm",
    "layer_norm",
    "MLP",
    "linear_flops",
    "layer_norm_flops",
    "mlp_flops",
    "other_axis",
    "check_widths",
]

# FLOPs XLA's cost model charges per LayerNorm: per normalized element, and per normalized vector.
_LN_PER_ELEMENT = 8
_LN_PER_VECTOR = 2


def other_axis(axis: str) -> str:
    """The logical axis an MLP layer's output takes when its input has `axis` (embed <-> mlp)."""
    return "embed" if axis == "mlp" else "mlp"


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    key = rngs.params()
    if std == 0.0:
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.normal(key, shape, jnp.float32)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] with logical axes `axes`.

    Init: normal with variance gain / fan_in (gain 2 = He, for a ReLU after; 1 = LeCun), times
    `init_scale` (0 gives a zero kernel, e.g. the last layer of a residual branch).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None] = ("embed", "mlp"),
        use_bias: bool = True,
        gain: float = 1.0,
        init_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        std = init_scale * float(np.sqrt(gain / in_features))
        self.kernel = logical_param(_normal(rngs, (in_features, out_features), std), axes)
        self.bias = logical_param(jnp.zeros((out_features,), jnp.float32), axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (num_features); scale and shift carry logical axis `axis_name`.

    `rows` > 0 gives each of the input's last `rows` vectors ([..., rows, num_features]) its own
    scale and shift [rows, num_features] (e.g. MaskNet's per-field LayerNorm of the embeddings);
    the statistics are per vector either way.
    """

    def __init__(self, num_features: int, *, axis_name: str | None = "embed", eps: float = 1e-5, rows: int = 0):
        self.num_features = num_features
        self.eps = eps
        shape, axes = ((rows, num_features), ("fields", axis_name)) if rows else ((num_features,), (axis_name,))
        self.scale = logical_param(jnp.ones(shape, jnp.float32), axes)
        self.bias = logical_param(jnp.zeros(shape, jnp.float32), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, eps: float = 1e-5
               ) -> jax.Array:
    """LayerNorm of x [..., n] over its last axis: statistics in float32, the result in x's dtype,
    then the affine (scale and bias broadcast against x) in that dtype; without scale and bias the
    non-affine LayerNorm (HSTU's)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = (centred * jax.lax.rsqrt(var + eps)).astype(dtype)
    if scale is None:
        return y
    return y * scale.astype(dtype) + bias.astype(dtype)


class MLP(nnx.Module):
    """in -> [Linear -> (LayerNorm) -> ReLU] per hidden width -> Linear -> out (no activation).

    Args:
      in_features: input width.
      hidden: widths of the hidden layers (may be empty: then one Linear in -> out).
      out_features: output width.
      in_axis: logical axis of the input features; layer axes alternate from there.
      norm: LayerNorm after each hidden Linear, before its ReLU.
      out_init_scale: multiplies the output layer's LeCun init; 0 zero-initializes it.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        in_axis: str = "embed",
        norm: bool = False,
        out_init_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.hidden = tuple(int(w) for w in hidden)
        self.out_features = out_features
        layers, norms = [], []
        width, axis = in_features, in_axis
        for w in self.hidden:
            out_axis = other_axis(axis)
            layers.append(Linear(width, w, axes=(axis, out_axis), gain=2.0, rngs=rngs))
            norms.append(LayerNorm(w, axis_name=out_axis) if norm else None)
            width, axis = w, out_axis
        self.layers = nnx.List(layers)
        self.norms = nnx.List(norms)
        self.out = Linear(width, out_features, axes=(axis, other_axis(axis)), init_scale=out_init_scale, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer, norm in zip(self.layers, self.norms):
            x = layer(x)
            if norm is not None:
                x = norm(x)
            x = jax.nn.relu(x)
        return self.out(x)


def linear_flops(in_features: int, out_features: int, *, bias: bool = True) -> float:
    """Forward FLOPs of one Linear per example: 2*in*out (+ out for the bias add)."""
    return 2.0 * in_features * out_features + (out_features if bias else 0.0)


def layer_norm_flops(num_features: int, num_vectors: int = 1) -> float:
    """Forward FLOPs per example of LayerNorm over `num_features`, applied to `num_vectors` vectors."""
    return float(num_vectors * (_LN_PER_ELEMENT * num_features + _LN_PER_VECTOR))


def mlp_flops(in_features: int, hidden: Sequence[int], out_features: int, *, norm: bool = False) -> float:
    """Forward FLOPs per example of `MLP(in_features, hidden, out_features, norm=norm)`."""
    flops, width = 0.0, in_features
    for w in hidden:
        flops += linear_flops(width, w) + w  # + ReLU
        if norm:
            flops += layer_norm_flops(w)
        width = w
    return flops + linear_flops(width, out_features)


def check_widths(key: str, widths: Sequence[int]) -> None:
    """Config validation of a tuple of layer widths: each must be >= 1 (ConfigError names `key[i]`)."""
    from scaling.config_schema import ConfigError

    for i, w in enumerate(widths):
        if w < 1:
            raise ConfigError(f"{key}[{i}]", f"expected a layer width >= 1, got {w!r}")
