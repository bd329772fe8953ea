"""Sweep YAMLs: expansion, validation before anything runs, the launchers, kill-and-relaunch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from scaling.config import load_run_config, run_id
from scaling.config_schema import ConfigError
from scaling.sweep.spec import load_sweep
from scaling.sweep.state import trial_state
from tests.conftest import ROOT, run_cli

BASE = {
    "name": "t",
    "data": {"name": "synthetic_ctr", "eval_examples": 1024},
    "model": {"name": "wukong", "size": "xxs"},
    "train": {"steps": 30, "batch_size": 64, "eval_every": 15, "checkpoint_every": 10, "log_every": 5,
              "eval_batch_size": 256},
    "logging": {"progress": False, "wandb": {"mode": "disabled"}},
}


def write_sweep(tmp_path, sweep: dict, **base_updates) -> str:
    data = json.loads(json.dumps(BASE))
    data["train"]["output_dir"] = str(tmp_path / "runs")
    for key, value in base_updates.items():
        data[key] = value
    data["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_expansion_scoped_values_and_stable_ids(tmp_path):
    path = write_sweep(tmp_path, {
        "scale": {"wukong": ["xxs", "xs"], "dlrm": {"gflops": [4e-5, 6e-4], "set": {"model.bottom_mlp": [32]}}},
        "grid": {"optimizer.dense.learning_rate": {"default": [1e-3, 2e-3], "wukong.xs": [5e-3]}},
        "zip": {"train.steps": [20, 30], "train.batch_size": [64, 32]},
        "seeds": {"default": [0], "wukong.xxs": [0, 1]},
        "tune": ["optimizer.dense.learning_rate"],
    })
    sweep = load_sweep(path)
    # wukong xxs: 2 lr x 2 zip x 2 seeds; xs: 1 x 2 x 1; dlrm (2 sizes): 2 x 2 x 1 each
    assert len(sweep.trials) == 8 + 2 + 4 + 4
    by = {(t.family, t.size) for t in sweep.trials}
    assert by == {("wukong", "xxs"), ("wukong", "xs"), ("dlrm", "xxs"), ("dlrm", "m")}
    xs = [t for t in sweep.trials if t.size == "xs"]
    assert {t.config.optimizer.dense.learning_rate for t in xs} == {5e-3}
    assert {(t.config.train.steps, t.config.train.batch_size) for t in xs} == {(20, 64), (30, 32)}
    dlrm = [t for t in sweep.trials if t.family == "dlrm"]
    assert all(t.config.model.bottom_mlp == (32,) for t in dlrm)
    # gflops targets resolve to the preset nearest in log FLOPs
    for t in dlrm:
        assert 0.25 < t.gflops_per_example / t.target_gflops < 4
    # ids: unique, stable across loads, and equal to what `scaling train` computes from config.yaml
    ids = [t.trial_id for t in sweep.trials]
    assert len(set(ids)) == len(ids)
    assert ids == [t.trial_id for t in load_sweep(path).trials]
    from scaling.config import dump_yaml

    t = sweep.trials[5]
    (tmp_path / "c.yaml").write_text(dump_yaml(t.config))
    assert run_id(load_run_config(str(tmp_path / "c.yaml"))) == t.trial_id


@pytest.mark.parametrize("sweep, expected", [
    ({"scal": {"wukong": ["xxs"]}}, "sweep.scal: unknown key (did you mean 'scale'?)"),
    ({"scale": {"wukng": ["xxs"]}}, "sweep.scale.wukng: unknown model family 'wukng' (did you mean 'wukong'?)"),
    ({"scale": {"wukong": ["xxxl"]}}, "sweep.scale.wukong.sizes: unknown size 'xxxl'"),
    ({"zip": {"train.steps": [1, 2], "train.batch_size": [64]}}, "sweep.zip: lists must have equal lengths"),
    ({"grid": {"optimizer.dense.learning_rate": [1e-3]}, "tune": ["train.steps"]}, "sweep.tune: 'train.steps' is not a grid axis"),
    ({"grid": {"seed": [1, 2]}}, "sweep.grid.seed: cannot be swept: use sweep.seeds"),
    ({"grid": {"optimizer.dense.learnin_rate": [1e-3]}}, "optimizer.dense.learnin_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"grid": {"optimizer.dense.learning_rate": [-1.0]}}, "optimizer.dense.learning_rate"),
    ({"grid": {"train.steps": [30, 30]}}, "resolve to the same config"),
    ({"scale": {"dlrm": {"gflops": [1e-6, 2e-6]}}}, "both resolve to size 'xxs'"),
    ({"seeds": {"wukong.q": [0]}}, "sweep.seeds.wukong.q: unknown size 'q'"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, sweep, expected):
    path = write_sweep(tmp_path, sweep)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert expected in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_cli_bad_sweep_is_one_line_exit_2_and_dry_run_table(tmp_path):
    bad = write_sweep(tmp_path, {"grid": {"train.stepz": [1]}})
    out = run_cli("sweep", bad, "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "train.stepz: unknown key" in out.stderr
    assert "Traceback" not in out.stderr

    good = write_sweep(tmp_path, {"scale": {"wukong": ["xxs", "xs"]}, "seeds": 2})
    out = run_cli("sweep", good, "--dry-run")
    assert out.returncode == 0, out.stderr
    for text in ("4 trials", "wukong-xxs-", "wukong-xs-", "params dense", "GFLOP/ex", "train FLOPs"):
        assert text in out.stdout
    assert not (tmp_path / "runs").exists()


def _states(path):
    return {t.trial_id: trial_state(t.run_dir) for t in load_sweep(path).trials}


def test_failures_are_recorded_and_retry_failed_reruns_only_them(tmp_path):
    """A NaN trial and an exception trial are recorded; the others finish; --retry-failed reruns those two."""
    path = write_sweep(tmp_path, {
        "scale": {"wukong": ["xxs"]},
        "grid": {"optimizer.dense.learning_rate": [1e-3, 1e12], "train.reference_run": ["", str(tmp_path / "missing")]},
    }, optimizer={"dense": {"name": "sgd", "grad_clip_norm": 0.0, "b1": 0.0}})
    out = run_cli("sweep", path, "--workers", "2")
    assert out.returncode == 1, out.stderr  # the sweep finished, with failures
    sweep = load_sweep(path)
    st = {(t.config.optimizer.dense.learning_rate, t.config.train.reference_run): trial_state(t.run_dir)
          for t in sweep.trials}
    assert st[(1e-3, "")].status == "done"
    assert st[(1e12, "")].status == "diverged"
    failed = st[(1e-3, str(tmp_path / "missing"))]
    assert failed.status == "failed" and "FileNotFoundError" in failed.reason
    ok_run = next(t for t in sweep.trials if t.config.train.reference_run == "" and t.config.optimizer.dense.learning_rate == 1e-3)
    assert os.path.exists(os.path.join(next(t.run_dir for t in sweep.trials if t.config.train.reference_run), "traceback.txt"))
    ok_mtime = os.path.getmtime(os.path.join(ok_run.run_dir, "result.json"))

    status = run_cli("status", path)
    assert status.returncode == 0
    assert "done 1" in status.stdout and "failed 2" in status.stdout and "diverged 1" in status.stdout

    again = run_cli("sweep", path)  # without --retry-failed: nothing to do
    assert again.returncode == 0 and "0 to run" in again.stderr
    retry = run_cli("sweep", path, "--retry-failed")
    assert "3 failed being retried" in retry.stderr
    assert os.path.getmtime(os.path.join(ok_run.run_dir, "result.json")) == ok_mtime  # not recomputed


def _wait_for(predicate, timeout=240.0, interval=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _launch(path):
    return subprocess.Popen([sys.executable, "-m", "scaling.cli", "sweep", path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _checkpoint_steps(run_dir):
    ckpts = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


def test_kill_or_ctrl_c_then_relaunch_skips_finished_and_resumes_unfinished(tmp_path):
    """SIGKILL of the launcher alone (the kernel tells its worker to stop), relaunch, Ctrl-C (SIGINT to the
    whole process group), relaunch: the finished trial is never recomputed and the other resumes each time."""
    path = write_sweep(tmp_path, {"scale": {"dlrm": {"sizes": ["xxs"], "set": {"train.steps": 40}}, "wukong": ["xs"]}},
                       train={**BASE["train"], "output_dir": str(tmp_path / "runs"), "steps": 400,
                              "checkpoint_every": 20, "eval_every": 200})
    first, second = load_sweep(path).trials  # run in order with one worker: a short one, then a long one
    assert (first.config.train.steps, second.config.train.steps) == (40, 400)

    proc = _launch(path)
    try:
        assert _wait_for(lambda: any(s >= 40 for s in _checkpoint_steps(second.run_dir))), "second trial never checkpointed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert trial_state(first.run_dir).status == "done"
    assert _wait_for(lambda: trial_state(second.run_dir).status == "interrupted", timeout=60)
    done_result = open(os.path.join(first.run_dir, "result.json")).read()
    killed_at = _checkpoint_steps(second.run_dir)[-1]

    proc = _launch(path)
    try:
        assert _wait_for(lambda: _checkpoint_steps(second.run_dir)[-1] > killed_at), "the relaunch did not resume"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert trial_state(second.run_dir).status == "interrupted"

    out = run_cli("sweep", path)
    assert out.returncode == 0, out.stderr
    assert "1 done (skipped)" in out.stderr
    assert open(os.path.join(first.run_dir, "result.json")).read() == done_result  # not recomputed
    record = json.load(open(os.path.join(second.run_dir, "result.json")))
    assert record["status"] == "ok" and len(record["resumed_from"]) == 2 and record["resumed_from"][0] >= 40
    steps = [json.loads(line)["step"] for line in open(os.path.join(second.run_dir, "metrics.jsonl"))
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def test_slurm_launcher_through_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    path = write_sweep(tmp_path, {"scale": {"wukong": ["xxs"], "dlrm": ["xxs"]}})
    out = run_cli("sweep", path, "--launcher", "slurm", "--slurm.cluster=local", "--slurm.time=10", "--wait")
    assert out.returncode == 0, out.stderr
    assert "submitted 2 array tasks" in out.stderr
    states = _states(path)
    assert [s.status for s in states.values()] == ["done", "done"]
    # the same run directories the local launcher uses: a local relaunch has nothing to do
    again = run_cli("sweep", path)
    assert "2 done (skipped)" in again.stderr

    bad = run_cli("sweep", path, "--launcher", "slurm", "--slurm.partition")
    assert bad.returncode == 2 and "expected --slurm.KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    stray = run_cli("sweep", path, "--slurm.partition=gpu")
    assert stray.returncode == 2 and "need --launcher slurm" in stray.stderr


def test_a_worker_killed_mid_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    """The kernel's OOM killer takes a worker down: that trial is recorded (oom), a new worker runs the rest."""
    # the victim is long (it is killed after its first steps); the survivor short
    path = write_sweep(tmp_path, {"scale": {"dlrm": ["xs"], "wukong": {"sizes": ["xxs"], "set": {"train.steps": 40}}}},
                       train={**BASE["train"], "output_dir": str(tmp_path / "runs"), "steps": 400,
                              "checkpoint_every": 100, "eval_every": 400})
    victim, survivor = load_sweep(path).trials
    assert (victim.config.train.steps, survivor.config.train.steps) == (400, 40)
    proc = subprocess.Popen([sys.executable, "-m", "scaling.cli", "sweep", path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(victim.run_dir, ".lock")
    assert _wait_for(lambda: os.path.exists(os.path.join(victim.run_dir, "metrics.jsonl")) and os.path.exists(lock))
    os.kill(json.load(open(lock))["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    killed = trial_state(victim.run_dir)
    assert killed.status == "oom" and "SIGKILL" in killed.reason
    assert trial_state(survivor.run_dir).status == "done"
