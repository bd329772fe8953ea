"""HSTU's pointwise attention and its relative bias, as in the research code behind the published tables.

    rab = relative_bias(pos_w, ts_w, timestamps)                 # [B, N, N]
    out = hstu_attention(q, k, v, rab, lengths, norm=N)          # [B, N, h, dv]

and, for M-FALCON inference (scaling/models/hstu_mfalcon.py), candidates appended after a cached history:
    rab_hist, rab_self = candidate_bias(pos_w, ts_w, timestamps, lengths, request_time)     # [B, H], [B]
    out = candidate_attention(q, k, v, k_hist, v_hist, rab_hist, rab_self, lengths, norm)   # [B, M, h, dv]

attention(i, j) = silu(q_i · k_j + rab[i, j]) / norm for j <= i (the diagonal included), 0 otherwise;
out_i = sum_j attention(i, j) v_j. There is no softmax and no 1/sqrt(d) scale; `norm` is the padded
maximum length (the research code divides by it, not by the number of valid tokens). Keys past a
sequence's length and query rows past it are zero.

The relative bias, one per layer and shared by the heads:
    rab[i, j] = pos_w[N - 1 + j - i] + ts_w[bucket(query_ts[i] - ts[j])]
with pos_w [2N - 1], ts_w [num_buckets + 1], query_ts[i] the time of the event position i predicts
(the research code uses ts[i + 1], the last position its own; callers that know the next-event
times pass them), and bucket(d) = clamp(floor(ln(max(|d|, 1)) / 0.301), 0, num_buckets) for whole
seconds d. The research code evaluates that logarithm in float32, which moves about 2.6e-6 of
integer gaps into the next bucket (the first is 417,901 s: bucket 43 where exact math gives 42),
and float32 logs differ across libraries in the last ulp. So the bucket is looked up in the
research code's integer bucket edges instead: bucket(d) = #{b >= 1 : EDGES[b] <= |d|}, exact and
the same on every backend.

This is the pure-jnp reference that the Pallas kernel (scaling/kernels/) must match, forward and
backward; it takes dense padded tensors plus lengths, the same inputs the kernel takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BUCKET_DIVISOR = 0.301

# The smallest whole-second gap of each bucket b = 0, 1, 2, ... as the research code's float32
# arithmetic computes floor(ln(gap) / 0.301) (bucket 1 is empty: ln 2 / 0.301 = 2.30). Gaps beyond
# 2^31 - 1 s (68 years) cannot occur in int32 timestamps, so the table stops there (bucket 71).
BUCKET_EDGES = (
    0, 2, 2, 3, 4, 5, 7, 9, 12, 16, 21, 28, 38, 51, 68, 92, 124, 167, 226, 305, 412, 557, 752, 1016,
    1372, 1854, 2505, 3385, 4574, 6180, 8350, 11283, 15245, 20600, 27834, 37610, 50818, 68666, 92782,
    125367, 169397, 228891, 309280, 417901, 564672, 762990, 1030959, 1393042, 1882290, 2543367, 3436623,
    4643595, 6274467, 8478123, 11455710, 15479070, 20915478, 28261151, 38186755, 51598331, 69720053,
    94206437, 127292700, 171999177, 232406601, 314030161, 424319920, 573345376, 774710112, 1046794145,
    1414438848, 1911204161,
)


def next_timestamps(timestamps: jax.Array) -> jax.Array:
    """The research code's query times: ts[i + 1], the last position keeping its own."""
    return jnp.concatenate([timestamps[:, 1:], timestamps[:, -1:]], axis=1)


def time_buckets(timestamps: jax.Array, num_buckets: int, query_timestamps: jax.Array | None = None) -> jax.Array:
    """int32 [B, N, N]: bucket of query_ts[i] - ts[j]; query_ts defaults to `next_timestamps(ts)`.

    Pass the true next-event times (the target's, or the request time at inference) so that the
    last valid position does not read a padded timestamp.
    """
    query = next_timestamps(timestamps) if query_timestamps is None else query_timestamps
    # Differences in the integer dtype: unix seconds (~1.7e9) are 128 s apart in float32.
    delta = jnp.abs(query[:, :, None].astype(jnp.int32) - timestamps[:, None, :].astype(jnp.int32))
    # The float32 formula is within one bucket of the table; two edge lookups settle it (cheaper
    # than a binary search over the edges, on every backend).
    edges = jnp.asarray(BUCKET_EDGES, jnp.int32)
    approx = jnp.floor(jnp.log(jnp.maximum(delta, 1).astype(jnp.float32)) / BUCKET_DIVISOR)
    approx = jnp.clip(approx, 0, len(BUCKET_EDGES) - 2).astype(jnp.int32)
    bucket = approx + (delta >= edges[approx + 1]).astype(jnp.int32) - (delta < edges[approx]).astype(jnp.int32)
    return jnp.clip(bucket, 0, num_buckets)


