"""The Mosaic GPU HSTU kernels (scaling/kernels/hstu_attention_mgpu.py: forward, dQ, dK/dV)
against the reference, in the Mosaic GPU interpreter on CPU (compiled on a GPU).

bf16 only (the kernel's inputs), judged as tests/test_kernels.py judges the Triton kernels in
bf16: against an fp32 reference on the same bf16-rounded inputs, the kernel's max error must be at
most 2x the bf16 XLA reference's own plus 1e-3 of the scale. Lengths cover 0, 1, exactly one query
block (64), a query-block pair (128) plus a few rows, a non-multiple and the full width; the
interpreter also checks the barrier protocol (a phase a waiting warpgroup never observed is an
error), so the producer/consumer ring is tested, not only the numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.kernels.hstu_attention import reference_mha
from scaling.kernels.hstu_attention_mgpu import MosaicBlocks, mosaic_mha

# A barrier protocol broken by a change deadlocks the interpreter's warpgroup threads: fail, not hang
pytestmark = pytest.mark.timeout(120, method="thread")

N, HEADS = 200, 2
LENGTHS = (0, 1, 64, 131, 77, 200)


def _inputs(dim, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(len(LENGTHS), N, HEADS, dim)), jnp.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("dim, candidates, blocks, n", [
    (128, None, None, N),
    (64, (0, 1, 3, 5, 0, 7), None, N),
    (64, None, MosaicBlocks(block_k=128, num_stages=3), N),
    (64, (0, 2, 0, 1, 3, 0), MosaicBlocks(pingpong=False), N),
    # 150 rows pad to 384, whole query-block pairs (128) and key blocks (192), not to 192
    (64, None, MosaicBlocks(block_k=192), 150),
])
def test_mosaic_forward_within_the_xla_reference_error(dim, candidates, blocks, n):
    q, k, v = (x[:, :n] for x in _inputs(dim))
    lengths = jnp.minimum(jnp.asarray(LENGTHS, jnp.int32), n)
    cands = None if candidates is None else jnp.asarray(candidates, jnp.int32)
    out = mosaic_mha(q, k, v, lengths, cands, norm=float(n), blocks=blocks)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    exact = reference_mha(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, num_candidates=cands, norm=float(n))
    xla = reference_mha(q, k, v, lengths, num_candidates=cands, norm=float(n))
    scale = float(jnp.abs(exact).max())
    err = float(jnp.abs(out.astype(jnp.float32) - exact).max())
    xla_err = float(jnp.abs(xla.astype(jnp.float32) - exact).max())
    assert err <= 2 * xla_err + 1e-3 * scale, (err, xla_err, scale)
    # rows past each length are zero
    for b, length in enumerate(np.asarray(lengths)):
        assert not np.asarray(out[b, length:]).any()


@pytest.mark.parametrize("dim, candidates, blocks", [
    (128, None, None),
    (64, (0, 1, 3, 5, 0, 7), MosaicBlocks(block_k=128, num_stages=3)),
])
def test_mosaic_gradients_within_the_xla_reference_error(dim, candidates, blocks):
    """dQ, dK, dV of <out, cot> (the dQ and dK/dV kernels), as the forward is judged."""
    q, k, v = _inputs(dim, seed=1)
    cot = _inputs(dim, seed=2)[0]
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    cands = None if candidates is None else jnp.asarray(candidates, jnp.int32)

    def grads(fn, dtype, **kw):
        def loss(q, k, v):
            out = fn(q, k, v, lengths, num_candidates=cands, norm=float(N), **kw)
            return (out.astype(jnp.float32) * cot.astype(jnp.float32)).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    kernel = grads(mosaic_mha, jnp.bfloat16, blocks=blocks)
    exact = grads(reference_mha, jnp.float32)
    xla = grads(reference_mha, jnp.bfloat16)
    for name, got, want, base in zip("qkv", kernel, exact, xla):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        err = float(jnp.abs(got.astype(jnp.float32) - want).max())
        xla_err = float(jnp.abs(base.astype(jnp.float32) - want).max())
        assert err <= 2 * xla_err + 1e-3 * scale, (name, err, xla_err, scale)


def test_mosaic_forward_rejects_what_it_cannot_run():
    q = jnp.zeros((1, 64, 1, 64), jnp.float32)
    lengths = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="16-bit dtype"):
        mosaic_mha(q, q, q, lengths, norm=64.0)
    narrow = jnp.zeros((1, 64, 1, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 64"):
        mosaic_mha(narrow, narrow, narrow, lengths, norm=64.0)
    with pytest.raises(ValueError, match="block_k=96"):
        MosaicBlocks(block_k=96)
    with pytest.raises(ValueError, match="at least 2 slots"):
        MosaicBlocks(num_stages=1)


def test_hstu_mha_routes_mosaic_without_bias_only():
    from scaling.kernels.hstu_attention import hstu_mha

    q, k, v = (x[:, :64] for x in _inputs(64))
    lengths = jnp.minimum(jnp.asarray(LENGTHS, jnp.int32), 64)
    off_gpu = hstu_mha(q, k, v, lengths, norm=64.0, impl="mosaic")  # the jnp reference off a GPU
    assert jnp.array_equal(off_gpu, reference_mha(q, k, v, lengths, norm=64.0))
    with pytest.raises(ValueError, match="no relative bias"):
        hstu_mha(q, k, v, lengths, norm=64.0, impl="mosaic", pos_w=jnp.zeros(127), ts_w=jnp.zeros(9),
                 timestamps=jnp.zeros((len(LENGTHS), 64), jnp.int32))


def test_the_model_knob_checks_what_the_kernels_need():
    from scaling.config import ModelConfig
    from scaling.config_schema import ConfigError, build

    hstu = dict(name="hstu", embed_dim=64, num_heads=1, qk_dim=64, v_dim=64, max_len=8, relative_bias=False,
                attention_impl="mosaic")
    assert build(ModelConfig, hstu).attention_impl == "mosaic"
    with pytest.raises(ConfigError, match="relative_bias: false"):
        build(ModelConfig, {**hstu, "relative_bias": True})
    with pytest.raises(ConfigError, match="multiple of 64; got qk_dim 32, v_dim 32"):
        build(ModelConfig, {**hstu, "qk_dim": 32, "v_dim": 32})
    with pytest.raises(ConfigError, match="attention_impl"):  # the ranker's knob has no mosaic
        build(ModelConfig, {"name": "hstu_ranker", "attention_impl": "mosaic"})


def test_an_hstu_encoder_on_the_mosaic_kernels_matches_xla(monkeypatch):
    """A one-layer HSTU without relative bias (the STU form): the encoder's output and the
    projection's gradient with attention_impl mosaic (bf16 inside; the kernels interpreted here,
    where the model would take the reference) against xla (float32)."""
    from flax import nnx

    from scaling.data.spec import SequenceSpec
    from scaling.kernels import hstu_attention
    from scaling.models.hstu import HSTU, HSTUConfig

    calls, original = [], hstu_attention.mosaic_hstu_mha

    def interpreted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs, interpret_off_gpu=True)

    monkeypatch.setattr(hstu_attention, "mosaic_hstu_mha", interpreted)

    rng = np.random.default_rng(3)
    lengths = jnp.asarray([20, 7, 1], jnp.int32)
    items = jnp.asarray(rng.integers(1, 31, size=(3, 20)) * (np.arange(20)[None] < np.asarray(lengths)[:, None]),
                        jnp.int32)
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 100_000, size=(3, 20)), axis=1), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(3, 20, 64)), jnp.float32)

    def run(impl):
        cfg = HSTUConfig(embed_dim=64, num_layers=1, num_heads=1, qk_dim=64, v_dim=64, max_len=20, dropout=0.0,
                         relative_bias=False, attention_impl=impl)
        model = HSTU(cfg, SequenceSpec(num_items=30, num_negatives=0), rngs=nnx.Rngs(0))
        model.blocks[0].w_uvqk[...] = 10.0 * model.blocks[0].w_uvqk[...]  # scores of order 1
        value, grads = nnx.value_and_grad(lambda m: (m.encode(items, ts, lengths) * cot).sum())(model)
        return value, grads.blocks[0].w_uvqk[...]

    (value, grad), (ref_value, ref_grad) = run("mosaic"), run("xla")
    assert calls  # the block took the Mosaic path
    assert abs(float(value) - float(ref_value)) <= 2e-2 * abs(float(ref_value))
    assert float(jnp.abs(grad - ref_grad).max()) <= 3e-2 * float(jnp.abs(ref_grad).max())
