"""HSTU's encoder against a float64 numpy forward written from the brief's formulas (section 1.2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.data.spec import SequenceSpec
from scaling.models.hstu import HSTU, HSTUConfig


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _numpy_forward(model: HSTU, items, ts, lengths, query):
    cfg = model.cfg
    B, N = items.shape
    h, dq, dv, D = cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.embed_dim
    emb = np.asarray(model.item_emb[...], np.float64)
    x = emb[items] * math.sqrt(D) + np.asarray(model.pos_emb[...], np.float64)[:N][None]
    valid = np.arange(N)[None, :] < lengths[:, None]
    x = np.where(valid[..., None], x, 0.0)
    for block in model.blocks:
        w = np.asarray(block.w_uvqk[...], np.float64)
        uvqk = _silu(_ln(x) @ w)
        u, v = uvqk[..., : h * dv], uvqk[..., h * dv : 2 * h * dv]
        q, k = uvqk[..., 2 * h * dv : 2 * h * dv + h * dq], uvqk[..., 2 * h * dv + h * dq :]
        pos_w, ts_w = np.asarray(block.pos_w[...], np.float64), np.asarray(block.ts_w[...], np.float64)
        attn = np.zeros((B, N, h * dv))
        for b in range(B):
            for i in range(lengths[b]):
                for j in range(i + 1):
                    bucket = min(max(int(math.log(max(abs(query[b, i] - ts[b, j]), 1)) / 0.301), 0), cfg.num_buckets)
                    rab = pos_w[cfg.max_len - 1 + j - i] + ts_w[bucket]
                    for hh in range(h):
                        s = q[b, i, hh * dq : (hh + 1) * dq] @ k[b, j, hh * dq : (hh + 1) * dq] + rab
                        attn[b, i, hh * dv : (hh + 1) * dv] += _silu(s) / N * v[b, j, hh * dv : (hh + 1) * dv]
        x = x + (u * _ln(attn)) @ np.asarray(block.w_o[...], np.float64) + np.asarray(block.b_o[...], np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def test_encoder_matches_numpy_reference_and_ignores_padding():
    cfg = HSTUConfig(embed_dim=8, num_layers=2, num_heads=2, qk_dim=3, v_dim=4, max_len=6, num_buckets=16, dropout=0.0)
    model = HSTU(cfg, SequenceSpec(num_items=20, num_negatives=0), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    items = rng.integers(1, 21, size=(3, 6))
    lengths = np.array([6, 4, 1])
    items[np.arange(6)[None, :] >= lengths[:, None]] = 0
    ts = np.sort(rng.integers(0, 100_000, size=(3, 7)), axis=1)
    ts, query = ts[:, :6], ts[:, 1:]  # each position's next-event time
    run = lambda it, t, q: model.encode(jnp.asarray(it), jnp.asarray(t, jnp.int32), jnp.asarray(lengths),  # noqa: E731
                                 jnp.asarray(q, jnp.int32))
    out = run(items, ts, query)
    ref = _numpy_forward(model, items, ts, lengths, query)
    for b, n in enumerate(lengths):  # padded rows are not part of the contract
        np.testing.assert_allclose(np.asarray(out)[b, :n], ref[b, :n], rtol=1e-4, atol=1e-5)
    # padding: changing ids and timestamps past a sequence's length changes nothing before it
    items2, ts2 = items.copy(), ts.copy()
    items2[1, 4:], ts2[1, 4:] = 7, ts[1, 3] + 5
    query2 = query.copy()
    query2[1, 4:] = 3
    out2 = run(items2, ts2, query2)
    np.testing.assert_allclose(np.asarray(out2)[1, :4], np.asarray(out)[1, :4], rtol=1e-6, atol=1e-6)
    # causality: a later item does not change earlier outputs
    items3 = items.copy()
    items3[0, 5] = 1 + items[0, 5] % 20
    out3 = run(items3, ts, query)
    np.testing.assert_allclose(np.asarray(out3)[0, :5], np.asarray(out)[0, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(out3)[0, 5], np.asarray(out)[0, 5])


def test_gradients_reach_every_parameter():
    cfg = HSTUConfig(embed_dim=8, num_layers=2, num_heads=1, qk_dim=4, v_dim=8, max_len=5, num_buckets=8, dropout=0.0)
    model = HSTU(cfg, SequenceSpec(num_items=10, num_negatives=0), rngs=nnx.Rngs(1))
    items = jnp.array([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    ts = jnp.array([[0, 10, 100, 1000, 10_000], [5, 50, 0, 0, 0]], jnp.int32)
    lengths = jnp.array([5, 2])

    def loss(model):
        q = model.encode(items, ts, lengths)
        logits = q @ model.item_table().T / 0.05
        return -jnp.mean(jax.nn.log_softmax(logits, -1)[:, :, 3])

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):  # tables included
        assert np.all(np.isfinite(np.asarray(g))), path
        assert np.abs(np.asarray(g)).sum() > 0, path


def test_analytic_flops_match_xla():
    from scaling.flops import flops_from_cost

    cfg = HSTUConfig(embed_dim=64, num_layers=2, num_heads=2, qk_dim=32, v_dim=32, max_len=96, dropout=0.0)
    model = HSTU(cfg, SequenceSpec(num_items=50, num_negatives=0), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = 4
    items = jnp.ones((batch, cfg.max_len), jnp.int32)
    ts = jnp.zeros((batch, cfg.max_len), jnp.int32)
    lengths = jnp.full((batch,), cfg.max_len)
    forward = jax.jit(lambda state, i, t, n: nnx.merge(graphdef, state).encode(i, t, n))
    xla = flops_from_cost(forward.lower(state, items, ts, lengths).compile().cost_analysis()) / batch
    analytic = cfg.encoder_flops()
    assert abs(analytic - xla) / xla < 0.10, (analytic, xla)
    assert cfg.encoder_flops(causal=True) < analytic


def test_newer_variant_flags_no_rab_and_alpha():
    """relative_bias=false drops the bias (the output no longer depends on timestamps); alpha scales
    the scores, i.e. equals alpha applied to q; FLOPs stay within 10% of XLA for both."""
    from scaling.flops import abstract_model, xla_flops_per_example

    spec = SequenceSpec(num_items=30, num_negatives=8)
    base = dict(embed_dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, max_len=12, num_buckets=64, dropout=0.0)
    items = jnp.asarray(np.random.default_rng(0).integers(1, 31, size=(2, 12)))
    lengths = jnp.array([12, 7])
    ts_a = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 10**6, size=(2, 12))), jnp.int32)
    ts_b = ts_a * 3
    no_rab = HSTU(HSTUConfig(**base, relative_bias=False), spec, rngs=nnx.Rngs(0))
    with_rab = HSTU(HSTUConfig(**base), spec, rngs=nnx.Rngs(0))
    for model in (no_rab, with_rab):  # bias tables far from their ~0 init, so time matters if used
        for i, block in enumerate(model.blocks):
            block.ts_w[...] = jnp.asarray(np.random.default_rng(i).normal(size=block.ts_w.shape), jnp.float32)
            block.w_uvqk[...] = 20.0 * block.w_uvqk[...]  # gates away from ~0, or every block is ~identity
    np.testing.assert_allclose(no_rab.encode(items, ts_a, lengths), no_rab.encode(items, ts_b, lengths), atol=1e-6)
    assert not np.allclose(with_rab.encode(items, ts_a, lengths), with_rab.encode(items, ts_b, lengths), atol=1e-6)
    scaled = HSTU(HSTUConfig(**base, attention_alpha=0.5), spec, rngs=nnx.Rngs(0))
    # SiLU sits between W_uvqk and q, so alpha is checked on the projected q the attention uses
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 16)), jnp.float32)
    q_plain = HSTU(HSTUConfig(**base), spec, rngs=nnx.Rngs(0)).blocks[0].project(x)[2]
    q_scaled = scaled.blocks[0].project(x)[2]
    np.testing.assert_allclose(q_scaled, 0.5 * q_plain, rtol=1e-6)
    for extra in (dict(relative_bias=False), dict(attention_alpha=0.125)):
        cfg = HSTUConfig(**{**base, "max_len": 64, "embed_dim": 32, "qk_dim": 16, "v_dim": 16}, **extra)
        xla = xla_flops_per_example(abstract_model(cfg, spec), spec, 16, cfg.max_len)
        assert abs(cfg.flops_per_example(spec) - xla) / xla < 0.10, (extra, cfg.flops_per_example(spec), xla)
