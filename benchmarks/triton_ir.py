"""The Triton IR of this repo's Pallas kernels, as JAX lowers them for an H100, on any machine.

    paths = hstu_ttir(dim=128, length=4096, blocks=Blocks(), bias=True, directory=tmp)
    # {"hstu_attention_fwd": "tmp/hstu_attention_fwd.ttir", "..._dkdv": ..., "..._dq": ..., "..._dbias": ...}

Each function cross-lowers the gradient of the kernel's `auto` entry point for an abstract H100
(bf16 inputs unless told; the Pallas -> Triton-IR step needs no GPU) and writes every Triton
module the lowering makes to DIRECTORY as text. benchmarks/kernel_ir.py counts their per-element operations,
benchmarks/kernel_compile.py compiles them to sm_90a.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def abstract_h100():
    """A jax.sharding.AbstractDevice standing for one H100 (cross-lowering needs no GPU)."""
    import jax

    return jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def captured(lower: Callable[[], Any], directory: str, abstract_mesh: bool = True,
             required: bool = True) -> dict[str, str]:
    """Run `lower()` and keep every distinct Triton module it makes: {name: path}, a second module
    of the same name (other shapes) as 'name#2', and so on. With `abstract_mesh` the lowering runs
    for an abstract H100 (a cross-lowering); without, under whatever devices the caller set up.
    `required`: a lowering that makes no Triton module is an error (else {})."""
    import contextlib

    import jax
    from jax._src.pallas.triton import lowering

    paths: dict[str, str] = {}
    texts: set[str] = set()
    real = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = real(*args, **kwargs)
        name = result.module.operation.attributes["sym_name"].value
        text = result.module.operation.get_asm(enable_debug_info=False)
        if text not in texts:
            texts.add(text)
            key = name if name not in paths else f"{name}#{sum(k.split('#')[0] == name for k in paths) + 1}"
            paths[key] = os.path.join(directory, f"{key.replace('#', '_')}.ttir")
            with open(paths[key], "w") as f:
                f.write(text)
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    mesh = (jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=abstract_h100()))
            if abstract_mesh else contextlib.nullcontext())
    try:
        with mesh:
            lower()
    finally:
        lowering.lower_jaxpr_to_triton_module = real
    if not paths and required:
        raise RuntimeError("the lowering made no Triton module (is the kernel dispatched on CUDA?)")
    return paths


def hstu_ttir(dim: int, length: int, blocks, bias: bool, directory: str, heads: int = 2,
              dtype: str = "bfloat16", projected: bool = False) -> dict[str, str]:
    """{kernel name: path of its Triton IR} for value_and_grad of the `auto` HSTU attention
    (one sequence of `length` tokens, `heads` heads of width `dim`, q/k/v in `dtype`); projected:
    through `projected_mha` (the model's training path: the backward writes the packed projection's
    gradient) from a pre-activation [1, length, 4 heads dim]."""
    import jax
    import jax.numpy as jnp

    from scaling.kernels.hstu_attention import hstu_mha, projected_mha

    s = jax.ShapeDtypeStruct
    tensors = [s((1, length, 4 * heads * dim), dtype)] if projected else [s((1, length, heads, dim), dtype)] * 3
    args = tensors + [s((2 * length - 1,), jnp.float32), s((129,), jnp.float32), s((1,), jnp.int32),
                      s((1, length), jnp.int32)]

    def loss(*args):
        *tensors, pos_w, ts_w, lengths, ts = args
        extra = dict(pos_w=pos_w, ts_w=ts_w, timestamps=ts) if bias else {}
        if projected:
            outs = projected_mha(*tensors, lengths, heads=heads, norm=float(length), impl="auto", blocks=blocks,
                                 **extra)
        else:
            outs = hstu_mha(*tensors, lengths, norm=float(length), impl="auto", blocks=blocks, **extra)
        return sum(jnp.sum(out.astype(jnp.float32) ** 2) for out in jax.tree.leaves(outs))

    grads = jax.value_and_grad(loss, argnums=tuple(range(len(tensors) + (2 if bias else 0))))
    return captured(lambda: jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)), directory)


def fm_ttir(n: int, d: int, k: int, directory: str, dtype: str = "bfloat16") -> dict[str, str]:
    """{kernel name: path of its Triton IR} for the gradient of the `auto` Wukong FM block (x in
    `dtype`)."""
    import jax
    import jax.numpy as jnp

    from scaling.kernels.fm_block import fm_block

    s = jax.ShapeDtypeStruct
    args = (s((4096, n, d), dtype), s((n, k), jnp.float32), s((n * k,), jnp.float32), s((n * k,), jnp.float32))

    def loss(x, y, scale, bias):
        return jnp.sum(fm_block(x, y, scale, bias, impl="auto").astype(jnp.float32) ** 2)

    return captured(lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
        lowering_platforms=("cuda",)), directory)


def flash_ttir(nq: int, nk: int, dim: int, directory: str, heads: int = 8, blocks=None,
               dtype: str = "bfloat16") -> dict[str, str]:
    """{kernel name: path of its Triton IR} for value_and_grad of the `auto` softmax attention
    (OneTrans's shape: Nq queries ending at the last of Nk keys, causal, one sequence; `dtype`)."""
    import jax
    import jax.numpy as jnp

    from scaling.kernels.flash_attention import flash_mha

    s = jax.ShapeDtypeStruct
    args = [s((1, nq, heads, dim), dtype)] + [s((1, nk, heads, dim), dtype)] * 2

    def loss(q, k, v):
        out = flash_mha(q, k, v, q_offset=nk - nq, impl="auto", blocks=blocks)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
    return captured(lambda: jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)), directory)


def norm_ttir(d: int, gated: bool, directory: str, dtype: str = "bfloat16", rows: int = 32768) -> dict[str, str]:
    """{kernel name: path of its Triton IR} for the gradient of HSTU's `auto` gated_layer_norm over
    `rows` rows of d (`gated`: times a gate) in `dtype`."""
    import jax
    import jax.numpy as jnp

    from scaling.kernels.row_norm import gated_layer_norm

    x = jax.ShapeDtypeStruct((rows, d), dtype)

    def loss(x, gate):
        return jnp.sum(gated_layer_norm(x, gate if gated else None, impl="auto").astype(jnp.float32) ** 2)

    return captured(lambda: jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, x).lower(
        lowering_platforms=("cuda",)), directory)
