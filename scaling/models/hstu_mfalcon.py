"""M-FALCON inference for HSTU: score many candidates against one cached history (brief section 5).

Scoring definition (the ground truth). For one user with history items a_0..a_{n-1}, timestamps
ts_0..ts_{n-1} (n <= max_len - 1) and request time t, the score of candidate item c is

    score(c) = < out_c, item_table()[c] >

where out_c is the final, L2-normalised encoder output (`HSTU.encode`) at position n of the sequence
[a_0, ..., a_{n-1}, c] of length n + 1, padded to max_len, with c's timestamp t and every position's
query time the next event's time (ts_{i+1} for i < n - 1, t for the last history event and t for
the candidate itself). Computed naively that is m full passes for m candidates.

M-FALCON computes the same numbers with one pass over the history and a cheap pass per candidate:

1. Causality: the history's activations never depend on the token after it, so one pass over the
   history alone (`history_cache`) yields, per layer l, the history's keys K_l and values V_l
   [U, H, h, d] and the candidate's bias to them; the history's query times need only t.
2. A candidate at position n, layer l, with input x_c (x_c^0 = item_emb(c) sqrt(D) + pos_emb(n)):

       u, v_c, q_c, k_c = split(silu(LN(x_c) W_uvqk))                       (HSTUBlock.project)
       a = sum_{j<n} silu(q_c·k_j + rab_j) / norm v_j + silu(q_c·k_c + rab_self) / norm v_c
       x_c <- x_c + W_o(u * LN(a)) + b_o                                        (HSTUBlock.output)

   with rab_j = pos_w[max_len - 1 + j - n] + ts_w[bucket(t - ts_j)], rab_self = pos_w[max_len - 1]
   + ts_w[bucket(0)]: the bias it gets alone at position n, identical for every candidate. This is
   row n of the full pass: the history rows are the cached ones, the rows after n are padding.
3. Candidates go in static micro-batches of b_m tokens (`score_candidates`); in a micro-batch each
   candidate attends to the cached history and to itself only (candidate-to-candidate attention is
   masked, here by construction: the self term is a separate diagonal product), so b_m candidates
   cost O(b_m d^2 + b_m n d) per layer instead of b_m full passes of O(N d^2 + N^2 d). The last
   micro-batch is padded with item 0 and its scores dropped.

Divisor. The full pass divides attention by `attn_norm or N` with N its padded length; the ground
truth pads to max_len (the model's training layout), so both paths here divide by
`attn_norm or max_len`, whatever the history's padded width H.

Dropout must be off: call `model.eval()` first (checked). All functions are jit-compatible
(`nnx.jit(mfalcon_scores, static_argnames="micro_batch")`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.kernels.hstu_attention import candidate_mha
from scaling.models.hstu import HSTU
from scaling.models.sequence_base import l2_normalize
from scaling.sharding.embedding import lookup
from scaling.models.hstu_attention import candidate_bias, next_timestamps


class MFalconCache(NamedTuple):
    """What the candidates need from the history, per layer l (tuples of length num_layers).

    keys[l] [U, H, h, dqk], values[l] [U, H, h, dv]: the history's K and V at layer l (rows j >= n
    are padding, masked); rab_hist[l] [U, H], rab_self[l] [U]: a candidate's bias to the history and
    to itself; lengths [U]: n, the history length and the candidates' position; timestamps [U, H]
    and request_time [U]: what the attention kernel computes those biases from (`attention_impl`).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    rab_hist: tuple[jax.Array, ...]
    rab_self: tuple[jax.Array, ...]
    lengths: jax.Array
    timestamps: jax.Array
    request_time: jax.Array


def attention_divisor(model: HSTU) -> float:
    """The full pass's divisor at padded length max_len, which M-FALCON must reproduce."""
    return model.cfg.attn_norm or float(model.cfg.max_len)


def _check_deterministic(model: HSTU) -> None:
    # Dropout would make the candidate path draw different masks than the full pass (and inside
    # lax.map it could not advance the RNG), so inference requires eval mode.
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout) and module.rate > 0 and not module.deterministic:
            raise ValueError("M-FALCON scoring needs dropout off: call model.eval() first")


