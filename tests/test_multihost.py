"""Multi-process training: the cluster read from the environment, per-process data shards, and a
real two-process run on localhost (gloo CPU collectives) that must match one process holding the
same two devices: the same global batches, so the same losses and eval metrics (rtol 1e-5; they
come out bit-identical), one run record, disjoint rows per process."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from scaling.config_schema import ConfigError
from scaling.sharding.distributed import Cluster, cluster_from_environment, first_host
from tests.conftest import ROOT

QUICK = os.path.join(ROOT, "sweeps", "quickstart.yaml")
RTOL = 1e-5
TIMEOUT_S = 150  # the whole two-process run; on failure every child is killed


# -- the cluster from the environment (pure; nothing joins anything) -----------------------------
def test_explicit_variables_win_over_slurm():
    env = {"SCALING_COORDINATOR": "10.0.0.1:1234", "SCALING_NUM_PROCESSES": "4", "SCALING_PROCESS_ID": "3",
           "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n1,n2"}
    assert cluster_from_environment(env) == Cluster("10.0.0.1:1234", 4, 3, "SCALING_*")
    assert cluster_from_environment({}) is None
    assert cluster_from_environment({**env, "SCALING_DISTRIBUTED": "0"}) is None


def test_slurm_step_gives_the_first_node_and_a_shared_port():
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[003-006,9],cpu1",
           "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1"}
    cluster = cluster_from_environment(env)
    host, port = cluster.coordinator.rsplit(":", 1)
    assert (host, cluster.num_processes, cluster.process_id, cluster.source) == ("gpu003", 8, 5, "SLURM")
    assert 61440 <= int(port) <= 65535
    assert cluster_from_environment({**env, "SLURM_PROCID": "0"}).coordinator == cluster.coordinator  # all agree
    assert cluster_from_environment({**env, "SCALING_COORDINATOR_PORT": "5000"}).coordinator == "gpu003:5000"
    assert cluster_from_environment({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    # a batch script of a multi-task job, outside any srun step: one process, no waiting for others
    assert cluster_from_environment({k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert [first_host(s) for s in ("node7", "a,b", "n[12]", "x-1[01-04]")] == ["node7", "a", "n12", "x-101"]


@pytest.mark.parametrize("env, match", [
    ({"SCALING_COORDINATOR": "h:1", "SCALING_NUM_PROCESSES": "2", "SCALING_PROCESS_ID": "2"},
     r"SCALING_PROCESS_ID: process id 2 is out of range for SCALING_NUM_PROCESSES=2"),
    ({"SCALING_COORDINATOR": "h:1", "SCALING_NUM_PROCESSES": "2"}, r"SCALING_PROCESS_ID: set together with"),
    ({"SCALING_COORDINATOR": "h", "SCALING_NUM_PROCESSES": "2", "SCALING_PROCESS_ID": "0"}, r"expected host:port"),
    ({"SCALING_COORDINATOR": "h:1", "SCALING_NUM_PROCESSES": "two", "SCALING_PROCESS_ID": "0"}, r"expected an integer"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "7", "SLURM_STEP_NODELIST": "n1"}, r"SLURM_PROCID: process id 7"),
])
def test_inconsistent_environment_is_one_line(env, match):
    with pytest.raises(ConfigError, match=match):
        cluster_from_environment(env)


def test_cli_stops_on_a_bad_environment_with_exit_2(monkeypatch, capsys):
    from scaling.cli import main

    monkeypatch.setenv("SCALING_COORDINATOR", "localhost:1")
    monkeypatch.setenv("SCALING_NUM_PROCESSES", "2")
    monkeypatch.setenv("SCALING_PROCESS_ID", "5")
    assert main(["train", QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SCALING_PROCESS_ID: process id 5 is out of range" in err


# -- per-process shards of the data --------------------------------------------------------------
HALVES = (np.arange(0, 4), np.arange(4, 8))


def _joined(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_synthetic_shards_are_disjoint_slices_of_the_global_batch():
    from scaling.config import load_run_config

    data = load_run_config(QUICK, ["data.eval_examples=16"]).data.build()
    for j in (0, 3):
        _same(_joined([data.batch(j, 8, rows=r) for r in HALVES]), data.batch(j, 8))
    iterators = [data.train_iterator(8, rows=r, prefetch=0) for r in HALVES]
    whole = data.train_iterator(8, prefetch=0)
    for _ in range(2):
        _same(_joined([next(it) for it in iterators]), next(whole))
    with pytest.raises(ValueError, match="positions in a batch of 8"):
        data.batch(0, 8, rows=np.arange(6, 10))


def test_file_backed_shards_read_disjoint_rows():
    from scaling.data.ctr_arrays import EncodedCTR
    from scaling.data.spec import CTRFeatureSpec

    rng = np.random.default_rng(0)
    n = 50
    split = lambda m: {"sparse": rng.integers(0, 5, (m, 2)).astype(np.int32),  # noqa: E731
                       "dense": rng.normal(size=(m, 1)).astype(np.float32), "label": rng.integers(0, 2, m).astype(np.float32)}
    train = split(n)
    train["sparse"][:, 0] = np.arange(n)  # the row's own index, to see which rows a shard read
    data = EncodedCTR(CTRFeatureSpec(cardinalities=(n, 5), num_dense=1), {"train": train, "valid": split(4), "test": split(4)})
    for j in (0, 6):  # batch 6 straddles two epochs of the shuffled stream
        parts = [data.batch(j, 8, seed=3, rows=r) for r in HALVES]
        _same(_joined(parts), data.batch(j, 8, seed=3))
        assert not set(parts[0]["sparse"][:, 0]) & set(parts[1]["sparse"][:, 0])


@pytest.mark.parametrize("negatives", ["uniform", "in_batch"])
def test_sequence_shards_add_up_to_the_batch(tmp_path, negatives):
    from scaling.data.interactions import load_interactions
    from scaling.data.leave_one_out import leave_one_out
    from scaling.data.sequence_batches import SequenceBatches

    path = tmp_path / "log.dat"  # user::item::rating::timestamp
    path.write_text("".join(f"{u}::{100 * u + i}::5::{10 * i}\n" for u in range(1, 7) for i in range(6 + u)))
    batches = SequenceBatches(leave_one_out(load_interactions(str(path))), max_len=4, num_negatives=3, seed=5,
                              negatives=negatives)
    for j in (0, 1):
        _same(_joined([batches.train_batch(j, 8, rows=r) for r in HALVES]), batches.train_batch(j, 8))


def test_checkpointed_iterator_state_per_process():
    from scaling.train.checkpoint import own_data_state

    assert own_data_state({"next_index": 4}) == {"next_index": 4}  # a one-process checkpoint
    same = {"process_count": 2, "processes": [{"next_index": 4}, {"next_index": 4}]}
    assert own_data_state(same) == {"next_index": 4}  # resumable by another number of processes
    with pytest.raises(ValueError, match="resume it with 2 processes"):
        own_data_state({"process_count": 2, "processes": [{"next_index": 4}, {"next_index": 5}]})


# -- two processes on localhost ------------------------------------------------------------------
def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


_TINY = ["model.name=dlrm", "model.size=xxs", "train.steps=10", "train.batch_size=16", "train.eval_batch_size=64",
         "data.eval_examples=256", "train.log_every=5", "train.eval_every=5", "train.checkpoint_every=5",
         "logging.progress=false", "logging.wandb.mode=disabled"]


def _start(out: str, devices: int, log: str, **env) -> subprocess.Popen:
    args = [sys.executable, "-m", "scaling.cli", "train", QUICK, *sum((["--set", o] for o in _TINY), []),
            "--set", f"train.output_dir={out}"]
    full = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "SCALING_INIT_TIMEOUT": "60", **env}
    for key in ("SCALING_COORDINATOR", "SCALING_NUM_PROCESSES", "SCALING_PROCESS_ID", "SLURM_NTASKS"):
        if key not in env:
            full.pop(key, None)
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=full, cwd=ROOT)


def _finish(procs: dict[str, subprocess.Popen], logs: dict[str, str], deadline: float) -> None:
    """Wait for every child; on a timeout or any failure kill them all (these children only)."""
    try:
        for name, proc in procs.items():
            proc.wait(timeout=max(1.0, deadline - time.time()))
            if proc.returncode != 0:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{open(logs[name]).read()[-3000:]}")
    except subprocess.TimeoutExpired:
        raise AssertionError("timed out:\n" + "\n".join(f"{n}: {open(p).read()[-1500:]}" for n, p in logs.items())) from None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _pair(out: str, logs_dir: str, tag: str, deadline: float) -> dict[str, str]:
    port = _free_port()
    logs = {f"process {i}": os.path.join(logs_dir, f"{tag}.p{i}.log") for i in (0, 1)}
    procs = {name: _start(out, 1, log, SCALING_COORDINATOR=f"localhost:{port}", SCALING_NUM_PROCESSES="2",
                          SCALING_PROCESS_ID=str(i))
             for i, (name, log) in enumerate(logs.items())}
    _finish(procs, logs, deadline)
    return {name: open(log).read() for name, log in logs.items()}


def _run_dir(out: str) -> str:
    (path,) = glob.glob(os.path.join(out, "*", "*", "config.yaml"))
    return os.path.dirname(path)


def _train_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row["train/loss"] for row in map(json.loads, f) if row["split"] == "train"]


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives (multi-process CPU runs)")
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    deadline = time.time() + TIMEOUT_S
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    single_log = str(tmp_path / "single.log")
    single = _start(one, 2, single_log)  # 1 process x 2 devices, alongside the pair (2 processes x 1 device)
    try:
        outputs = _pair(two, str(tmp_path), "pair", deadline)
    finally:
        _finish({"the one-process run": single}, {"the one-process run": single_log}, deadline)

    a, b = _run_dir(one), _run_dir(two)
    ra, rb = (json.load(open(os.path.join(d, "result.json"))) for d in (a, b))
    assert ra["status"] == rb["status"] == "ok"
    assert (ra["device"]["device_count"], ra["device"]["process_count"]) == (2, 1)
    assert (rb["device"]["device_count"], rb["device"]["process_count"]) == (2, 2)
    # the same global batches: the same losses at every log step and the same held-out metrics
    np.testing.assert_allclose(_train_losses(b), _train_losses(a), rtol=RTOL)
    assert ra["final_eval"].keys() == rb["final_eval"].keys() and ra["best_eval_step"] == rb["best_eval_step"]
    for key, value in ra["final_eval"].items():
        assert rb["final_eval"][key] == pytest.approx(value, rel=RTOL), key
    # each process read its own half of every global batch of 16, and said so
    assert rb["sharding"]["process_rows"] == {"0": [[0, 8]], "1": [[8, 16]]}
    assert "process 0 of 2: 1 devices, rows 0-7 of each global batch of 16" in outputs["process 0"]
    assert "process 1 of 2: 1 devices, rows 8-15 of each global batch of 16" in outputs["process 1"]
    # one writer: one record, one metrics file; process 1 printed no record
    assert glob.glob(os.path.join(two, "**", "result.json"), recursive=True) == [os.path.join(b, "result.json")]
    assert not glob.glob(os.path.join(b, "traceback*"))
    assert "dlrm:xxs" in outputs["process 0"] and "dlrm:xxs" not in outputs["process 1"]
    # each process's iterator position is in the checkpoint, keyed by process
    with open(os.path.join(b, "checkpoints", "10", "data", "metadata")) as f:
        assert json.load(f) == {"process_count": 2, "processes": [{"next_index": 10}, {"next_index": 10}]}

    # resume both processes from their step-5 checkpoint: the same run to the same numbers
    os.remove(os.path.join(b, "result.json"))
    for name in os.listdir(os.path.join(b, "checkpoints")):
        if name != "5":
            shutil.rmtree(os.path.join(b, "checkpoints", name))
    _pair(two, str(tmp_path), "resume", deadline)
    resumed = json.load(open(os.path.join(b, "result.json")))
    assert resumed["resumed_from"] == [5]
    for key, value in ra["final_eval"].items():
        assert resumed["final_eval"][key] == pytest.approx(value, rel=RTOL), key
    np.testing.assert_allclose(_train_losses(b), _train_losses(a), rtol=RTOL)
