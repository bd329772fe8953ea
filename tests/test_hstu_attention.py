"""HSTU attention and relative bias against an independent float64 loop over the brief's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.models.hstu_attention import hstu_attention, relative_bias, time_buckets


def _silu(x):
    return x / (1.0 + math.exp(-x))


def _reference(q, k, v, pos_w, ts_w, ts, lengths, norm):
    """Loops, float64, straight from the brief (section 1.2)."""
    B, N, H, _ = q.shape
    out = np.zeros(v.shape)
    nb = len(ts_w) - 1
    for b in range(B):
        for i in range(lengths[b]):
            nxt = ts[b, i + 1] if i + 1 < N else ts[b, N - 1]
            for j in range(i + 1):
                delta = abs(float(nxt) - float(ts[b, j]))
                bucket = min(max(int(math.log(max(delta, 1.0)) / 0.301), 0), nb)
                rab = pos_w[N - 1 + j - i] + ts_w[bucket]
                for h in range(H):
                    a = _silu(float(q[b, i, h] @ k[b, j, h]) + rab) / norm
                    out[b, i, h] += a * v[b, j, h]
    return out


def test_buckets_match_the_briefs_examples():
    # ts in seconds: 1 min -> 13, 1 h -> 27, 1 day -> 37, 1 week -> 44, 30 days -> 49, 1 year -> 57
    gaps = [60, 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400]
    for origin in (0, 1_700_000_000):  # unix seconds must not lose the small gaps to float rounding
        ts = jnp.array([[origin, origin + g] for g in gaps], jnp.int32)
        buckets = time_buckets(ts, 128)[:, 0, 0]  # query 0 looks at its next timestamp: delta = gap
        assert buckets.tolist() == [13, 27, 37, 44, 49, 57]
    ts = jnp.array([[1_700_000_000, 1_700_000_002]], jnp.int32)
    assert time_buckets(ts, 128)[0, 0, 0] == 2  # ln(2) / 0.301 = 2.3


def test_buckets_follow_the_research_codes_float32_edges():
    """417,900 s is bucket 42 by any arithmetic; 417,901 s is 43 in the research code (float32 log)
    though exact math says 42; an edge table makes both portable. Below that first disagreement
    every gap follows the real-number formula (checked densely and at the edges' neighbours); above
    it float32 moves most edges by a few seconds, which the table reproduces."""
    from scaling.models.hstu_attention import BUCKET_EDGES

    gaps = np.array([417_900, 417_901, 0, 1, 2, 3], np.int32)
    ts = jnp.stack([jnp.zeros_like(gaps), gaps], axis=1)
    assert time_buckets(ts, 128)[:, 0, 0].tolist() == [42, 43, 0, 0, 2, 3]
    dense = np.arange(1, 100_000, 7, dtype=np.int64)
    near = np.array([e + o for e in BUCKET_EDGES[2:] for o in (-1, 0, 1) if e < 417_901], np.int64)
    for gaps in (dense, near):
        ts = jnp.stack([jnp.zeros(len(gaps), jnp.int32), jnp.asarray(gaps, jnp.int32)], axis=1)
        exact = np.floor(np.log(gaps) / 0.301).clip(0, 128)
        np.testing.assert_array_equal(np.asarray(time_buckets(ts, 128)[:, 0, 0]), exact)
    edges = np.array(BUCKET_EDGES[43:], np.int32)  # the float32 region: each edge opens its bucket
    for shift, first in ((0, 43), (-1, 42)):
        ts = jnp.stack([jnp.zeros(len(edges), jnp.int32), jnp.asarray(edges + shift)], axis=1)
        assert time_buckets(ts, 128)[:, 0, 0].tolist() == list(range(first, first + len(edges)))
    assert time_buckets(jnp.array([[0, 2**31 - 1]], jnp.int32), 64)[0, 0, 0] == 64  # clamped


@pytest.mark.parametrize("lengths", [[5, 3, 0], [5, 1, 4]])
def test_attention_matches_loop_reference(lengths):
    rng = np.random.default_rng(0)
    B, N, H, D = 3, 5, 2, 4
    q, k, v = (rng.normal(size=(B, N, H, D)) for _ in range(3))
    pos_w, ts_w = rng.normal(size=2 * N - 1), rng.normal(size=9)
    ts = np.sort(rng.integers(0, 10_000, size=(B, N)), axis=1)
    lengths = np.array(lengths)
    v = v * (np.arange(N)[None, :, None, None] < lengths[:, None, None, None])  # padded v is 0, as in the code
    rab = relative_bias(jnp.asarray(pos_w, jnp.float32), jnp.asarray(ts_w, jnp.float32), jnp.asarray(ts, jnp.int32))
    out = hstu_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), rab, jnp.asarray(lengths), norm=7.0)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, pos_w, ts_w, ts, lengths, 7.0), rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_inputs_and_both_bias_tables():
    rng = np.random.default_rng(1)
    B, N, H, D = 2, 6, 1, 3
    q, k, v = (jnp.asarray(rng.normal(size=(B, N, H, D)), jnp.float32) for _ in range(3))
    ts = jnp.asarray(np.sort(rng.integers(0, 5000, size=(B, N)), axis=1), jnp.int32)
    lengths = jnp.array([6, 4])

    def loss(q, k, v, pos_w, ts_w):
        return jnp.sum(hstu_attention(q, k, v, relative_bias(pos_w, ts_w, ts), lengths, norm=N) ** 2)

    pos_w, ts_w = jnp.asarray(rng.normal(size=2 * N - 1), jnp.float32), jnp.asarray(rng.normal(size=17), jnp.float32)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, pos_w, ts_w)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(grads[3][N:])).sum() == 0  # causal: only pos_w[0..N-1] (j <= i) is used
    assert np.abs(np.asarray(grads[3][:N])).sum() > 0 and np.abs(np.asarray(grads[4])).sum() > 0
    # finite-difference check of one bias-table entry
    eps = 1e-2
    bumped = pos_w.at[N - 1].add(eps)
    fd = (loss(q, k, v, bumped, ts_w) - loss(q, k, v, pos_w.at[N - 1].add(-eps), ts_w)) / (2 * eps)
    assert float(fd) == pytest.approx(float(grads[3][N - 1]), rel=2e-2)
