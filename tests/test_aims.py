"""benchmarks/aims.py: the issue's speed aims computed from a GPU session's JSON, on hand-made
results (values, verdicts, missing and cut-short steps, the CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import aims


def _hstu(impl, length, dim, fwd_ms, fwd_bwd_ms, fwd_tflops=None, **extra):
    return {"op": "hstu_attention", "impl": impl, "L": length, "d": dim, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_tflops": fwd_tflops, **extra}


KERNELS = {"benchmark": "kernels", "interpret": False, "matmul_bf16_tflops": 800.0, "hstu": [
    _hstu("pallas", 4096, 128, 1.0, 3.0, fwd_tflops=320.0),
    _hstu("xla", 4096, 128, 5.0, 12.0, fwd_tflops=60.0),
    _hstu("pallas", 2048, 128, 0.5, 1.0, fwd_tflops=300.0),
    _hstu("xla", 2048, 128, 2.0, 4.0, fwd_tflops=70.0),
    _hstu("pallas", 1024, 128, 0.2, 0.5, fwd_tflops=250.0),  # below 2048: not an aim
    _hstu("xla", 1024, 128, 0.3, 0.6, fwd_tflops=200.0),
    _hstu("pallas", 8192, 128, 4.0, 12.0, fwd_tflops=330.0),
    {"op": "hstu_attention", "impl": "xla", "L": 8192, "d": 128, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
]}
SIDE_BY_SIDE = {"benchmark": "hstu_reference_side_by_side", "gr_skipped": None, "rows": [
    {"impl": "gr", "L": 4096, "d": 128, "fwd_ms": 1.2, "fwd_bwd_ms": 3.3},
    {"impl": "pallas", "L": 4096, "d": 128, "fwd_ms": 1.0, "fwd_bwd_ms": 3.0},
    {"impl": "gr", "L": 2048, "d": 64, "fwd_ms": 0.3, "fwd_bwd_ms": 0.9},
    {"impl": "pallas", "L": 2048, "d": 64, "fwd_ms": 0.4, "fwd_bwd_ms": 0.9},
    {"impl": "mosaic", "L": 4096, "d": 128, "fwd_ms": 0.8, "fwd_bwd_ms": 2.2},  # none at L = 2048
]}
TRAIN = {"benchmark": "train_step", "interpret": False, "rows": [
    {"model": "hstu", "impl": "pallas", "step_ms": 30.0, "train_tflops": 400.0, "mfu": 0.5, "fraction_of_roofline": 0.6},
    {"model": "hstu", "impl": "xla", "step_ms": 80.0, "train_tflops": 150.0, "mfu": 0.19},
    {"model": "wukong", "impl": "pallas", "step_ms": 100.0, "train_tflops": 240.0, "mfu": 0.3},
    {"model": "onetrans", "impl": "pallas", "step_ms": 50.0, "train_tflops": 100.0, "mfu": 0.12},
]}


def _write(folder, **files):
    for name, data in files.items():
        (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def _by_name(found):
    return {aim["aim"]: aim for aim in found}


def test_every_aim_from_a_full_session(tmp_path):
    _write(tmp_path, **{"kernels.json": KERNELS, "hstu_side_by_side.json": SIDE_BY_SIDE, "train_step.json": TRAIN})
    found = _by_name(aims.evaluate(str(tmp_path)))
    forward = found["hstu_forward_vs_matmul"]
    assert forward["worst"] == pytest.approx(0.4) and forward["met"] is True  # 320 / 800
    speedup = found["hstu_fwd_bwd_vs_xla"]
    assert [v.get("value") for v in speedup["values"]] == [pytest.approx(4.0), pytest.approx(4.0), None]
    assert "xla failed: XlaRuntimeError" in speedup["values"][2]["note"]  # listed, not counted
    assert speedup["met"] is True
    gr = found["hstu_vs_gr"]
    assert gr["worst"] == pytest.approx(0.75) and gr["met"] is False  # GR's forward at L = 2048 is faster
    assert len(gr["values"]) == 4
    mosaic = found["hstu_mosaic_vs_gr"]  # the Mosaic GPU kernels, reported beside the aim
    assert [v.get("value") for v in mosaic["values"]] == [None, None, pytest.approx(1.5), pytest.approx(1.5)]
    assert mosaic["values"][0]["note"] == "no mosaic row" and mosaic["met"] is None  # partly measured
    mfu = found["train_step_mfu"]
    assert [v["model"] for v in mfu["values"]] == ["hstu", "wukong"]  # kernels only, OneTrans not an aim
    assert mfu["worst"] == pytest.approx(0.3) and mfu["met"] is False
    text = aims.table(aims.evaluate(str(tmp_path)))
    assert "hstu_forward_vs_matmul: worst 0.4, target 0.35: met" in text
    assert "train_step_mfu: worst 0.3, target 0.35: NOT met" in text


def test_a_failed_kernel_row_fails_its_aim_and_a_missing_one_leaves_it_unproven(tmp_path):
    oom = {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED"}
    kernels = {**KERNELS, "hstu": [*KERNELS["hstu"][:2], {**KERNELS["hstu"][2], **oom}, *KERNELS["hstu"][3:]]}
    train = {**TRAIN, "rows": [row for row in TRAIN["rows"] if row["model"] != "wukong"]}
    _write(tmp_path, **{"kernels.json": kernels, "train_step.json": train})
    found = _by_name(aims.evaluate(str(tmp_path)))
    speedup = found["hstu_fwd_bwd_vs_xla"]
    assert speedup["worst"] == pytest.approx(4.0) and speedup["met"] is False  # ours failed at L = 2048
    assert "RESOURCE_EXHAUSTED" in speedup["values"][0]["failed"]
    mfu = found["train_step_mfu"]  # HSTU's 0.5 meets the aim, Wukong's step never ran
    assert mfu["worst"] == pytest.approx(0.5) and mfu["met"] is None
    assert mfu["values"][1] == {"model": "wukong", "note": "no row (not run)"}
    text = aims.table(list(found.values()))
    assert "train_step_mfu: worst 0.5, target 0.35: partly measured" in text
    assert "hstu_fwd_bwd_vs_xla: worst 4, target 3: NOT met" in text


def test_missing_and_interpreted_steps_are_not_measured(tmp_path):
    _write(tmp_path, **{"kernels.json": {**KERNELS, "interpret": True}, "train_step.json": "{truncated",
                        "hstu_side_by_side.json": {**SIDE_BY_SIDE, "gr_skipped": "no --gr-path"}})
    found = _by_name(aims.evaluate(str(tmp_path)))
    assert all(aim["met"] is None and aim["worst"] is None for aim in found.values())
    assert "interpret mode" in found["hstu_forward_vs_matmul"]["missing"]
    assert "no --gr-path" in found["hstu_vs_gr"]["missing"]
    assert "did not run" in found["train_step_mfu"]["missing"]  # unreadable JSON counts as missing
    assert "not measured" in aims.table(list(found.values()))


def test_a_kernels_step_cut_short_is_read_from_the_session_log(tmp_path):
    """kernels.json is written at the end; its rows and the matmul peak are JSON lines in the log.
    A later step's rows (the ncu step runs kernels.py too) are not taken for the grid's."""
    lines = ["== kernels (timeout 140s): python -m benchmarks.kernels",
             json.dumps({"matmul_bf16_tflops": 800.0, "interpret": False}),
             *(json.dumps(row) for row in KERNELS["hstu"][:4]),
             "kernels rc=124 seconds=140 timeout=140",
             "== ncu (timeout 60s): bash -c ...",
             json.dumps({"matmul_bf16_tflops": 10.0, "interpret": False}),
             json.dumps(_hstu("pallas", 4096, 128, 9.0, 9.0, fwd_tflops=1.0))]
    _write(tmp_path, **{"session.log": "\n".join(lines) + "\n"})
    found = _by_name(aims.evaluate(str(tmp_path)))
    assert found["hstu_forward_vs_matmul"]["worst"] == pytest.approx(0.4)
    assert "session.log" in found["hstu_forward_vs_matmul"]["source"]
    assert [v["L"] for v in found["hstu_fwd_bwd_vs_xla"]["values"]] == [2048, 4096]


def test_cli_prints_the_table_and_refuses_a_missing_folder(tmp_path):
    _write(tmp_path, **{"kernels.json": KERNELS})
    run = subprocess.run([sys.executable, "-m", "benchmarks.aims", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0 and "hstu_forward_vs_matmul: worst 0.4" in run.stdout
    as_json = subprocess.run([sys.executable, "-m", "benchmarks.aims", str(tmp_path), "--json"], capture_output=True,
                             text=True)
    assert json.loads(as_json.stdout)[0]["aim"] == "hstu_forward_vs_matmul"
    bad = subprocess.run([sys.executable, "-m", "benchmarks.aims", str(tmp_path / "nope")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a folder" in bad.stderr
