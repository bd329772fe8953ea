"""The SLURM launcher: the same trials as a job array through submitit.

    scaling sweep sweeps/x.yaml --launcher slurm --slurm.partition=gpu --slurm.gpus_per_node=1 \\
        --slurm.time=240 --slurm.array_parallelism=16

Each array task trains one trial in the same run directory the local launcher would use, so
`scaling status`, `fit` and `plot` work unchanged. When SLURM preempts a task or its time limit
nears, submitit requeues it and the new task resumes from the trial's last periodic orbax checkpoint
(`train.checkpoint_every` bounds the steps lost). `--slurm.cluster=local` runs the array on this machine
through submitit's local executor (what the tests use); `debug` runs it in-process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import submitit

from scaling.config_schema import ConfigError
from scaling.sweep.spec import Sweep, Trial

# `--slurm.KEY` names that submitit takes without the `slurm_` prefix (its cluster-generic ones).
_GENERIC = {"timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node", "name",
            "stderr_to_stdout"}
_ALIASES = {"time": "timeout_min", "gpus": "gpus_per_node", "cpus": "cpus_per_task", "mem": "mem_gb"}
_DEFAULTS = {"timeout_min": 240, "tasks_per_node": 1, "nodes": 1}


def _coerce(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_slurm_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`--slurm.partition=gpu` style arguments -> {'partition': 'gpu'} (values YAML-parsed)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.removeprefix("--slurm.").partition("=")
        if not sep or not key:
            raise ConfigError(pair, "expected --slurm.KEY=VALUE, e.g. --slurm.partition=gpu")
        options[key.replace("-", "_")] = _coerce(value)
    return options


class TrialJob(submitit.helpers.Checkpointable):
    """One array task: train a trial under its lock; on preemption/timeout, requeue and resume."""

    def __call__(self, config, run_dir: str, restart: bool) -> str:
        import contextlib

        from scaling.sharding.distributed import initialize_from_environment, is_primary
        from scaling.sweep.state import trial_lock
        from scaling.train.compile_cache import enable_compilation_cache
        from scaling.train.loop import train

        # A trial given several tasks (--slurm.nodes / --slurm.tasks_per_node > 1) is one
        # multi-process run: its tasks join each other (no-op for a one-task trial).
        initialize_from_environment()
        enable_compilation_cache(os.path.join(os.path.dirname(run_dir), ".jax_cache"))
        with trial_lock(run_dir) if is_primary() else contextlib.nullcontext():
            return train(config, restart=restart).status

    def checkpoint(self, config, run_dir: str, restart: bool):
        # Called by submitit before requeueing: resume (never restart) from the last checkpoint.
        return submitit.helpers.DelayedSubmission(TrialJob(), config, run_dir, False)


def _executor(sweep: Sweep, options: Mapping[str, Any]):
    options = dict(options)
    cluster = options.pop("cluster", None)
    folder = os.path.join(sweep.directory, ".submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"name": sweep.name, **_DEFAULTS}
    for key, value in options.items():
        key = _ALIASES.get(key, key)
        params[key if key in _GENERIC else f"slurm_{key}"] = value
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as err:
        message = str(err).splitlines()[0]
        raise ConfigError("--slurm", f"{message} (generic keys: {', '.join(sorted(_GENERIC | set(_ALIASES)))}; "
                                     "anything else is passed to SLURM as slurm_<key>)") from None
    return executor


def submit_slurm(sweep: Sweep, trials: Sequence[Trial], options: Mapping[str, Any], *, restart: Sequence[int] = ()):
    """Submit `trials` as one job array; returns the submitit jobs (same order as `trials`)."""
    if not trials:
        return []
    executor = _executor(sweep, options)
    return executor.map_array(
        TrialJob(),
        [t.config for t in trials],
        [t.run_dir for t in trials],
        [t.index in restart for t in trials],
    )
