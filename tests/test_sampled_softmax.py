"""Sampled softmax against a hand computation: temperature, accidental hits, padded positions."""

from __future__ import annotations

import math

import jax.numpy as jnp
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
