"""Sampled softmax against a hand computation: temperature, accidental hits, padded positions."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from scaling.train.sampled_softmax import sampled_softmax_loss


def test_sampled_softmax_by_hand():
    table = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # item 0 is padding
    queries = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # one user, two positions
    targets = jnp.array([[1, 2]])
    negatives = jnp.array([[[2, 3], [2, 1]]])  # position 1's first negative is its own target
    t = 0.5
    # position 0: pos 1/t, negs 0/t, 0.6/t; position 1: pos 1/t, negs masked, 0/t
    p0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.2)))
    p1 = -(2.0 - math.log(math.exp(2.0) + math.exp(-5e4) + math.exp(0.0)))
    loss = sampled_softmax_loss(queries, table, targets, negatives, jnp.array([2]), temperature=t)
    assert float(loss) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    only_first = sampled_softmax_loss(queries, table, targets, negatives, jnp.array([1]), temperature=t)
    assert float(only_first) == pytest.approx(p0, rel=1e-6)  # the padded position does not count


def test_shared_negatives_equal_the_same_negatives_at_every_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 9, size=(2, 4)), jnp.int32)
    shared = jnp.asarray(rng.integers(1, 9, size=(2, 1, 5)), jnp.int32)
    lengths = jnp.array([4, 2])
    a = sampled_softmax_loss(q, table, targets, shared, lengths, 0.1)
    b = sampled_softmax_loss(q, table, targets, jnp.broadcast_to(shared, (2, 4, 5)), lengths, 0.1)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_embedding_bytes_count_shared_negatives_once_per_sequence():
    from scaling.data.spec import SequenceSpec
    from scaling.models.hstu import HSTUConfig

    cfg = HSTUConfig(embed_dim=8, max_len=10)
    per_position = cfg.embedding_bytes_per_example(SequenceSpec(num_items=50, num_negatives=4))
    shared = cfg.embedding_bytes_per_example(SequenceSpec(num_items=50, num_negatives=4, shared_negatives=True))
    assert per_position == (2 * 10 + 10 * 4) * 8 * 4 and shared == (2 * 10 + 4) * 8 * 4
