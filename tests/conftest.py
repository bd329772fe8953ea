"""Shared fixtures. Tests run on the CPU; multi-device tests start their own subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

os.environ.setdefault("WANDB_SILENT", "true")
# Most of a tiny run's time is XLA compiling the same small programs (model init ops, the step) in
# every test and every CLI subprocess: a persistent compilation cache, shared by the session and
# the subprocesses it starts (they inherit the environment), compiles each once. Set before JAX
# is imported; keys include the program and the JAX version, so a stale entry is never reused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"scaling-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m scaling.cli ...` in a subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scaling.cli", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd or ROOT, timeout=timeout,
    )


def tiny(directory) -> list[str]:
    """Overrides that make any CTR config train in seconds, writing under `directory`/runs."""
    return [
        f"train.output_dir={os.path.join(str(directory), 'runs')}",
        "train.steps=30", "train.batch_size=64", "train.eval_every=15", "train.checkpoint_every=10",
        "train.log_every=5", "train.eval_batch_size=256", "data.eval_examples=1024",
        "logging.progress=false", "logging.wandb.mode=disabled",
    ]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """`tiny(tmp_path)` as a fixture."""
    return tiny(tmp_path)


def random_ctr_batch(spec, batch_size: int = 4, seed: int = 0) -> dict:
    """A random CTR batch for a feature spec: sparse int32 [B, F], dense float32 [B, D], label [B]."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, c, batch_size) for c in spec.cardinalities], axis=1)
    return {
        "sparse": jnp.asarray(sparse, jnp.int32),
        "dense": jnp.asarray(rng.normal(size=(batch_size, spec.num_dense)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 2, batch_size), jnp.float32),
    }
