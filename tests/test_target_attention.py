"""DIN's target attention against its formula, token by token, and XLA's FLOP count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.models.target_attention import TargetAttention


def test_target_attention_matches_the_din_formula_and_xla_flops():
    att = TargetAttention(4, (8,), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 4)).astype(np.float32)
    t = rng.normal(size=(2, 4)).astype(np.float32)
    valid = np.array([[True] * 5, [True, True, False, False, False]])
    w1, b1 = np.asarray(att.unit.layers[0].kernel[...]), np.asarray(att.unit.layers[0].bias[...])
    w2, b2 = np.asarray(att.unit.out.kernel[...]), np.asarray(att.unit.out.bias[...])
    expected = np.zeros((2, 4), np.float32)
    for b in range(2):
        for j in range(5):
            if valid[b, j]:
                x = np.concatenate([h[b, j], t[b], h[b, j] - t[b], h[b, j] * t[b]])
                a = (np.maximum(x @ w1 + b1, 0.0) @ w2 + b2)[0]
                expected[b] += a * h[b, j]
    np.testing.assert_allclose(att(jnp.asarray(h), jnp.asarray(valid), jnp.asarray(t)), expected, atol=1e-5)
    soft = TargetAttention(4, (8,), normalize=True, rngs=nnx.Rngs(0))
    w = soft.weights(jnp.asarray(h), jnp.asarray(valid), jnp.asarray(t))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert float(w[1, 2:].max()) == 0.0
    cost = jax.jit(lambda a, b, c: att(a, b, c)).lower(
        jnp.zeros((4, 20, 4)), jnp.ones((4, 20), bool), jnp.zeros((4, 4))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / 4
    assert abs(TargetAttention.flops(20, 4, (8,)) - xla) / xla < 0.10, (TargetAttention.flops(20, 4, (8,)), xla)
