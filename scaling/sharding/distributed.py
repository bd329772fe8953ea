"""Joining a multi-process (multi-host) JAX run from the environment.

`scaling train` calls `initialize_from_environment()` before JAX starts its backends. Which
cluster, if any, comes from the environment, first match wins:

  1. explicit:  SCALING_COORDINATOR=host:port  SCALING_NUM_PROCESSES=N  SCALING_PROCESS_ID=i
                (all three, or none; process 0 listens on the port, the others connect to it)
  2. SLURM:     inside an `srun` step of more than one task (SLURM_NTASKS > 1, SLURM_PROCID and
                SLURM_STEP_NODELIST set, as JAX's own SLURM detection requires): the coordinator
                is the step's first node, on SCALING_COORDINATOR_PORT or a port derived from the
                job and step ids (61440-65535, above Linux's ephemeral range), the same on every task
  3. otherwise: one process, and `jax.distributed` is never called.

SCALING_DISTRIBUTED=0 forces one process whatever the environment says (e.g. a command run
inside an allocation without srun). Every process sees the devices its launcher gives it (all
local GPUs, or the ones SLURM's --gpus-per-task leaves visible); JAX_LOCAL_DEVICE_IDS restricts
them further (JAX reads it). On CPU, cross-process collectives use gloo, JAX 0.11's default
(`jax_cpu_collectives_implementation`); it is set only where nothing chose one.

An inconsistent environment (a process id out of range, a coordinator without a port, some of
the SCALING_* variables but not all) is a `ConfigError`: one line, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from scaling.config_schema import ConfigError

COORDINATOR = "SCALING_COORDINATOR"
NUM_PROCESSES = "SCALING_NUM_PROCESSES"
PROCESS_ID = "SCALING_PROCESS_ID"
COORDINATOR_PORT = "SCALING_COORDINATOR_PORT"
DISABLE = "SCALING_DISTRIBUTED"
INIT_TIMEOUT = "SCALING_INIT_TIMEOUT"  # seconds to wait for every process to join (default 300)

_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 61440, 4096


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-process run. source: 'SCALING_*' or 'SLURM'."""

    coordinator: str
    num_processes: int
    process_id: int
    source: str


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    return value


def _check_id(env: Mapping[str, str], id_name: str, count_name: str) -> tuple[int, int]:
    count, pid = _int(env, count_name, 1), _int(env, id_name, 0)
    if pid >= count:
        raise ConfigError(id_name, f"process id {pid} is out of range for {count_name}={count} (expected 0..{count - 1})")
    return count, pid


def _port(raw: str, name: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(name, f"expected a port number 1..65535, got {raw!r}")
    return int(raw)


def _digits(raw: str) -> int:
    return int(raw) if raw.isdigit() else 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003', 'a,b' -> 'a'."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if not match:
        raise ConfigError("SLURM_STEP_NODELIST", f"cannot read a host name from {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0].strip()
    if not first:
        raise ConfigError("SLURM_STEP_NODELIST", f"cannot read a host name from {nodelist!r}")
    return prefix + first


def cluster_from_environment(env: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster this process belongs to according to `env` (default os.environ), or None for a
    single-process run. Pure: reads the environment only."""
    env = os.environ if env is None else env
    if env.get(DISABLE, "").strip().lower() in ("0", "false", "off", "no"):
        return None
    explicit = [name for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if env.get(name, "").strip()]
    if explicit:
        missing = [n for n in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if n not in explicit]
        if missing:
            raise ConfigError(missing[0], f"set together with {', '.join(explicit)}: a multi-process run needs "
                                          f"{COORDINATOR}=host:port, {NUM_PROCESSES} and {PROCESS_ID}")
        count, pid = _check_id(env, PROCESS_ID, NUM_PROCESSES)
        address = env[COORDINATOR].strip()
        host, sep, port = address.rpartition(":")
        if not sep or not host:
            raise ConfigError(COORDINATOR, f"expected host:port, got {address!r}")
        _port(port, COORDINATOR)
        return Cluster(address, count, pid, "SCALING_*")
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        count, pid = _check_id(env, "SLURM_PROCID", "SLURM_NTASKS")
        if count == 1:
            return None
        if env.get(COORDINATOR_PORT, "").strip():
            port = _port(env[COORDINATOR_PORT].strip(), COORDINATOR_PORT)
        else:
            job, step = (env.get(name, "0").strip() for name in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
            port = _SLURM_PORT_BASE + (_digits(job) + _digits(step)) % _SLURM_PORT_SPAN
        return Cluster(f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}", count, pid, "SLURM")
    return None


def initialize_from_environment(env: Mapping[str, str] | None = None) -> Cluster | None:
    """Join the run's cluster (`jax.distributed.initialize`) if the environment describes one of
    more than one process; returns it, or None for a single process. Call before any JAX
    computation. Calling it again in a process that already joined returns the cluster."""
    cluster = cluster_from_environment(env)
    if cluster is None or cluster.num_processes == 1:
        return None
    import jax

    if jax.distributed.is_initialized():
        return cluster
    if jax.config.jax_cpu_collectives_implementation is None:  # JAX 0.11 defaults to gloo already
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ if env is None else env
    timeout = _int(env, INIT_TIMEOUT, 1) if env.get(INIT_TIMEOUT, "").strip() else 300
    # One line per process, so that a cluster's logs say who waited for whom if joining fails
    # (JAX aborts the process when the others do not arrive within the timeout).
    print(f"process {cluster.process_id} of {cluster.num_processes}: joining {cluster.coordinator} "
          f"(from {cluster.source}, timeout {timeout} s)", file=sys.stderr, flush=True)
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               cluster_detection_method="deactivate", initialization_timeout=timeout)
    return cluster


def process_index() -> int:
    """This process's index (0 when JAX runs one process)."""
    import jax

    return jax.process_index()


def is_primary() -> bool:
    """True on the process that writes the run's files (process 0)."""
    return process_index() == 0


def process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (each process must call it)."""
    if process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def gather_json(obj: Any) -> list[Any]:
    """`obj` (JSON-able) of every process, in process order, on every process (each must call it)."""
    if process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(raw)))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(raw)] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(rows, lengths)]