def history_cache(model: HSTU, items: jax.Array, timestamps: jax.Array, lengths: jax.Array,
                  request_time: jax.Array) -> MFalconCache:
    """One pass over the history: items, timestamps int [U, H] (left-aligned, H <= max_len),
    lengths int [U] (1 <= n <= max_len - 1), request_time int [U] -> the per-layer cache.

    Costs one encoder pass at width H; the candidates never touch the history again.
    """
    cfg = model.cfg
    if items.shape[1] > cfg.max_len:
        raise ValueError(f"history width {items.shape[1]} exceeds max_len {cfg.max_len}")
    _check_deterministic(model)
    pos = jnp.arange(items.shape[1])
    valid = pos[None, :] < lengths[:, None]
    x = jnp.where(valid[..., None], model.embed(items, pos[None]), 0.0)
    # The last history event's next event is the candidate, at the request time.
    query = jnp.where(pos[None, :] == lengths[:, None] - 1, request_time[:, None], next_timestamps(timestamps))
    norm = attention_divisor(model)
    keys, values, rab_hist, rab_self = [], [], [], []
    for block in model.blocks:
        hist, own = candidate_bias(*block.bias_tables(), timestamps, lengths, request_time)
        if not cfg.relative_bias:
            hist, own = jnp.zeros_like(hist), jnp.zeros_like(own)
        x, k, v = block.forward_with_kv(x, timestamps, lengths, query, norm=norm)
        keys.append(k)
        values.append(v)
        rab_hist.append(hist)
        rab_self.append(own)
    return MFalconCache(tuple(keys), tuple(values), tuple(rab_hist), tuple(rab_self), lengths, timestamps,
                        request_time)


def candidate_outputs(model: HSTU, cache: MFalconCache, candidates: jax.Array) -> jax.Array:
    """Final L2-normalised encoder outputs [U, B, D] of candidates int [U, B], each as if it were
    the only token after its user's history; sees the cache, never the history's ids."""
    x = model.embed(candidates, cache.lengths[:, None])  # every candidate sits at position n
    norm = attention_divisor(model)
    for layer, block in enumerate(model.blocks):
        u, v, q, k = block.project(x)
        pos_w, ts_w = block.bias_tables()
        tables = (dict(pos_w=pos_w, ts_w=ts_w, timestamps=cache.timestamps,
                       request_time=cache.request_time) if model.cfg.relative_bias else {})
        attn = candidate_mha(q, k, v, cache.keys[layer], cache.values[layer], cache.lengths, norm=norm,
                             rab_hist=cache.rab_hist[layer], rab_self=cache.rab_self[layer],
                             # the Mosaic GPU kernels have no candidates-only form: the Triton ones score
                             impl="auto" if model.cfg.attention_impl == "mosaic" else model.cfg.attention_impl,
                             **tables)
        x = block.output(x, u, attn)
    return l2_normalize(x)


def score_candidates(model: HSTU, cache: MFalconCache, candidates: jax.Array) -> jax.Array:
    """One micro-batch: candidates int [U, B] -> scores float [U, B].

    Normalises only the gathered rows: item_table() is row-wise, so this is item_table()[candidates]
    without an O(num_items D) pass per micro-batch.
    """
    out = candidate_outputs(model, cache, candidates)
    return jnp.sum(out * l2_normalize(lookup(model.item_emb, candidates)), axis=-1)


def mfalcon_scores(model: HSTU, items: jax.Array, timestamps: jax.Array, length: jax.Array,
                   request_time: jax.Array, candidates: jax.Array, micro_batch: int) -> jax.Array:
    """Scores of m candidates per user, equal to m full passes (module docstring), computed from one
    history pass plus ceil(m / micro_batch) candidate micro-batches of static size micro_batch.

    Batched: items, timestamps int [U, H], length int [U], request_time int [U], candidates int
    [U, m] -> [U, m]. One user: items, timestamps [H], length and request_time scalars, candidates
    [m] -> [m].
    """
    if items.ndim == 1:
        return mfalcon_scores(model, items[None], timestamps[None], jnp.reshape(length, (1,)),
                              jnp.reshape(request_time, (1,)), candidates[None], micro_batch)[0]
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    cache = history_cache(model, items, timestamps, length, request_time)
    users, m = candidates.shape
    chunks = math.ceil(m / micro_batch)
    padded = jnp.pad(candidates, ((0, 0), (0, chunks * micro_batch - m)))  # item 0; dropped below
    batches = padded.reshape(users, chunks, micro_batch).transpose(1, 0, 2)  # [chunks, U, b_m]
    # A loop (not one wide batch) keeps the live activations at b_m tokens whatever m is.
    scores = jax.lax.map(lambda batch: score_candidates(model, cache, batch), batches)
    return scores.transpose(1, 0, 2).reshape(users, chunks * micro_batch)[:, :m]
