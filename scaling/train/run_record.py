"""The run record (`result.json`): one per run, the unit that analysis and sweeps read.

Fields follow DESIGN.md: family, size, every hyperparameter, seed, dense/embedding parameter
counts, forward FLOPs/example (analytic and XLA), embedding bytes/example, examples seen, train
FLOPs (3 x forward x examples), final and best eval metrics (float64), wall time, examples/s,
peak memory, device kind/count, status and reason, versions, the sharding layout and the embedding
lookups dropped for capacity. One process writes it (process 0 of a multi-process run).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import sys
from typing import Any, Literal

import jax

from scaling.atomic_json import write_json

Status = Literal["ok", "diverged", "failed", "oom", "running"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "wandb", "recsys-scaling")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }


def peak_memory_bytes() -> dict[str, int | None]:
    """Peak device memory (where the backend reports it) and the host process's peak RSS."""
    device_peak = None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        device_peak = stats.get("peak_bytes_in_use")
    except Exception:  # backends without memory stats
        device_peak = None
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host_peak = rss_kb * 1024 if sys.platform != "darwin" else rss_kb
    return {"device_peak_bytes": device_peak, "host_peak_rss_bytes": int(host_peak)}


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled step from XLA's `memory_analysis()` (empty where unsupported)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if stats is None:
        return {}
    return {
        "step_argument_bytes": int(stats.argument_size_in_bytes),
        "step_output_bytes": int(stats.output_size_in_bytes),
        "step_temp_bytes": int(stats.temp_size_in_bytes),
        "step_alias_bytes": int(stats.alias_size_in_bytes),  # donated inputs reused as outputs
    }


def classify_failure(exc: BaseException) -> Status:
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or isinstance(exc, MemoryError):
        return "oom"
    return "failed"


@dataclasses.dataclass
class RunRecord:
    run_id: str
    name: str
    family: str
    size: str
    seed: int
    status: Status
    reason: str
    config: dict[str, Any]
    params_dense: int
    params_embedding: int
    flops_per_example_analytic: float
    flops_per_example_xla: float | None
    embedding_bytes_per_example: float
    examples_seen: int
    steps: int
    train_flops: float
    final_eval: dict[str, float]
    best_eval: dict[str, float]
    best_eval_step: int
    data_reference: dict[str, float]
    wall_time_s: float
    examples_per_s: float
    memory: dict[str, int | None]
    device: dict[str, Any]
    versions: dict[str, str]
    resumed_from: list[int] = dataclasses.field(default_factory=list)  # steps at which the run was resumed
    # Where the state lived (scaling.sharding.partitioner.Partitioner.summary): layout, mesh, embedding
    # placement, parameter bytes in all and per device, the replicated share, fallbacks.
    sharding: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Fitted baselines only (scaling/train/fit_run.py): fit_time_s, eval_time_s, fit_peak_host_bytes,
    # scoring_flops (one user against the catalogue), parameters, and the solver's own details.
    fit: dict[str, float] = dataclasses.field(default_factory=dict)
    # Train-step embedding lookups that got a zero vector because a row_wise lookup dropped their id
    # past its per-peer capacity (sharding.embedding_capacity), summed over the run's steps (0 for
    # placements that never drop).
    embedding_overflow: int = 0
    # The same for the lookups of every evaluation, summed (their scores read zero vectors).
    eval_embedding_overflow: int = 0

    @property
    def gflops_per_example(self) -> float:
        return self.flops_per_example_analytic / 1e9

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gflops_per_example"] = self.gflops_per_example
        return out

    def write(self, run_dir: str) -> str:
        return write_json(os.path.join(run_dir, "result.json"), self.to_json(), indent=2, default=float)


def read_record(path: str) -> dict[str, Any]:
    """Read a result.json (or the one inside a run directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "result.json")
    with open(path) as f:
        return json.load(f)


def failure_record(config, status: Status, reason: str) -> RunRecord:
    """A record for a run that died before the loop could write its own (e.g. a killed worker)."""
    from scaling.config import run_id
    from scaling.config_schema import to_dict

    return RunRecord(
        run_id=run_id(config), name=config.name, family=config.model.name,
        size=getattr(config.model, "size", "custom"), seed=config.seed, status=status, reason=reason,
        config=to_dict(config), params_dense=0, params_embedding=0, flops_per_example_analytic=0.0,
        flops_per_example_xla=None, embedding_bytes_per_example=0.0, examples_seen=0, steps=0, train_flops=0.0,
        final_eval={}, best_eval={}, best_eval_step=-1, data_reference={}, wall_time_s=0.0, examples_per_s=0.0,
        memory={}, device={}, versions=library_versions(),
    )
