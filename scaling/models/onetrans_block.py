"""The OneTrans stack (Zhang et al., WWW'26): causal pre-norm Transformer blocks over
[S-tokens ; NS-tokens] with mixed parameterization, the pyramid schedule, and two-stage caching.

Tokens: S-tokens s [B, L, d] (the merged behaviour sequence, RIGHT-aligned: the most recent event
is position L-1, padding first, `s_valid` [B, L]) followed by N NS-tokens ns [B, N, d] (the
non-sequential features). Order matters: S first, NS last, one causal mask over the concatenation.

Block (pre-norm, RMSNorm):   Z = MixedMHA(Norm(X)) + X;    X' = MixedFFN(Norm(Z)) + Z.

Mixed parameterization: every projection (Q, K, V, the attention output, both FFN matrices) has ONE
weight shared by all S-tokens and a token-specific weight for each NS position i:
    W x_j = W_S x_j (j an S-token),    W x_i = W_NS[i] x_i (i-th NS-token),
written as two einsums ('bld,dhk->blhk' and 'bnd,ndhk->bnhk'), never a loop over tokens. The paper
leaves the output projection's sharing open; it is mixed here like the rest. FFN(x) = W_2 act(W_1 x).
No biases (the norms carry the scales).

Causal mask: position p attends position q iff q <= p and q is a valid token. An S-token therefore
sees only earlier S-tokens (never an NS-token), and an NS-token sees every valid S-token, the NS
tokens before it, and itself. The S side is candidate-independent: the basis of caching. The
attention is `flash_mha` (scaling/kernels/flash_attention.py: a Pallas kernel on NVIDIA GPUs,
`attention_impl`), which takes the valid keys as a range from the first valid S-token on: hence
the S-tokens must be right-aligned (`padding_count`).

Pyramid: layer l lets only the last `keep[l]` S-tokens (the most recent, next to the NS-tokens)
issue queries; keys and values cover all current tokens; only the query positions' outputs go on,
so the S length shrinks L -> keep[0] -> keep[1] ... `pyramid_schedule` interpolates linearly from
L to min(N, L) over the layers, rounding to a multiple (the paper: 1190 -> 12 in multiples of 32).
Attention at layer l costs O((keep + N) (L_l + N) d) instead of O((L + N)^2 d). The last layer's
S outputs are never read (the head reads the final NS-tokens), so the last block issues NS queries
only and has no shared query, output or FFN weights: its schedule entry is not computed.

Two-stage caching (`sequence_cache` then `candidate_forward`): for one request, the S-side is run
once and each layer's S keys and values are cached; each of C candidates then runs only its N
NS-tokens against the cache. Scores equal the full recomputation (tests/test_onetrans.py).

FLOPs (forward, per example, the project's convention, scaling/models/mlp.py): every matmul
2 x multiply-adds at the sizes actually computed (the dense path computes the full
(keep + N) x (L_l + N) score block, whatever the mask), softmax `SOFTMAX_FLOPS_PER_SCORE` per
score, RMSNorm 4d + 2 per token, activations `ACTIVATION_FLOPS`, residual adds one per element.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.kernels.flash_attention import flash_mha
from scaling.models.transformer import (
    ACTIVATION_FLOPS,
    MASKED_SCORE,
    SOFTMAX_FLOPS_PER_SCORE,
    Activation,
    activate,
    xavier_normal,
)
from scaling.sharding.annotate import logical_param
from scaling.sharding.rules import constrain

__all__ = [
    "MixedProjection",
    "OneTransBlock",
    "padding_count",
    "OneTransStack",
    "RMSNorm",
    "pyramid_schedule",
    "onetrans_stack_flops",
]

# XLA's count for an RMSNorm of one d-vector: square, mean (sum + scale), add eps, multiply by the
# rsqrt, multiply by the scale (the rsqrt itself is a transcendental).
_RMS_PER_ELEMENT = 4
_RMS_PER_VECTOR = 2


def pyramid_schedule(seq_len: int, num_ns: int, num_layers: int, *, multiple: int = 32,
                     enabled: bool = True) -> tuple[int, ...]:
    """S-tokens kept as queries by each layer: linear from `seq_len` down to min(num_ns, seq_len)
    at the last layer, rounded to the nearest `multiple`, never growing, never below the target.

    >>> pyramid_schedule(1190, 12, 6)
    (992, 800, 608, 416, 224, 12)
    """
    if not enabled or num_layers == 0:
        return (seq_len,) * num_layers
    target = min(num_ns, seq_len)
    keep, previous = [], seq_len
    for layer in range(1, num_layers + 1):
        if layer == num_layers:
            k = target
        else:
            raw = seq_len + (target - seq_len) * layer / num_layers
            k = int(round(raw / multiple)) * multiple if multiple > 1 else int(round(raw))
            k = max(target, min(previous, k))
        keep.append(k)
        previous = k
    return tuple(keep)


class RMSNorm(nnx.Module):
    """x [..., d] -> x / sqrt(mean(x^2) + eps) * scale (statistics in float32)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = logical_param(jnp.ones((dim,), jnp.float32), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class MixedProjection(nnx.Module):
    """A linear map shared by the S-tokens and specific to each of the N NS-tokens, from input
    axes `in_shape` to output axes `out_shape` (one or two each: d -> (H, dh) for Q/K/V, (H, dh)
    -> d for the attention output, d -> F -> d for the FFN).

    shared [*in, *out]; per_token [N, *in, *out] ("fields" first). `s(x)` maps S-tokens
    x [..., L, *in] -> [..., L, *out]; `ns(x)` maps NS-tokens x [..., N, *in] -> [..., N, *out]
    (any leading axes, e.g. candidates)."""

    def __init__(self, num_ns: int, in_shape: tuple[int, ...], in_axes: tuple[str, ...], out_shape: tuple[int, ...],
                 out_axes: tuple[str, ...], *, shared: bool = True, rngs: nnx.Rngs):
        if not (1 <= len(in_shape) <= 2 and 1 <= len(out_shape) <= 2):
            raise ValueError("a mixed projection has one or two input and output axes")
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        shape, axes = (*in_shape, *out_shape), (*in_axes, *out_axes)
        self.shared = logical_param(xavier_normal(rngs.params(), shape, fan_in, fan_out), axes) if shared else None
        self.per_token = logical_param(xavier_normal(rngs.params(), (num_ns, *shape), fan_in, fan_out), ("fields", *axes))
        self._in, self._out = "ab"[: len(in_shape)], "yz"[: len(out_shape)]  # einsum letters

    def s(self, x: jax.Array) -> jax.Array:
        i, o = self._in, self._out
        return jnp.einsum(f"...l{i},{i}{o}->...l{o}", x, self.shared[...].astype(x.dtype))

    def ns(self, x: jax.Array) -> jax.Array:
        i, o = self._in, self._out
        return jnp.einsum(f"...n{i},n{i}{o}->...n{o}", x, self.per_token[...].astype(x.dtype))


def padding_count(s_valid: jax.Array) -> jax.Array:
    """s_valid bool [B, L] (right-aligned: padding first) -> int32 [B], the first valid position:
    the attention's `key_start` (scaling/kernels/flash_attention.py)."""
    return s_valid.shape[1] - s_valid.sum(axis=1, dtype=jnp.int32)


class OneTransBlock(nnx.Module):
    """One OneTrans block: (s [B, L, d], ns [B, N, d], s_valid [B, L], keep) ->
    (s' [B, keep, d], ns' [B, N, d], s_valid' [B, keep]).

    `s_queries=False` (the last block): only NS-tokens issue queries (keep must be 0), and the
    S-side query, output and FFN weights, which nothing would train, are not created."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_ns: int, *,
                 activation: Activation = "relu", s_queries: bool = True, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.activation = num_heads, dim // num_heads, activation
        self.attention_impl = attention_impl  # auto | pallas | xla: scaling/kernels/dispatch.py
        heads = (num_heads, self.head_dim)
        self.norm_attn = RMSNorm(dim)
        self.norm_ffn = RMSNorm(dim)
        self.s_queries = s_queries
        embed, head_axes = ((dim,), ("embed",)), (heads, ("heads", "kv"))
        self.q = MixedProjection(num_ns, *embed, *head_axes, shared=s_queries, rngs=rngs)
        self.k = MixedProjection(num_ns, *embed, *head_axes, rngs=rngs)
        self.v = MixedProjection(num_ns, *embed, *head_axes, rngs=rngs)
        self.o = MixedProjection(num_ns, *head_axes, *embed, shared=s_queries, rngs=rngs)
        self.w_1 = MixedProjection(num_ns, *embed, (ffn_dim,), ("mlp",), shared=s_queries, rngs=rngs)
        self.w_2 = MixedProjection(num_ns, (ffn_dim,), ("mlp",), *embed, shared=s_queries, rngs=rngs)

    def _kv_s(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """S-token keys and values [B, L, H, dh] of y [B, L, d], as one matmul over the two shared
        weights stacked: y is read once, and once in the backward's dX."""
        w = jnp.stack([self.k.shared[...], self.v.shared[...]], axis=1).astype(y.dtype)  # [d, 2, H, dh]
        kv = jnp.einsum("bla,aphk->blphk", y, w)
        return kv[:, :, 0], kv[:, :, 1]

    def _ffn_s(self, z: jax.Array) -> jax.Array:
        """Pre-norm residual FFN on S-tokens (the shared weights)."""
        return z + self.w_2.s(activate(self.w_1.s(self.norm_ffn(z)), self.activation))

    def _ffn_ns(self, z: jax.Array) -> jax.Array:
        """Pre-norm residual FFN on NS-tokens (each its own weights)."""
        return z + self.w_2.ns(activate(self.w_1.ns(self.norm_ffn(z)), self.activation))

    def __call__(self, s: jax.Array, ns: jax.Array, s_valid: jax.Array, keep: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        length = s.shape[1]
        if keep and not self.s_queries:
            raise ValueError("this block issues NS queries only (keep must be 0)")
        y_s, y_ns = self.norm_attn(s), self.norm_attn(ns)
        q = self.q.ns(y_ns) if not keep else jnp.concatenate([self.q.s(y_s[:, length - keep:]), self.q.ns(y_ns)], axis=1)
        k_s, v_s = self._kv_s(y_s)
        k = jnp.concatenate([k_s, self.k.ns(y_ns)], axis=1)
        v = jnp.concatenate([v_s, self.v.ns(y_ns)], axis=1)
        # Queries are S positions L-keep..L-1 then NS L..L+N-1, keys 0..L+N-1; the valid keys are
        # the S-tokens from the first valid one on (right-aligned) and every NS-token.
        a = flash_mha(q, k, v, key_start=padding_count(s_valid), q_offset=length - keep,
                      impl=self.attention_impl)  # [B, keep + N, H, dh]
        z_ns = ns + self.o.ns(a[:, keep:])
        valid = s_valid[:, length - keep:]
        if not keep:
            return s[:, length:], self._ffn_ns(z_ns), valid
        z_s = s[:, length - keep:] + self.o.s(a[:, :keep])
        return jnp.where(valid[..., None], self._ffn_s(z_s), 0.0), self._ffn_ns(z_ns), valid

    def sequence_only(self, s: jax.Array, s_valid: jax.Array, keep: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Stage I: the S-tokens alone (they never attend an NS-token) -> (their outputs
        [B, keep, d], and their keys and values [B, L, H, dh], which the cache keeps)."""
        length = s.shape[1]
        y = self.norm_attn(s)
        k, v = self._kv_s(y)
        if not keep:  # the last block: no S query
            return s[:, length:], k, v
        q = self.q.s(y[:, length - keep:])
        a = flash_mha(q, k, v, key_start=padding_count(s_valid), q_offset=length - keep, impl=self.attention_impl)
        z_s = s[:, length - keep:] + self.o.s(a)
        valid = s_valid[:, length - keep:]
        return jnp.where(valid[..., None], self._ffn_s(z_s), 0.0), k, v

    def candidates(self, k_s: jax.Array, v_s: jax.Array, s_valid: jax.Array, ns: jax.Array) -> jax.Array:
        """Stage II: NS-tokens of C candidates per request, ns [B, C, N, d], against the cached S
        keys/values k_s, v_s [B, L, H, dh] (s_valid [B, L]) -> ns' [B, C, N, d]."""
        n = ns.shape[2]
        y = self.norm_attn(ns)
        q, k_ns, v_ns = self.q.ns(y), self.k.ns(y), self.v.ns(y)  # [B, C, N, H, dh]
        scale = 1.0 / math.sqrt(self.head_dim)
        q = q * jnp.asarray(scale, q.dtype)
        scores_s = jnp.einsum("bcnhk,blhk->bchnl", q, k_s, preferred_element_type=jnp.float32)
        scores_ns = jnp.einsum("bcnhk,bcmhk->bchnm", q, k_ns, preferred_element_type=jnp.float32)
        scores_s = jnp.where(s_valid[:, None, None, None, :], scores_s, MASKED_SCORE)
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))
        scores_ns = jnp.where(causal, scores_ns, MASKED_SCORE)
        probs = jax.nn.softmax(jnp.concatenate([scores_s, scores_ns], axis=-1), axis=-1)
        p_s, p_ns = probs[..., : k_s.shape[1]], probs[..., k_s.shape[1]:]
        a = (jnp.einsum("bchnl,blhk->bcnhk", p_s.astype(v_s.dtype), v_s)
             + jnp.einsum("bchnm,bcmhk->bcnhk", p_ns.astype(v_ns.dtype), v_ns))
        return self._ffn_ns(ns + self.o.ns(a))


class OneTransStack(nnx.Module):
    """`num_layers` OneTrans blocks with a pyramid schedule `keep` (one entry per layer)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, num_ns: int,
                 keep: tuple[int, ...], *, activation: Activation = "relu", attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        if len(keep) != num_layers:
            raise ValueError(f"the pyramid needs one entry per layer, got {len(keep)} for {num_layers}")
        self.keep = tuple(int(k) for k in keep[:-1]) + (0,)  # the last layer's S outputs are unread
        self.blocks = nnx.List([OneTransBlock(dim, num_heads, ffn_dim, num_ns, activation=activation,
                                              s_queries=layer < num_layers - 1, attention_impl=attention_impl,
                                              rngs=rngs)
                                for layer in range(num_layers)])
        self.final_norm = RMSNorm(dim)

    def __call__(self, s: jax.Array, ns: jax.Array, s_valid: jax.Array) -> jax.Array:
        """s [B, L, d] (right-aligned), ns [B, N, d], s_valid [B, L] -> final NS-tokens [B, N, d]."""
        for block, keep in zip(self.blocks, self.keep):
            s, ns = constrain(s, ("batch",)), constrain(ns, ("batch",))  # block boundaries: batch split
            s, ns, s_valid = block(s, ns, s_valid, min(keep, s.shape[1]))
        return self.final_norm(ns)

    def sequence_cache(self, s: jax.Array, s_valid: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """Stage I, once per request: each layer's (S keys [B, L_l, H, dh], S values, S validity)."""
        cache = []
        for block, keep in zip(self.blocks, self.keep):
            keep = min(keep, s.shape[1])
            out, k, v = block.sequence_only(s, s_valid, keep)
            cache.append((k, v, s_valid))
            s, s_valid = out, s_valid[:, s_valid.shape[1] - keep:]
        return cache

    def candidate_forward(self, cache: list[tuple[jax.Array, jax.Array, jax.Array]], ns: jax.Array) -> jax.Array:
        """Stage II: ns [B, C, N, d] (C candidates per request) -> final NS-tokens [B, C, N, d]."""
        for block, (k, v, valid) in zip(self.blocks, cache):
            ns = block.candidates(k, v, valid, ns)
        return self.final_norm(ns)


def onetrans_stack_flops(seq_len: int, num_ns: int, dim: int, num_heads: int, ffn_dim: int,
                         keep: tuple[int, ...], *, activation: Activation = "relu") -> float:
    """Forward FLOPs of `OneTransStack` for one example (module docstring)."""
    flops, length, n, d = 0.0, seq_len, num_ns, dim
    rms = lambda count: count * (_RMS_PER_ELEMENT * d + _RMS_PER_VECTOR)  # noqa: E731
    for k in (*keep[:-1], 0):  # the last layer issues NS queries only
        k = min(k, length)
        n_q, n_k = k + n, length + n
        flops += rms(n_k)                                   # attention norm over every current token
        flops += 2.0 * d * d * (2 * n_q + 2 * n_k)          # Q, O over queries; K, V over keys
        flops += n_q * d                                    # q / sqrt(dh)
        flops += 2.0 * 2.0 * n_q * n_k * d                  # scores and values (full block)
        flops += SOFTMAX_FLOPS_PER_SCORE * n_q * n_k * num_heads
        flops += n_q * d                                    # residual
        flops += rms(n_q)
        flops += n_q * (4.0 * d * ffn_dim + ACTIVATION_FLOPS[activation] * ffn_dim + d)  # FFN + residual
        flops += k * d                                      # zero the padded S outputs
        length = k
    return float(flops + rms(n))
