"""JAX's persistent compilation cache, shared by the trials of a sweep.

Trials that differ only in seed or learning rate lower to the same program (the peak learning rate
is optimizer state, see optimizers.py), so with the cache on, a per-size lr grid compiles each
model once, across worker processes and relaunches.
"""

from __future__ import annotations

import os


def enable_compilation_cache(directory: str) -> None:
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
