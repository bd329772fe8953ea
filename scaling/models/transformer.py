"""Shared Transformer pieces for the sequence families (SASRec, BERT4Rec, OneTrans): masked
multi-head attention, a point-wise feed-forward, a residual block, and their FLOP formulas.

Attention, for queries y [B, Nq, D], keys/values x [B, Nk, D] (y = x for self-attention) and a
boolean mask [B, 1 or H, Nq, Nk] (True = may attend):

    q_h = y W_q,h + b_q,h     k_h = x W_k,h + b_k,h     v_h = x W_v,h + b_v,h      (head width dh)
    s_h = (q_h / sqrt(dh)) k_h^T,   masked entries set to -inf-like (finite, so nothing NaNs)
    p_h = softmax(s_h) * mask       (a row with nothing to attend to gives p = 0, hence output 0)
    out = sum_h dropout(p_h) v_h W_o,h + b_o

Feed-forward:  FFN(x) = dropout(act(x W_1 + b_1)) W_2 + b_2,  act = relu or gelu (exact, erf).

Block (`norm`): "pre" (pre-LN residuals; deep stacks train stably)
    x = x + dropout(attn(LN1(x), kv))    kv = LN1(x) if kv_norm else x   (SASRec feeds raw x)
    x = x + dropout(FFN(LN2(x)))
"sasrec" (Kang & McAuley's code and generative-recommenders: the residual is the *normalised* x)
    y = LN1(x);  x = y + attn(y, x);  y = LN2(x);  x = y + dropout(FFN(y))
"post" (BERT-style, for BERT4Rec)
    x = LN1(x + dropout(attn(x, x)));  x = LN2(x + dropout(FFN(x)))
and, when a `valid` [B, N] mask is given, padded positions' outputs are set to 0.

Init: every kernel xavier-normal (what generative-recommenders applies to all SASRec weights);
biases 0; LayerNorm scale 1, shift 0.

FLOPs (forward, per sequence; the project's convention, scaling/models/mlp.py): matmuls count
2 x multiply-adds; bias adds, activations, residual adds and the padding select count one FLOP
per element; LayerNorm 8n + 2 per vector. Attention counts the FULL Nq x Nk score and value
products (the dense path computes them all; a causal kernel skipping masked blocks would do about
half), plus `SOFTMAX_FLOPS_PER_SCORE` elementwise FLOPs per score (mask select, max, subtract,
sum, normalise, re-mask; 4 without a mask; exp is a transcendental). Building a causal mask costs XLA about 5 more
FLOPs per N x N entry (iota compares and ands, once per forward, shared by heads and blocks); it
is not counted. Given the mask, the "pre" block agrees with XLA's `cost_analysis()` to 0.1%; the
"sasrec" and "post" placements read higher in XLA because fusion recomputes a LayerNorm in each
of its two consumers: 10% at a toy D = 8, N = 16; 3.5% at D = 32, N = 40; 0.5% at D = 50,
N = 200 (tests/test_transformer.py holds them within 5% at D = 32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.models.mlp import LayerNorm, layer_norm_flops
from scaling.sharding.annotate import logical_param

__all__ = [
    "ACTIVATION_FLOPS",
    "MASKED_SCORE",
    "SOFTMAX_FLOPS_PER_SCORE",
    "Activation",
    "BlockNorm",
    "FeedForward",
    "MultiHeadAttention",
    "TransformerBlock",
    "activate",
    "attention_flops",
    "causal_mask",
    "dot_product_attention",
    "feed_forward_flops",
    "padding_mask",
    "transformer_block_flops",
    "valid_from_lengths",
    "xavier_normal",
]

Activation = Literal["relu", "gelu"]
BlockNorm = Literal["pre", "sasrec", "post"]

# Elementwise FLOPs per attention score, as XLA's cost model counts the masked softmax below:
# mask select, row max, subtract, row sum, divide, re-mask (exp is a transcendental, not a FLOP).
SOFTMAX_FLOPS_PER_SCORE = 6
# FLOPs per element of each activation, as XLA counts them (relu: one max; exact gelu: erf is
# expanded into a rational polynomial, 64 FLOPs; tests/test_transformer.py holds both).
ACTIVATION_FLOPS: dict[str, int] = {"relu": 1, "gelu": 64}

# Finite stand-in for -inf: a fully masked row then softmaxes to a uniform row (later zeroed)
# instead of 0/0 = NaN, in float32 and bfloat16 alike.
MASKED_SCORE = -1e30


def xavier_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    return math.sqrt(2.0 / (fan_in + fan_out)) * jax.random.normal(key, shape, jnp.float32)


# ------------------------------------------------------------------------------------------ masks


def valid_from_lengths(lengths: jax.Array, n: int) -> jax.Array:
    """lengths int [B] -> bool [B, n]: position i holds an event iff i < length (left-aligned)."""
    return jnp.arange(n)[None, :] < lengths[:, None]


def causal_mask(valid: jax.Array) -> jax.Array:
    """valid bool [B, N] -> bool [B, 1, N, N]: query i attends key j iff j <= i and both are valid.

    Padded queries get an all-False row (their attention output is 0)."""
    n = valid.shape[-1]
    tri = jnp.tril(jnp.ones((n, n), jnp.bool_))
    return (tri[None] & valid[:, :, None] & valid[:, None, :])[:, None]


def padding_mask(valid: jax.Array, valid_q: jax.Array | None = None) -> jax.Array:
    """Bidirectional: valid bool [B, Nk] (and valid_q [B, Nq], default = valid) -> bool
    [B, 1, Nq, Nk]: every valid query attends every valid key."""
    valid_q = valid if valid_q is None else valid_q
    return (valid_q[:, :, None] & valid[:, None, :])[:, None]


# -------------------------------------------------------------------------------------- attention


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Masked softmax attention per head.

    Args:
      q: [B, Nq, H, dh] queries (not yet scaled); k: [B, Nk, H, dh]; v: [B, Nk, H, dv].
      mask: bool, broadcastable to [B, H, Nq, Nk], True where query i may attend key j; None = all.
      dropout: applied to the attention probabilities (training-time regularisation).
    Returns:
      [B, Nq, H, dv]; rows whose mask is all False are exactly 0 (finite gradients too).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    # Scale q (Nq*dh values) rather than the scores (Nq*Nk values); scores and softmax in float32.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)  # a fully masked row was uniform; make it 0
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with separate query input: x [B, Nk, D] (keys, values), query
    [B, Nq, D] (default x), mask -> [B, Nq, D].

    Kernels W_q, W_k, W_v [D, H, dh] carry axes (embed, heads, kv); W_o [H, dh, D] (heads, kv, embed).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        use_bias: bool = True,
        attn_dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.dim, self.num_heads, self.head_dim, self.use_bias = dim, num_heads, head_dim, use_bias
        inner = num_heads * head_dim
        shape_in, axes_in = (dim, num_heads, head_dim), ("embed", "heads", "kv")
        self.w_q = logical_param(xavier_normal(rngs.params(), shape_in, dim, inner), axes_in)
        self.w_k = logical_param(xavier_normal(rngs.params(), shape_in, dim, inner), axes_in)
        self.w_v = logical_param(xavier_normal(rngs.params(), shape_in, dim, inner), axes_in)
        self.w_o = logical_param(xavier_normal(rngs.params(), (num_heads, head_dim, dim), inner, dim),
                                 ("heads", "kv", "embed"))
        if use_bias:
            zeros = jnp.zeros((num_heads, head_dim), jnp.float32)
            self.b_q = logical_param(zeros, ("heads", "kv"))
            self.b_k = logical_param(zeros, ("heads", "kv"))
            self.b_v = logical_param(zeros, ("heads", "kv"))
            self.b_o = logical_param(jnp.zeros((dim,), jnp.float32), ("embed",))
        self.attn_dropout = nnx.Dropout(attn_dropout, rngs=rngs) if attn_dropout > 0 else None

    def __call__(self, x: jax.Array, mask: jax.Array | None, *, query: jax.Array | None = None) -> jax.Array:
        """x [B, Nk, D], mask bool [B, 1|H, Nq, Nk], query [B, Nq, D] (default x) -> [B, Nq, D]."""
        y = x if query is None else query
        q = jnp.einsum("bnd,dhk->bnhk", y, self.w_q[...])
        k = jnp.einsum("bnd,dhk->bnhk", x, self.w_k[...])
        v = jnp.einsum("bnd,dhk->bnhk", x, self.w_v[...])
        if self.use_bias:
            q, k, v = q + self.b_q[...], k + self.b_k[...], v + self.b_v[...]
        a = dot_product_attention(q, k, v, mask, dropout=self.attn_dropout)
        out = jnp.einsum("bnhk,hkd->bnd", a, self.w_o[...])
        return out + self.b_o[...] if self.use_bias else out


def activate(x: jax.Array, activation: Activation) -> jax.Array:
    if activation == "relu":
        return jax.nn.relu(x)
    if activation == "gelu":
        return jax.nn.gelu(x, approximate=False)  # exact erf form, as torch.nn.GELU() defaults
    raise ValueError(f"unknown activation {activation!r}")


class FeedForward(nnx.Module):
    """Point-wise feed-forward x [..., D] -> [..., D]: dropout(act(x W_1 + b_1)) W_2 + b_2.

    W_1 [D, F] (embed, mlp), W_2 [F, D] (mlp, embed)."""

    def __init__(self, dim: int, hidden: int, *, activation: Activation = "relu", dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.w_1 = logical_param(xavier_normal(rngs.params(), (dim, hidden), dim, hidden), ("embed", "mlp"))
        self.b_1 = logical_param(jnp.zeros((hidden,), jnp.float32), ("mlp",))
        self.w_2 = logical_param(xavier_normal(rngs.params(), (hidden, dim), hidden, dim), ("mlp", "embed"))
        self.b_2 = logical_param(jnp.zeros((dim,), jnp.float32), ("embed",))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = activate(x @ self.w_1[...] + self.b_1[...], self.activation)
        if self.dropout is not None:
            h = self.dropout(h)
        return h @ self.w_2[...] + self.b_2[...]


class TransformerBlock(nnx.Module):
    """One residual attention + feed-forward block: x [B, N, D], mask [B, 1|H, N, N] -> [B, N, D].

    Args:
      dim, num_heads, ffn_dim: D, H (head width D / H) and the feed-forward's hidden width F.
      activation: of the feed-forward ("relu" or "gelu").
      dropout: on the feed-forward's hidden units and on each residual branch's output ("sasrec"
        leaves the attention branch undropped, as the reference code does).
      attn_dropout: on the attention probabilities.
      norm: "pre", "sasrec" or "post" (module docstring).
      kv_norm: "pre" only: attend over LN1(x) (standard pre-LN) instead of x (SASRec).
      eps: LayerNorm epsilon (SASRec's code uses 1e-8).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        activation: Activation = "relu",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm: BlockNorm = "pre",
        kv_norm: bool = False,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        if norm not in ("pre", "sasrec", "post"):
            raise ValueError(f"unknown block norm {norm!r}")
        self.norm, self.kv_norm = norm, kv_norm
        self.attn = MultiHeadAttention(dim, num_heads, attn_dropout=attn_dropout, rngs=rngs)
        self.ffn = FeedForward(dim, ffn_dim, activation=activation, dropout=dropout, rngs=rngs)
        self.ln_1 = LayerNorm(dim, eps=eps)
        self.ln_2 = LayerNorm(dim, eps=eps)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def _drop(self, x: jax.Array) -> jax.Array:
        return x if self.dropout is None else self.dropout(x)

    def __call__(self, x: jax.Array, mask: jax.Array | None, valid: jax.Array | None = None) -> jax.Array:
        """x [B, N, D], mask bool [B, 1|H, N, N], valid bool [B, N] (zeroes padded outputs)."""
        if self.norm == "pre":
            y = self.ln_1(x)
            x = x + self._drop(self.attn(y if self.kv_norm else x, mask, query=y))
            x = x + self._drop(self.ffn(self.ln_2(x)))
        elif self.norm == "sasrec":
            y = self.ln_1(x)
            y = self.ln_2(y + self.attn(x, mask, query=y))
            x = y + self._drop(self.ffn(y))
        else:  # post
            x = self.ln_1(x + self._drop(self.attn(x, mask)))
            x = self.ln_2(x + self._drop(self.ffn(x)))
        if valid is not None:
            x = jnp.where(valid[..., None], x, 0.0)
        return x


# ------------------------------------------------------------------------------------------ FLOPs


def attention_flops(n_q: int, n_k: int, dim: int, num_heads: int, head_dim: int | None = None, *,
                    bias: bool = True, masked: bool = True) -> float:
    """Forward FLOPs of `MultiHeadAttention` over one sequence (n_q queries, n_k keys/values).

    Projections 2 n D H dh each (q over n_q, k and v over n_k, output over n_q), the query scaling,
    the FULL n_q x n_k score and value products (2 n_q n_k H dh each, whatever the mask: the dense
    path computes them), and the softmax's elementwise work per score."""
    dh = dim // num_heads if head_dim is None else head_dim
    inner = num_heads * dh
    flops = 2.0 * dim * inner * (2 * n_q + 2 * n_k)  # q, o over n_q; k, v over n_k
    flops += n_q * inner  # q / sqrt(dh)
    flops += 2.0 * 2.0 * n_q * n_k * inner  # scores and the probability-weighted values
    flops += (SOFTMAX_FLOPS_PER_SCORE if masked else SOFTMAX_FLOPS_PER_SCORE - 2) * n_q * n_k * num_heads
    if bias:
        flops += (n_q + 2 * n_k) * inner + n_q * dim
    return float(flops)


def feed_forward_flops(n: int, dim: int, hidden: int, activation: Activation = "relu") -> float:
    """Forward FLOPs of `FeedForward` over n positions: two matmuls, two bias adds, activation."""
    return float(n * (4.0 * dim * hidden + hidden + dim + ACTIVATION_FLOPS[activation] * hidden))


def transformer_block_flops(n: int, dim: int, num_heads: int, ffn_dim: int, *,
                            activation: Activation = "relu", masked: bool = True,
                            zero_padding: bool = True) -> float:
    """Forward FLOPs of one `TransformerBlock` (self-attention over n positions): attention,
    feed-forward, two LayerNorms, two residual adds, and the padding select when `valid` is given.
    The same for every `norm` placement."""
    flops = attention_flops(n, n, dim, num_heads, masked=masked) + feed_forward_flops(n, dim, ffn_dim, activation)
    flops += layer_norm_flops(dim, 2 * n) + 2.0 * n * dim
    if zero_padding:
        flops += n * dim
    return float(flops)
