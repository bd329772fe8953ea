"""Shared Transformer pieces: attention by hand and against numpy, masks, padding, gradients, FLOPs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling.flops import flops_from_cost
from scaling.models.transformer import (
    FeedForward,
    MultiHeadAttention,
    TransformerBlock,
    attention_flops,
    causal_mask,
    dot_product_attention,
    feed_forward_flops,
    padding_mask,
    transformer_block_flops,
    valid_from_lengths,
)
from scaling.sharding.annotate import LOGICAL_AXES, logical_axes


def _jitted(module: nnx.Module):
    """module(*args), compiled once: op-by-op eager dispatch is slow on a shared 2-core CPU."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args))
    return lambda *args: fn(state, *args)


def _with(x: jax.Array, index, value: float) -> jax.Array:
    """A copy of x with x[index] = value (in numpy: no eager XLA op to compile)."""
    y = np.array(x)
    y[index] = value
    return jnp.asarray(y)


def _set(var: nnx.Variable, value) -> None:
    var.set_value(jnp.asarray(value, jnp.float32))


def test_masks():
    valid = valid_from_lengths(jnp.array([3, 1, 0]), 3)
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    causal = np.asarray(causal_mask(valid))
    assert causal.shape == (3, 1, 3, 3)
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((3, 3))))
    np.testing.assert_array_equal(causal[1, 0], [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert not causal[2].any()
    both = np.asarray(padding_mask(valid))
    np.testing.assert_array_equal(both[0, 0], np.ones((3, 3)))
    np.testing.assert_array_equal(both[1, 0], [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_attention_hand_computed():
    # One head, D = 2, N = 2, causal. W_q = W_k = I, W_v = [[1, 2], [0, 1]], W_o = I, b_v = (0, 1).
    attn = nnx.eval_shape(lambda: MultiHeadAttention(2, 1, rngs=nnx.Rngs(0)))  # every value set below
    for name in ("b_q", "b_k", "b_o"):
        _set(getattr(attn, name), np.zeros(getattr(attn, name).shape))
    _set(attn.w_q, np.eye(2)[:, None, :])
    _set(attn.w_k, np.eye(2)[:, None, :])
    _set(attn.w_v, np.array([[1.0, 2.0], [0.0, 1.0]])[:, None, :])
    _set(attn.w_o, np.eye(2)[None])
    _set(attn.b_v, [[0.0, 1.0]])
    x = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
    call = _jitted(attn)
    out = call(x, causal_mask(jnp.array([[True, True]])))
    # v0 = (1, 2) + (0, 1) = (1, 3); v1 = (0, 2) + (0, 1) = (0, 3).
    # Query 0 sees key 0 only -> (1, 3). Query 1: scores (q1 . k) / sqrt(2) = (0, 4 / sqrt 2) = (0, 2.828427);
    # softmax = (1 / (1 + 16.918828), ...) = (0.0558072, 0.9441928) -> 0.0558072 (1, 3) + 0.9441928 (0, 3).
    np.testing.assert_allclose(out[0], [[1.0, 3.0], [0.0558072, 3.0]], rtol=1e-5, atol=1e-6)
    # The separate query input: queries from y, keys/values from x.
    y = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
    out = nnx.jit(lambda m, x, y: m(x, None, query=y))(attn, x, y)
    for i in range(2):
        s = np.array([y[0, i] @ x[0, 0], y[0, i] @ x[0, 1]]) / math.sqrt(2.0)
        p = np.exp(s) / np.exp(s).sum()
        np.testing.assert_allclose(out[0, i], p[0] * np.array([1.0, 3.0]) + p[1] * np.array([0.0, 3.0]), rtol=1e-5)


def _numpy_attention(attn: MultiHeadAttention, x, mask, query=None):
    p = {k: np.asarray(getattr(attn, k)[...], np.float64) for k in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}
    x = np.asarray(x, np.float64)
    y = x if query is None else np.asarray(query, np.float64)
    q = np.einsum("bnd,dhk->bhnk", y, p["w_q"]) + p["b_q"][None, :, None]
    k = np.einsum("bnd,dhk->bhnk", x, p["w_k"]) + p["b_k"][None, :, None]
    v = np.einsum("bnd,dhk->bhnk", x, p["w_v"]) + p["b_v"][None, :, None]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    out = np.zeros(q.shape)
    for b in range(s.shape[0]):
        for i in range(s.shape[2]):
            allowed = np.asarray(mask)[b, 0, i]
            if allowed.any():
                e = np.where(allowed, np.exp(s[b, :, i] - s[b, :, i].max(-1, keepdims=True)), 0.0)
                out[b, :, i] = np.einsum("hk,hkd->hd", e / e.sum(-1, keepdims=True), v[b])
    return np.einsum("bhnk,hkd->bnd", out, p["w_o"]) + p["b_o"]


def test_multi_head_attention_matches_numpy():
    attn = MultiHeadAttention(8, 2, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for name in ("b_q", "b_k", "b_v", "b_o"):  # nonzero biases, so they are checked too
        var = getattr(attn, name)
        _set(var, 0.1 * rng.normal(size=var[...].shape))
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    y = rng.normal(size=(3, 5, 8)).astype(np.float32)
    valid = valid_from_lengths(jnp.array([5, 3, 1]), 5)
    call = nnx.jit(lambda m, x, mask, query: m(x, mask, query=query))  # query=x: self-attention, same compile
    for mask in (causal_mask(valid), padding_mask(valid)):
        for query in (x, y):
            out = call(attn, jnp.asarray(x), mask, jnp.asarray(query))
            np.testing.assert_allclose(out, _numpy_attention(attn, x, mask, query), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "sasrec", "post"])
def test_block_causal_and_padding_invariance(norm):
    block = _jitted(TransformerBlock(8, 2, 16, norm=norm, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    valid = valid_from_lengths(jnp.array([6, 4]), 6)
    mask = causal_mask(valid)
    out = block(x, mask, valid)
    # a later position's content does not reach earlier outputs
    out_future = block(_with(x, (0, slice(4, None)), 5.0), mask, valid)
    np.testing.assert_allclose(out_future[0, :4], out[0, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out_future[0, 4], out[0, 4])
    # padding content changes nothing, and padded outputs are 0
    out_pad = block(_with(x, (1, slice(4, None)), -7.0), mask, valid)
    np.testing.assert_allclose(out_pad[1, :4], out[1, :4], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out_pad[1, 4:], 0.0)
    # bidirectional: padding content still changes nothing, but later items do reach earlier ones
    both = padding_mask(valid)
    out_b = block(x, both, valid)
    np.testing.assert_allclose(block(_with(x, (1, slice(4, None)), -7.0), both, valid)[1, :4], out_b[1, :4],
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(block(_with(x, (0, 5), 5.0), both, valid)[0, 0], out_b[0, 0])


def test_fully_padded_rows_are_finite_zeros_with_finite_gradients():
    block = TransformerBlock(8, 2, 16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 8)), jnp.float32)
    valid = valid_from_lengths(jnp.array([0, 2]), 4)

    def loss(block, x):
        out = block(x, causal_mask(valid), valid)
        return jnp.sum(out**2), out

    (_, out), (grads_m, grads_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(block, x)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, 2:], 0.0)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads_m)))
    np.testing.assert_array_equal(grads_x[0], 0.0)  # a fully padded sequence gets no gradient
    # the bare attention of a fully masked row is exactly 0 too (no NaN from an empty softmax)
    q = x[:1, :3].reshape(1, 3, 2, 4)
    mask = causal_mask(jnp.zeros((1, 3), jnp.bool_))
    np.testing.assert_array_equal(jax.jit(dot_product_attention)(q, q, q, mask), 0.0)


def _reference_block(p: dict, x: jax.Array, mask: jax.Array, eps: float) -> jax.Array:
    """The "pre" block written out independently: x + attn(LN(x)) with keys from x; + FFN(LN(x))."""

    def ln(z, scale, shift):
        mu = z.mean(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + shift

    h = p["w_q"].shape[1]
    y = ln(x, p["ln1_s"], p["ln1_b"])
    heads = []
    for i in range(h):
        q = y @ p["w_q"][:, i] + p["b_q"][i]
        k = x @ p["w_k"][:, i] + p["b_k"][i]
        v = x @ p["w_v"][:, i] + p["b_v"][i]
        s = jnp.where(mask[:, 0], q @ jnp.swapaxes(k, 1, 2) / math.sqrt(q.shape[-1]), -jnp.inf)
        heads.append(jax.nn.softmax(s, axis=-1) @ v @ p["w_o"][i])
    x = x + sum(heads) + p["b_o"]
    f = jax.nn.relu(ln(x, p["ln2_s"], p["ln2_b"]) @ p["w_1"] + p["b_1"]) @ p["w_2"] + p["b_2"]
    return x + f


def test_block_gradient_matches_independent_implementation_and_finite_differences():
    block = TransformerBlock(8, 2, 16, norm="pre", rngs=nnx.Rngs(2))  # the other tests' shapes: fewer compiles
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    mask = causal_mask(jnp.ones((2, 4), jnp.bool_))  # every row attends something: -inf is safe here

    def params(block):
        a, f = block.attn, block.ffn
        return {"w_q": a.w_q[...], "w_k": a.w_k[...], "w_v": a.w_v[...], "w_o": a.w_o[...], "b_q": a.b_q[...],
                "b_k": a.b_k[...], "b_v": a.b_v[...], "b_o": a.b_o[...], "w_1": f.w_1[...], "b_1": f.b_1[...],
                "w_2": f.w_2[...], "b_2": f.b_2[...], "ln1_s": block.ln_1.scale[...], "ln1_b": block.ln_1.bias[...],
                "ln2_s": block.ln_2.scale[...], "ln2_b": block.ln_2.bias[...]}

    def loss_module(block, x):
        return jnp.sum(jnp.sin(block(x, mask)) * target)

    def loss_ref(p, x):
        return jnp.sum(jnp.sin(_reference_block(p, x, mask, block.ln_1.eps)) * target)

    grad_module = nnx.jit(nnx.value_and_grad(loss_module, argnums=(0, 1)))
    value, (g_mod, gx_mod) = grad_module(block, x)
    value_ref, (g_ref, gx_ref) = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))(params(block), x)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    np.testing.assert_allclose(gx_mod, gx_ref, rtol=1e-4, atol=1e-5)
    for name, got in params(g_mod).items():
        np.testing.assert_allclose(got, g_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # central finite difference along a random direction of the input
    u = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    eps = 1e-2
    fd = (grad_module(block, x + eps * u)[0] - grad_module(block, x - eps * u)[0]) / (2 * eps)
    np.testing.assert_allclose(fd, jnp.sum(gx_mod * u), rtol=2e-2)


def test_params_carry_logical_axes():
    block = TransformerBlock(8, 2, 16, rngs=nnx.Rngs(0))
    found = 0
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path
        assert all(a in LOGICAL_AXES for a in axes if a is not None), (path, axes)
        found += 1
    assert found == 16
    assert logical_axes(block.attn.w_q) == ("embed", "heads", "kv")
    assert logical_axes(block.ffn.w_1) == ("embed", "mlp")


def _xla(module: nnx.Module, fn, *args) -> float:
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    compiled = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a)).lower(state, *args).compile()
    return flops_from_cost(compiled.cost_analysis())


