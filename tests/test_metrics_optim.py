"""Metrics against brute force, and the optimizers against hand-computed updates."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from scaling.config import ScheduleConfig
from scaling.train import metrics as M
from scaling.train.optimizers import learning_rate_schedule, rowwise_adagrad


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert M.auc(y, s) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_logloss_and_ne_by_hand():
    y = np.array([1, 0, 0, 1])
    p = np.array([0.8, 0.1, 0.4, 0.5])
    expected = -(math.log(0.8) + math.log(0.9) + math.log(0.6) + math.log(0.5)) / 4
    assert M.logloss(y, p) == pytest.approx(expected)
    logits = np.log(p / (1 - p))
    assert M.logloss_from_logits(y, logits) == pytest.approx(expected)
    assert M.normalized_entropy(expected, 0.5) == pytest.approx(expected / math.log(2))
    # the constant predictor at the base rate has NE exactly 1
    const = np.full(4, 0.5)
    assert M.normalized_entropy(M.logloss(y, const), 0.5) == pytest.approx(1.0)
    assert M.relative_logloss(0.99, 1.0) == pytest.approx(-1.0)


def test_rowwise_adagrad_by_hand():
    tx = rowwise_adagrad(0.1, eps=0.0)
    params = {"t": jnp.zeros((3, 2))}
    state = tx.init(params)
    grads = {"t": jnp.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])}
    updates, state = tx.update(grads, state, params)
    # row 0: acc = (1 + 9) / 2 = 5; row 2: acc = 4; untouched row 1 stays put
    np.testing.assert_allclose(updates["t"], [[-0.1 / math.sqrt(5), -0.3 / math.sqrt(5)], [0, 0], [-0.1, -0.1]], rtol=1e-6)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(state[0].accumulator["t"][:, 0], [10.0, 0.0, 8.0])


def test_warmup_cosine_schedule():
    sched = learning_rate_schedule(1.0, ScheduleConfig(name="cosine", warmup_fraction=0.1, final_fraction=0.1), 100)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1, abs=1e-6)
    const = learning_rate_schedule(2.0, ScheduleConfig(name="constant", warmup_fraction=0.0), 100)
    assert float(const(50)) == 2.0


def test_peak_lr_is_state_not_program():
    """Two learning rates: updates scale by the peak, and the lowered step programs are identical."""
    import jax

    from scaling.config import DenseOptimizerConfig
    from scaling.train.optimizers import dense_optimizer

    params = {"w": jnp.arange(4.0)}
    grads = {"w": jnp.array([0.5, -1.0, 2.0, 0.0])}
    sched = ScheduleConfig(name="constant", warmup_fraction=0.0)
    outs, texts = [], []
    for lr in (1e-3, 3e-3):
        tx = dense_optimizer(DenseOptimizerConfig(name="sgd", learning_rate=lr, b1=0.0, grad_clip_norm=0.0), sched, 10)
        state = tx.init(params)
        upd, _ = tx.update(grads, state, params)
        outs.append(upd["w"])
        texts.append(jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(grads, state, params).as_text())
    np.testing.assert_allclose(outs[0], -1e-3 * grads["w"], rtol=1e-6)
    np.testing.assert_allclose(outs[1], 3 * outs[0], rtol=1e-6)
    assert texts[0] == texts[1]
