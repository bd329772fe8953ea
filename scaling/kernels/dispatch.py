"""Choosing between a Pallas kernel and its jnp reference: the `auto | pallas | xla` knob.

    xla     the pure-jnp reference (any backend)
    pallas  the kernel; compiled through Triton on an NVIDIA GPU, `interpret=True` elsewhere
            (correct but slow: what the CPU tests use)
    auto    the kernel on CUDA, the reference elsewhere. Resolved at lowering time with
            `jax.lax.platform_dependent`, so one traced function serves every backend (jit, grad,
            AOT export): both branches are traced, only the platform's branch is lowered.

Under a multi-device mesh the kernel path runs under shard_map, one kernel per device on its
batch (and head) shard, when the caller names its arguments' dimensions (`names`, `out_names`;
scaling/kernels/sharded.py). The reference is plain jnp and left to GSPMD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax

from scaling.kernels.sharded import Names, shard_kernel

KernelImpl = Literal["auto", "pallas", "xla"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "xla")
IMPL_HELP = ("auto: the Pallas kernel on NVIDIA GPUs, the jnp reference elsewhere; pallas: always the "
             "kernel (interpreted off GPU: slow, for tests); xla: always the jnp reference")


def interpret_default() -> bool:
    """Interpret the kernel unless the default backend is a GPU (where it lowers to Triton)."""
    return jax.default_backend() != "gpu"


def selected_impl(impl: str, platform: str | None = None) -> str:
    """What `dispatch` runs for `impl` on `platform` ('cuda', 'cpu', 'tpu', ...; default: the
    default backend's): 'pallas' or 'xla'."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if platform is None:
        platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
    if impl == "auto":
        return "pallas" if platform == "cuda" else "xla"
    return impl


def dispatch(impl: str, kernel: Callable[..., Any], reference: Callable[..., Any], *args: Any,
             names: Sequence[Names | None] | None = None, out_names: Names = ()) -> Any:
    """Run `kernel(*args, interpret=...)` or `reference(*args)` as `impl` says (module docstring).

    names: per argument, the logical names of its dimensions ("batch", "heads", None; None or ()
    for a replicated argument), out_names the output's: with them the kernel runs per device under
    a multi-device mesh (sharded.shard_kernel). Without them it is called as is."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return reference(*args)

    def run_kernel(*values, interpret: bool):
        call = functools.partial(kernel, interpret=interpret)
        if names is None:
            return call(*values)
        return shard_kernel(call, values, names, out_names, check_vma=not interpret)

    if impl == "pallas":
        return run_kernel(*args, interpret=interpret_default())
    return jax.lax.platform_dependent(*args, cuda=functools.partial(run_kernel, interpret=False), default=reference)