def test_flop_helpers_match_xla():
    b, n, d, h, f = 2, 40, 32, 2, 64
    x = jax.ShapeDtypeStruct((b, n, d), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, 1, n, n), jnp.bool_)  # passed in, so its construction is not counted
    attn = nnx.eval_shape(lambda: MultiHeadAttention(d, h, rngs=nnx.Rngs(0)))  # abstract: nothing allocated
    assert _xla(attn, lambda m, x, k: m(x, k), x, mask) / b == pytest.approx(attention_flops(n, n, d, h), rel=0.01)
    assert _xla(attn, lambda m, x: m(x, None), x) / b == pytest.approx(attention_flops(n, n, d, h, masked=False), rel=0.01)
    for act in ("relu", "gelu"):
        ffn = nnx.eval_shape(lambda act=act: FeedForward(d, f, activation=act, rngs=nnx.Rngs(0)))
        assert _xla(ffn, lambda m, x: m(x), x) / b == pytest.approx(feed_forward_flops(n, d, f, act), rel=0.01)
    valid = jax.ShapeDtypeStruct((b, n), jnp.bool_)
    for norm in ("pre", "sasrec", "post"):
        block = nnx.eval_shape(lambda norm=norm: TransformerBlock(d, h, f, norm=norm, rngs=nnx.Rngs(0)))
        xla = _xla(block, lambda m, x, k, v: m(x, k, v), x, mask, valid) / b
        assert abs(transformer_block_flops(n, d, h, f) - xla) / xla < 0.05, (norm, xla)
    # the full n x n attention: doubling n more than doubles the score/value terms
    assert attention_flops(2 * n, 2 * n, d, h) - 2 * attention_flops(n, n, d, h) == pytest.approx(
        2 * n * n * (4 * d + 6 * h))
