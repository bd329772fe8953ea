"""M-FALCON candidate scoring against its definition: m separate full encoder passes of [history, c]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.data.spec import SequenceSpec
from scaling.flops import flops_from_cost
from scaling.models.hstu import HSTU, HSTUConfig
from scaling.models.hstu_mfalcon import history_cache, mfalcon_scores, score_candidates

# float32: the two paths sum the same terms in a different order (M-FALCON skips the padded keys)
RTOL, ATOL = 1e-5, 1e-6
NUM_ITEMS = 40


def _model(cfg: HSTUConfig, seed: int = 0) -> HSTU:
    """Eval-mode model with weights far from init's near-zero biases, so every term matters."""
    model = HSTU(cfg, SequenceSpec(num_items=NUM_ITEMS, num_negatives=0), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)  # numpy draws: no per-op XLA compiles
    for block in model.blocks:
        block.w_uvqk[...] = jnp.asarray(10.0 * np.asarray(block.w_uvqk[...]))  # q·k of order 1, not 1e-3
        block.b_o[...] = jnp.asarray(0.1 * rng.standard_normal(block.b_o.shape), jnp.float32)
        block.pos_w[...] = jnp.asarray(rng.standard_normal(block.pos_w.shape), jnp.float32)
        block.ts_w[...] = jnp.asarray(rng.standard_normal(block.ts_w.shape), jnp.float32)
    model.eval()
    return model


def _users(cfg: HSTUConfig, lengths: list[int], seed: int = 0):
    """Left-aligned histories [U, max_len - 1] with gaps from seconds to months, and request times."""
    rng = np.random.default_rng(seed)
    width = cfg.max_len - 1
    items = rng.integers(1, NUM_ITEMS + 1, size=(len(lengths), width))
    gaps = np.exp(rng.uniform(0, np.log(1e7), size=(len(lengths), width + 1))).astype(np.int64)
    ts = 1_600_000_000 + np.cumsum(gaps, axis=1)
    request = ts[:, -1].copy()
    ts = ts[:, :width]
    for u, n in enumerate(lengths):
        items[u, n:], ts[u, n:] = 0, 0
        request[u] = ts[u, n - 1] + gaps[u, -1]
    return (jnp.asarray(items, jnp.int32), jnp.asarray(ts, jnp.int32), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(request, jnp.int32))


_encode = nnx.jit(lambda model, *args: model.encode(*args))
_mfalcon = nnx.jit(mfalcon_scores, static_argnames="micro_batch")
_cache = nnx.jit(history_cache)
_score = nnx.jit(score_candidates)


def _full_pass_scores(model: HSTU, items, ts, lengths, request, candidates) -> np.ndarray:
    """The definition: for each candidate, encode [history, c] padded to max_len, read position n."""
    cfg = model.cfg
    items, ts, lengths, request, candidates = map(np.asarray, (items, ts, lengths, request, candidates))
    rows_i, rows_t, rows_q, rows_n = [], [], [], []
    for u in range(candidates.shape[0]):
        n = int(lengths[u])
        for c in candidates[u]:
            seq_i, seq_t, seq_q = (np.zeros(cfg.max_len, np.int64) for _ in range(3))
            seq_i[:n], seq_i[n] = items[u, :n], c
            seq_t[:n], seq_t[n] = ts[u, :n], request[u]
            # each position's query time is the next event's: t for the last history event and c
            seq_q[: n - 1], seq_q[n - 1], seq_q[n] = ts[u, 1:n], request[u], request[u]
            rows_i.append(seq_i), rows_t.append(seq_t), rows_q.append(seq_q), rows_n.append(n + 1)
    out = _encode(model, jnp.asarray(np.stack(rows_i), jnp.int32), jnp.asarray(np.stack(rows_t), jnp.int32),
                  jnp.asarray(rows_n, jnp.int32), jnp.asarray(np.stack(rows_q), jnp.int32))
    idx = np.asarray(rows_n) - 1
    final = np.asarray(out)[np.arange(len(idx)), idx]
    table = np.asarray(model.item_table())
    return np.sum(final * table[candidates.reshape(-1)], axis=-1).reshape(candidates.shape)


CFG = HSTUConfig(embed_dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, max_len=12, num_buckets=64,
                 dropout=0.2)


@pytest.fixture(scope="module")
def case():
    """Three users with histories of length 1, max_len - 1 and 5; 8 candidates each; ground truth."""
    model = _model(CFG)
    users = _users(CFG, [1, CFG.max_len - 1, 5])
    candidates = jnp.asarray(np.random.default_rng(7).integers(1, NUM_ITEMS + 1, (3, 8)), jnp.int32)
    return model, users, candidates, _full_pass_scores(model, *users, candidates)


