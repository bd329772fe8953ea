"""OneTrans's stack against its math: a numpy block, the causal [S;NS] mask, the pyramid schedule,
the two-stage KV cache (equal to full recomputation) and the analytic FLOPs (against XLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.models.onetrans_block import OneTransBlock, OneTransStack, onetrans_stack_flops, pyramid_schedule


def _inputs(batch=2, length=12, num_ns=3, dim=8, lengths=(9, 2), candidates=None, seed=0):
    rng = np.random.default_rng(seed)
    valid = np.arange(length)[None] >= (length - np.asarray(lengths))[:, None]  # right-aligned
    s = np.where(valid[..., None], rng.normal(size=(batch, length, dim)), 0.0)
    shape = (batch, num_ns, dim) if candidates is None else (batch, candidates, num_ns, dim)
    return jnp.asarray(s, jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(valid)


def _rms(x, scale, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _numpy_block(block, s, ns, valid, keep):
    """One block written out token by token: shared weights for S-tokens, W[i] for NS-token i."""
    p = {name: np.asarray(getattr(block, name).shared[...]) for name in ("q", "k", "v", "o", "w_1", "w_2")}
    t = {name: np.asarray(getattr(block, name).per_token[...]) for name in ("q", "k", "v", "o", "w_1", "w_2")}
    g1, g2 = np.asarray(block.norm_attn.scale[...]), np.asarray(block.norm_ffn.scale[...])
    length, n = s.shape[0], ns.shape[0]
    x = np.concatenate([s, ns])
    ok = np.concatenate([valid, np.ones(n, bool)])

    def proj(name, vec, pos):  # the weight of token `pos`: shared (S) or its own (NS)
        w = p[name] if pos < length else t[name][pos - length]
        return np.tensordot(vec, w, axes=([0], [0])) if name != "o" else np.einsum("hk,hkd->d", vec, w)

    y = _rms(x, g1)
    heads, dh = p["q"].shape[1], p["q"].shape[2]
    out = []
    for i in range(length - keep, length + n):
        q = proj("q", y[i], i) / np.sqrt(dh)
        keys = [j for j in range(length + n) if j <= i and ok[j]]
        a = np.zeros((heads, dh))
        if keys:
            kk = np.stack([proj("k", y[j], j) for j in keys])
            vv = np.stack([proj("v", y[j], j) for j in keys])
            scores = np.einsum("hk,jhk->hj", q, kk)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            a = np.einsum("hj,jhk->hk", w, vv)
        z = x[i] + proj("o", a, i)
        h = np.maximum(proj("w_1", _rms(z, g2), i), 0.0)
        z = z + proj("w_2", h, i)
        out.append(z if (i >= length or valid[i]) else np.zeros_like(z))
    out = np.stack(out)
    return out[:keep], out[keep:]


def test_block_matches_a_token_by_token_numpy_forward():
    block = OneTransBlock(8, 2, 16, 3, rngs=nnx.Rngs(3))
    s, ns, valid = _inputs(length=7, lengths=(5, 0))
    out_s, out_ns, out_valid = block(s, ns, valid, 4)
    for b in range(2):
        ref_s, ref_ns = _numpy_block(block, np.asarray(s[b]), np.asarray(ns[b]), np.asarray(valid[b]), 4)
        np.testing.assert_allclose(out_s[b], ref_s, atol=1e-5)
        np.testing.assert_allclose(out_ns[b], ref_ns, atol=1e-5)
    np.testing.assert_array_equal(out_valid, valid[:, 3:])
    # the last block of a stack issues NS queries only: same NS outputs as keeping no S query
    last = OneTransBlock(8, 2, 16, 3, s_queries=False, rngs=nnx.Rngs(3))
    assert last.q.shared is None and last.w_1.shared is None and last.k.shared is not None
    _, ns_only, _ = last(s, ns, valid, 0)
    for b in range(2):
        _, ref_ns = _numpy_block(block, np.asarray(s[b]), np.asarray(ns[b]), np.asarray(valid[b]), 0)
        np.testing.assert_allclose(block(s, ns, valid, 0)[1][b], ref_ns, atol=1e-5)
    assert ns_only.shape == ns.shape


def test_s_tokens_never_see_ns_tokens_and_padding_is_inert():
    stack = OneTransStack(2, 8, 2, 16, 3, (12, 12), rngs=nnx.Rngs(0))
    s, ns, valid = _inputs()
    block = stack.blocks[0]
    a_s, a_ns, _ = block(s, ns, valid, 12)
    b_s, b_ns, _ = block(s, ns + 1.0, valid, 12)
    np.testing.assert_allclose(a_s, b_s, atol=1e-6)  # the S side is candidate-independent
    assert float(jnp.abs(a_ns - b_ns).max()) > 1e-3
    padded = jnp.where(valid[..., None], s, 7.0)     # garbage in the padding changes nothing
    np.testing.assert_allclose(stack(padded, ns, valid), stack(s, ns, valid), atol=1e-6)
    # the last NS-token sees the earlier ones; the first NS-token does not see the later ones
    first = block(s, ns.at[:, 2].add(1.0), valid, 12)[1]
    np.testing.assert_allclose(first[:, 0], a_ns[:, 0], atol=1e-6)


def test_pyramid_schedule():
    assert pyramid_schedule(1190, 12, 6) == (992, 800, 608, 416, 224, 12)  # linear, multiples of 32
    assert pyramid_schedule(1500, 16, 8)[-1] == 16
    assert pyramid_schedule(40, 4, 3, multiple=8) == (32, 16, 4)
    assert pyramid_schedule(10, 16, 3) == (10, 10, 10)       # never below min(N, L), never growing
    assert pyramid_schedule(64, 4, 3, enabled=False) == (64, 64, 64)
    for sched in (pyramid_schedule(300, 7, 5, multiple=16), pyramid_schedule(33, 2, 4, multiple=1)):
        assert all(a >= b for a, b in zip(sched, sched[1:]))


def test_kv_cache_scores_equal_full_recomputation():
    """Stage I once per request, stage II per candidate == the full stack run per candidate."""
    keep = pyramid_schedule(12, 3, 3, multiple=4)
    stack = OneTransStack(3, 8, 2, 16, 3, keep, rngs=nnx.Rngs(1))
    s, ns, valid = _inputs(candidates=5, lengths=(12, 1))
    full = jnp.stack([stack(s, ns[:, c], valid) for c in range(5)], axis=1)
    cached = stack.candidate_forward(stack.sequence_cache(s, valid), ns)
    np.testing.assert_allclose(cached, full, atol=2e-5)


@pytest.mark.parametrize("length, keep", [(24, (24, 24)), (24, (16, 4))])
def test_analytic_flops_match_xla(length, keep):
    dim, heads, ffn, n = 16, 2, 32, 4
    stack = OneTransStack(len(keep), dim, heads, ffn, n, keep, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack)
    batch = 4
    compiled = jax.jit(lambda st, s, ns, v: nnx.merge(graphdef, st)(s, ns, v)).lower(
        state, jnp.zeros((batch, length, dim)), jnp.zeros((batch, n, dim)), jnp.ones((batch, length), bool)).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / batch
    analytic = onetrans_stack_flops(length, n, dim, heads, ffn, keep)
    assert abs(analytic - xla) / xla < 0.05, (analytic, xla)
    if keep[-1] < length:  # the pyramid saves compute
        assert analytic < onetrans_stack_flops(length, n, dim, heads, ffn, (length,) * len(keep))


def test_gradients_reach_every_parameter():
    stack = OneTransStack(2, 8, 2, 16, 3, (8, 3), rngs=nnx.Rngs(0))
    s, ns, valid = _inputs()

    def loss(model):
        return jnp.sum(model(s, ns, valid) ** 2)

    grads = nnx.grad(loss)(stack)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, path


# ------------------------------------------------------------------------------------- tokenizer


def test_timestamp_aware_merge_orders_every_event_by_time_right_aligned():
    from scaling.models.onetrans_tokenizer import merge_by_time

    # two sequences for 1 example: clicks at t = 5, 1, 9 (third padded), purchases at t = 3, 7
    clicks = jnp.arange(1, 4, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 3, 2))   # tokens 1, 2, 3
    buys = jnp.arange(10, 12, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 2, 2))   # tokens 10, 11
    merged, valid = merge_by_time([clicks, buys], [jnp.array([[5, 1, 9]]), jnp.array([[3, 7]])],
                                  [jnp.array([[True, True, False]]), jnp.array([[True, True]])])
    # padding first, then by time: t=1 (2), t=3 (10), t=5 (1), t=7 (11)
    np.testing.assert_array_equal(merged[0, :, 0], [3, 2, 10, 1, 11])
    np.testing.assert_array_equal(valid[0], [False, True, True, True, True])


def test_separator_merge_keeps_sequence_order_with_a_sep_after_each():
    from scaling.models.onetrans_tokenizer import merge_with_separators

    a = jnp.array([[[1.0], [2.0], [0.0]]])                    # two events, one padded slot
    b = jnp.array([[[3.0]]])
    seps = jnp.array([[-1.0], [-2.0]])
    merged, valid = merge_with_separators([a, b], [jnp.array([[True, True, False]]), jnp.array([[True]])], seps)
    np.testing.assert_array_equal(valid[0], [False, True, True, True, True, True])
    np.testing.assert_array_equal(merged[0, 1:, 0], [1.0, 2.0, -1.0, 3.0, -2.0])


def test_tokenizers_shapes_padding_and_flops():
    from scaling.models.onetrans_tokenizer import NSTokenizer, SequenceTokenizer

    seq = SequenceTokenizer((6, 4), 8, (16,), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    events = [jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)]
    valid = [jnp.asarray(rng.random((2, 5)) < 0.6), jnp.ones((2, 3), bool)]
    out = seq(events, valid)
    assert [o.shape for o in out] == [(2, 5, 8), (2, 3, 8)]
    np.testing.assert_array_equal(np.asarray(out[0])[~np.asarray(valid[0])], 0.0)
    ns = NSTokenizer(10, 3, 8, (32,), rngs=nnx.Rngs(0))
    tokens = ns(jnp.ones((2, 10)))
    assert tokens.shape == (2, 3, 8)
    # auto-split: token i is output slice [i d, (i + 1) d) of one MLP
    np.testing.assert_allclose(tokens.reshape(2, 24), ns.mlp(jnp.ones((2, 10))), atol=1e-6)
    cost = jax.jit(lambda x: ns(x)).lower(jnp.ones((4, 10))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / 4
    assert abs(NSTokenizer.flops(10, 3, 8, (32,)) - xla) / xla < 0.10