def relative_bias(pos_w: jax.Array, ts_w: jax.Array, timestamps: jax.Array,
                  query_timestamps: jax.Array | None = None, *, buckets: jax.Array | None = None) -> jax.Array:
    """float [B, N, N]: learned relative-position bias plus learned log-bucketed time bias.

    pos_w [2N - 1], ts_w [num_buckets + 1], timestamps int [B, N], query_timestamps int [B, N]
    (each position's next-event time; default: the research code's shifted timestamps).
    buckets int [B, N, N]: `time_buckets(...)` computed once and shared by the layers (they differ
    only in their weights), instead of from the timestamps here.
    """
    n = timestamps.shape[1]
    if pos_w.shape[0] != 2 * n - 1:
        raise ValueError(f"pos_w must have 2N - 1 = {2 * n - 1} entries for N = {n}, got {pos_w.shape[0]}")
    if buckets is None:
        buckets = time_buckets(timestamps, ts_w.shape[0] - 1, query_timestamps)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    pos = pos_w[n - 1 + j - i]
    return pos[None] + ts_w[buckets]


def hstu_attention(q: jax.Array, k: jax.Array, v: jax.Array, rab: jax.Array | None, lengths: jax.Array,
                   norm: float) -> jax.Array:
    """q, k [B, N, h, dqk], v [B, N, h, dv], rab [B, N, N] or None, lengths int [B] -> [B, N, h, dv].

    Causal with the diagonal; SiLU in float32 whatever the input dtype; divided by `norm`.
    """
    n = q.shape[1]
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    if rab is not None:
        scores = scores + rab[:, None].astype(jnp.float32)
    pos = jnp.arange(n)
    valid = (pos[None, :] < lengths[:, None])  # [B, N]
    mask = (pos[:, None] >= pos[None, :])[None] & valid[:, None, :] & valid[:, :, None]  # [B, N(query), N(key)]
    weights = jnp.where(mask[:, None], jax.nn.silu(scores) / norm, 0.0)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def candidate_bias(pos_w: jax.Array, ts_w: jax.Array, timestamps: jax.Array, lengths: jax.Array,
                   request_time: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The relative bias of a candidate appended alone after its history (M-FALCON, brief section 5).

    A candidate sits at position n = lengths with timestamp and query time both `request_time`, so
    rab_hist[b, j] = pos_w[P - 1 + j - n] + ts_w[bucket(t - ts[j])] for its history key j < n and
    rab_self[b] = pos_w[P - 1] + ts_w[bucket(0)] for itself, the same for every candidate.
    pos_w [2P - 1] (P >= n + 1: the full table, or a central slice as `relative_bias` takes),
    ts_w [num_buckets + 1], timestamps int [B, H], lengths int [B], request_time int [B]
    -> rab_hist [B, H] (entries at j >= n are meaningless), rab_self [B].
    """
    p = (pos_w.shape[0] + 1) // 2
    h = timestamps.shape[1]
    # Keys past the history would index beyond the table; they are masked, so clip them.
    offset = jnp.clip(p - 1 + jnp.arange(h)[None, :] - lengths[:, None], 0, 2 * p - 2)
    query = request_time[:, None]  # [B, 1]: one query row whose time is t
    hist = pos_w[offset] + ts_w[time_buckets(timestamps, ts_w.shape[0] - 1, query)[:, 0]]
    own = pos_w[p - 1] + ts_w[time_buckets(query, ts_w.shape[0] - 1, query)[:, 0, 0]]
    return hist, own


def candidate_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_hist: jax.Array, v_hist: jax.Array,
                        rab_hist: jax.Array, rab_self: jax.Array, lengths: jax.Array, norm: float) -> jax.Array:
    """Attention of M candidates, each appended alone after its user's history (M-FALCON).

    q, k [B, M, h, dqk] and v [B, M, h, dv]: the candidates' own projections; k_hist [B, H, h, dqk],
    v_hist [B, H, h, dv]: the cached history (valid for j < lengths[b]); rab_hist [B, H], rab_self [B]
    from `candidate_bias` -> [B, M, h, dv]:

        out_m = sum_{j < n} silu(q_m · k_j + rab_hist[j]) / norm · v_j + silu(q_m · k_m + rab_self) / norm · v_m

    which is row n of `hstu_attention` on [history, candidate m] (length n + 1): queries are the
    candidates, keys the history plus the candidate itself, never another candidate. SiLU in float32.
    """
    scores = jnp.einsum("bmhd,bnhd->bhmn", q, k_hist, preferred_element_type=jnp.float32)
    scores = scores + rab_hist[:, None, None, :].astype(jnp.float32)
    valid = jnp.arange(k_hist.shape[1])[None, :] < lengths[:, None]  # [B, H]
    weights = jnp.where(valid[:, None, None, :], jax.nn.silu(scores) / norm, 0.0)
    out = jnp.einsum("bhmn,bnhd->bmhd", weights.astype(v.dtype), v_hist, preferred_element_type=jnp.float32)
    own = jnp.einsum("bmhd,bmhd->bmh", q, k, preferred_element_type=jnp.float32)
    own = jax.nn.silu(own + rab_self[:, None, None].astype(jnp.float32)) / norm
    out = out + own[..., None].astype(v.dtype) * v.astype(jnp.float32)
    return out.astype(v.dtype)