# m = 1 with b_m > m; m not a multiple of b_m; b_m = 1
@pytest.mark.parametrize("m,micro_batch", [(1, 4), (7, 3), (5, 1)])
def test_equals_separate_full_passes(case, m, micro_batch):
    model, users, candidates, ref = case
    scores = _mfalcon(model, *users, candidates[:, :m], micro_batch=micro_batch)
    assert scores.shape == (3, m)
    np.testing.assert_allclose(np.asarray(scores), ref[:, :m], rtol=RTOL, atol=ATOL)


def test_single_user_custom_divisor_and_time_sensitivity():
    cfg = dataclasses.replace(CFG, attn_norm=7.0)  # a custom divisor is honoured too
    model = _model(cfg, seed=3)
    items, ts, lengths, request = _users(cfg, [6], seed=3)
    candidates = jnp.arange(1, 10, dtype=jnp.int32)
    items, ts = items[:, :8], ts[:, :8]  # a history narrower than max_len - 1 is fine too
    one = _mfalcon(model, items[0], ts[0], lengths[0], request[0], candidates, micro_batch=4)
    ref = _full_pass_scores(model, items, ts, lengths, request, candidates[None])[0]
    assert one.shape == (9,)
    np.testing.assert_allclose(np.asarray(one), ref, rtol=RTOL, atol=ATOL)
    # the comparison can see the time bias: a later request time changes the scores
    later = _mfalcon(model, items[0], ts[0], lengths[0], request[0] + 10_000_000, candidates, micro_batch=4)
    assert np.abs(np.asarray(later) - np.asarray(one)).max() > 1e-3


def test_candidates_are_independent_within_a_micro_batch(case):
    model, users, _, _ = case
    cache = _cache(model, *users)
    a = jnp.array([[3, 5, 7, 9], [2, 4, 6, 8], [1, 1, 1, 1]], jnp.int32)
    b = jnp.array([[3, 11, 12, 13], [14, 4, 15, 16], [1, 2, 3, 4]], jnp.int32)  # a[0, 0], a[1, 1], a[2, 0] kept
    sa, sb = np.asarray(_score(model, cache, a)), np.asarray(_score(model, cache, b))
    for u, j in [(0, 0), (1, 1), (2, 0)]:
        np.testing.assert_allclose(sb[u, j], sa[u, j], rtol=0, atol=1e-7)
    assert not np.allclose(sb[0, 1:], sa[0, 1:])  # the other candidates did change


def test_dropout_must_be_off():
    model = HSTU(CFG, SequenceSpec(num_items=NUM_ITEMS, num_negatives=0), rngs=nnx.Rngs(0))  # train mode
    items, ts, lengths, request = _users(CFG, [3])
    with pytest.raises(ValueError, match="eval"):
        history_cache(model, items, ts, lengths, request)


def _xla_flops(fn, *args) -> float:
    return flops_from_cost(jax.jit(fn).lower(*args).compile().cost_analysis())


def test_cache_is_real_candidate_step_costs_a_fraction_of_full_passes():
    """The micro-batch step takes only the cache (never the history ids), and XLA counts far fewer
    FLOPs for b_m candidates than for b_m full passes; the history pass costs about one full pass."""
    cfg = HSTUConfig(embed_dim=32, num_layers=2, num_heads=2, qk_dim=16, v_dim=16, max_len=64, dropout=0.0)
    # Shapes are all XLA's count needs: an abstract model and cache, nothing initialised or run.
    model = nnx.eval_shape(lambda: HSTU(cfg, SequenceSpec(num_items=NUM_ITEMS, num_negatives=0), rngs=nnx.Rngs(0)))
    model.eval()
    graphdef, state = nnx.split(model)
    b_m, n = 16, cfg.max_len - 1
    hist_i = jax.ShapeDtypeStruct((1, n), jnp.int32)
    user = jax.ShapeDtypeStruct((1,), jnp.int32)
    history_fn = lambda s, i, t, n, r: history_cache(nnx.merge(graphdef, s), i, t, n, r)  # noqa: E731
    cache = jax.eval_shape(history_fn, state, hist_i, hist_i, user, user)
    step = _xla_flops(lambda s, c, x: score_candidates(nnx.merge(graphdef, s), c, x), state, cache,
                      jax.ShapeDtypeStruct((1, b_m), jnp.int32))
    history = _xla_flops(history_fn, state, hist_i, hist_i, user, user)
    full_i = jax.ShapeDtypeStruct((b_m, cfg.max_len), jnp.int32)
    full = _xla_flops(lambda s, i, t, n: nnx.merge(graphdef, s).encode(i, t, n), state, full_i, full_i,
                      jax.ShapeDtypeStruct((b_m,), jnp.int32))
    # each full pass encodes N tokens, each candidate is one token reading N cached keys
    assert step < full / 20, (step, full)
    assert history < 1.5 * full / b_m, (history, full / b_m)
