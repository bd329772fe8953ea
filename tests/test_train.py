"""The training loop end to end on the synthetic data: run directory, resume, determinism, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from analysis.curves import plot_learning_curves, read_eval_curve
from scaling.config import load_run_config
from scaling.train.loop import run_directory, train
from tests.conftest import ROOT, run_cli, tiny
from tests.wandb_records import read_records

QUICK = os.path.join(ROOT, "sweeps", "quickstart.yaml")


def _config(overrides, *extra):
    return load_run_config(QUICK, [*overrides, *extra])


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_directory_and_record(tiny_overrides):
    config = _config(tiny_overrides, "model.size=xs")
    record = train(config)
    run_dir = run_directory(config)
    assert record.status == "ok", record.reason
    for name in ("config.yaml", "metrics.jsonl", "result.json", "checkpoints"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    result = json.load(open(os.path.join(run_dir, "result.json")))
    for key in ("family", "size", "seed", "params_dense", "params_embedding", "flops_per_example_analytic",
                "flops_per_example_xla", "embedding_bytes_per_example", "examples_seen", "train_flops",
                "final_eval", "best_eval", "wall_time_s", "examples_per_s", "memory", "device", "status", "versions"):
        assert key in result, key
    assert result["examples_seen"] == 30 * 64
    assert result["train_flops"] == pytest.approx(3 * result["flops_per_example_analytic"] * 30 * 64)
    ev = result["final_eval"]
    assert 0.0 < ev["logloss"] < 1.0 and 0.0 < ev["auc"] <= 1.0
    assert ev["excess_logloss"] == pytest.approx(ev["logloss"] - result["data_reference"]["bayes_logloss"])
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [15, 30]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["20", "30"]  # keep-last-2
    # the resolved config reloads to the same run
    again = load_run_config(os.path.join(run_dir, "config.yaml"))
    assert run_directory(again) == run_dir
    # a finished run is not retrained
    assert train(config).final_eval == record.final_eval
    # its learning curve is what metrics.jsonl says, and plots
    examples, losses = read_eval_curve(run_dir)
    assert examples == [15 * 64, 30 * 64] and losses[-1] == pytest.approx(ev["logloss"])
    png = plot_learning_curves([run_dir], os.path.join(run_dir, "curve.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_compute_and_compiled_memory(tiny_overrides):
    record = train(_config(tiny_overrides, "model.size=xs", "train.compute_dtype=bfloat16", "train.steps=20"))
    assert record.status == "ok", record.reason
    assert 0.0 < record.final_eval["logloss"] < 1.0
    # the AOT-compiled step's memory is in the record: its arguments hold at least the params
    assert record.memory["step_argument_bytes"] >= 4 * (record.params_dense + record.params_embedding)


def test_step_compiles_once(tiny_overrides):
    """30 more steps compile nothing more: every program that reaches the compiler (compiled, or
    found in the persistent cache the tests share) is counted."""
    compiles = []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        train(_config(tiny_overrides, "model.size=xs", "train.steps=10", "train.eval_every=0", "name=a"))
        short = len(compiles)
        compiles.clear()
        train(_config(tiny_overrides, "model.size=xs", "train.steps=40", "train.eval_every=0", "name=b"))
        long = len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    assert 0 < long <= short, f"{long - short} extra compilations in 30 more steps"


def test_deterministic_for_fixed_seed(tiny_overrides, tmp_path):
    a = train(_config(tiny_overrides, "model.size=xs"))
    b = train(_config(tiny_overrides, "model.size=xs", f"train.output_dir={tmp_path / 'other'}"))
    c = train(_config(tiny_overrides, "model.size=xs", "seed=1"))
    assert a.final_eval == b.final_eval
    assert a.final_eval["logloss"] != c.final_eval["logloss"]


def test_relative_logloss_against_reference_run(tiny_overrides):
    ref = train(_config(tiny_overrides, "model.size=xs"))
    ref_dir = run_directory(_config(tiny_overrides, "model.size=xs"))
    other = train(_config(tiny_overrides, "model.name=dlrm", "model.size=xs", f"train.reference_run={ref_dir}"))
    expected = 100 * (other.final_eval["logloss"] - ref.final_eval["logloss"]) / ref.final_eval["logloss"]
    assert other.final_eval["relative_logloss_pct"] == pytest.approx(expected)


def test_nan_loss_stops_with_diverged(tiny_overrides):
    record = train(_config(tiny_overrides, "model.size=xs", "optimizer.dense.learning_rate=1e30",
                           "optimizer.dense.grad_clip_norm=0", "optimizer.embedding.learning_rate=1e30",
                           "optimizer.schedule.warmup_fraction=0"))
    assert record.status == "diverged"
    assert "step" in record.reason and record.steps < 30


def test_embedding_overflow_is_logged_recorded_and_warned(tiny_overrides, capsys):
    """row_wise lookups with a tenth of the even share as capacity drop ids even on one device:
    every log row (train and eval) carries the count, the record the totals, and the terminal a warning."""
    config = _config(tiny_overrides, "model.name=dlrm", "model.size=xxs", "train.steps=10", "train.eval_every=0",
                     "train.eval_batch_size=64", "sharding.embedding=row_wise", "sharding.embedding_capacity=0.1")
    record = train(config)
    assert record.status == "ok", record.reason
    counts = [r["train/embedding_overflow"] for r in _metrics(run_directory(config)) if r["split"] == "train"]
    assert len(counts) == 2 and all(c > 0 for c in counts)
    assert record.embedding_overflow == sum(counts)
    assert json.load(open(os.path.join(run_directory(config), "result.json")))["embedding_overflow"] == sum(counts)
    err = capsys.readouterr().err
    assert "embedding lookups in the last 5 steps got zero vectors" in err
    # evaluation's lookups are counted too (the one final evaluation here)
    evals = [r["eval/embedding_overflow"] for r in _metrics(run_directory(config)) if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0] > 0 and record.eval_embedding_overflow == evals[0]


def test_wandb_offline_writes_run(tiny_overrides):
    config = _config(tiny_overrides, "model.size=xs", "logging.wandb.mode=offline", "train.steps=10",
                     "logging.wandb.tags=[test]", "name=wbgroup")
    record = train(config)
    assert record.status == "ok"
    wandb_dir = os.path.join(run_directory(config), "wandb")
    runs = [d for d in os.listdir(wandb_dir) if d.startswith("offline-run-")]
    assert len(runs) == 1
    (log,) = [f for f in os.listdir(os.path.join(wandb_dir, runs[0])) if f.endswith(".wandb")]
    records = read_records(os.path.join(wandb_dir, runs[0], log))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == record.run_id and run.run_group == "wbgroup" and run.job_type == "wukong"
    assert list(run.tags) == ["test"]
    config_items = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config_items["model"]["name"] == "wukong" and config_items["size"] == "xs"
    assert config_items["gflops_per_example"] == pytest.approx(record.flops_per_example_analytic / 1e9)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update})
    assert summary["final/logloss"] == pytest.approx(record.final_eval["logloss"])
    assert summary["params_dense"] == record.params_dense and summary["status"] == "ok"
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [5, 10]
    assert history[-1]["eval/logloss"] == pytest.approx(record.final_eval["logloss"])


def _wait_for_checkpoint(run_dir, proc, timeout=240):
    ckpt = os.path.join(run_dir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


_RESUME_OVERRIDES = ["model.size=xs", "train.steps=400", "train.checkpoint_every=20", "train.eval_every=200"]


@pytest.fixture(scope="module")
def clean_resume_reference(tmp_path_factory):
    """The uninterrupted run both kill-and-resume cases compare against (trained once)."""
    out = tmp_path_factory.mktemp("clean")
    overrides = [o for o in tiny(out) if not o.startswith("train.output_dir")] + _RESUME_OVERRIDES
    clean = run_cli("train", QUICK, *sum((["--set", o] for o in overrides), []), "--set", f"train.output_dir={out}")
    assert clean.returncode == 0, clean.stderr
    return json.load(open(os.path.join(run_directory(load_run_config(QUICK, [*overrides, f"train.output_dir={out}"])),
                                       "result.json")))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_resume_gives_identical_metrics(tiny_overrides, tmp_path, sig, clean_resume_reference):
    overrides = [o for o in tiny_overrides if not o.startswith("train.output_dir")]
    overrides += _RESUME_OVERRIDES
    killed_out = tmp_path / "killed"
    args = ["train", QUICK, *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen([sys.executable, "-m", "scaling.cli", *args, "--set", f"train.output_dir={killed_out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = run_directory(load_run_config(QUICK, [*overrides, f"train.output_dir={killed_out}"]))
    _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code == (-9 if sig == signal.SIGKILL else 130), proc.stderr.read()
    assert not os.path.exists(os.path.join(run_dir, "result.json"))
    resumed = run_cli(*args, "--set", f"train.output_dir={killed_out}")
    assert resumed.returncode == 0, resumed.stderr
    a = json.load(open(os.path.join(run_dir, "result.json")))
    b = clean_resume_reference
    assert a["final_eval"] == b["final_eval"] and a["resumed_from"] and not b["resumed_from"]
    assert a["examples_seen"] == b["examples_seen"] == 400 * 64
    steps = [r["step"] for r in _metrics(run_dir) if r["split"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl has duplicated steps after resume"


def test_data_parallel_on_8_cpu_devices(tiny_overrides, tmp_path):
    """Same run on 1 and on 8 simulated devices: the batch is split, the numbers agree."""
    script = (
        "import sys, json; from scaling.config import load_run_config; from scaling.train.loop import train; "
        "r = train(load_run_config(sys.argv[1], sys.argv[2:])); "
        "print(json.dumps({'loss': r.final_eval['logloss'], 'devices': r.device['device_count']}))"
    )
    results = {}
    for n in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = subprocess.run([sys.executable, "-c", script, QUICK, *tiny_overrides, "model.size=xs",
                              f"train.output_dir={tmp_path / str(n)}"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results[8]["devices"] == 8
    assert results[8]["loss"] == pytest.approx(results[1]["loss"], rel=1e-4)
