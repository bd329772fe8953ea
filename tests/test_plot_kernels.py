"""benchmarks/plot_kernels.py: the values drawn from a GPU session's JSON, and the CLI's files and
errors, on hand-made results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import plot_kernels
from benchmarks.aims import Session, load_session


def _hstu(impl, length, dim, fwd_ms, fwd_bwd_ms, fwd_tflops):
    return {"op": "hstu_attention", "impl": impl, "L": length, "d": dim, "fwd_ms": fwd_ms,
            "fwd_bwd_ms": fwd_bwd_ms, "fwd_tflops": fwd_tflops}


KERNELS = {"benchmark": "kernels", "device": "NVIDIA H100 80GB HBM3", "interpret": False,
           "matmul_bf16_tflops": 750.0, "hstu": [
               _hstu("pallas", 2048, 128, 0.5, 1.0, 300.0), _hstu("xla", 2048, 128, 2.0, 5.0, 75.0),
               _hstu("pallas", 4096, 128, 1.0, 2.0, 320.0), _hstu("xla", 4096, 128, 5.0, 12.0, 64.0),
               _hstu("pallas", 4096, 64, 0.8, 1.6, 200.0),
               {"op": "hstu_attention", "impl": "xla", "L": 4096, "d": 64,
                "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
           ]}
SIDE_BY_SIDE = {"benchmark": "hstu_reference_side_by_side", "rows": [
    {"impl": "gr", "L": 4096, "d": 128, "fwd_ms": 1.5, "fwd_bwd_ms": 3.0, "fwd_tflops": 210.0},
    {"impl": "pallas", "L": 4096, "d": 128, "fwd_ms": 1.0, "fwd_bwd_ms": 2.5, "fwd_tflops": 315.0},
    {"impl": "xla", "L": 4096, "d": 128, "fwd_ms": 4.0, "fwd_bwd_ms": 11.0, "fwd_tflops": 80.0},
    {"impl": "mosaic", "L": 4096, "d": 128, "fwd_ms": 0.8, "fwd_bwd_ms": 2.0, "fwd_tflops": 390.0},
]}
TRAIN = {"benchmark": "train_step", "device": "NVIDIA H100 80GB HBM3", "interpret": False, "rows": [
    {"model": "hstu", "impl": "pallas", "mfu": 0.41}, {"model": "hstu", "impl": "xla", "mfu": 0.2},
    {"model": "wukong", "impl": "pallas", "error": "ValueError: boom"},
    {"model": "hstu_stu", "impl": "mosaic", "mfu": 0.45},
]}


def test_the_series_are_the_rows_ratios_and_failures():
    data = plot_kernels.series(Session(KERNELS, SIDE_BY_SIDE, TRAIN))
    assert data["forward"][("ours", 128)] == [(2048, 300.0), (4096, 320.0)]
    assert data["forward"][("XLA", 128)] == [(2048, 75.0), (4096, 64.0)]
    assert data["forward"][("ours", 64)] == [(4096, 200.0)]
    assert data["forward"][("GR, no bias", 128)] == [(4096, 210.0)]
    assert data["forward"][("ours, no bias", 128)] == [(4096, 315.0)]
    assert data["forward"][("Mosaic GPU, no bias", 128)] == [(4096, 390.0)]
    assert ("XLA, no bias", 128) not in data["forward"]  # the side-by-side's own XLA row is not drawn
    speed = data["speedup"]
    assert speed[("over XLA", 128)] == [(2048, pytest.approx(5.0)), (4096, pytest.approx(6.0))]
    assert ("over XLA", 64) not in speed  # its XLA row failed: no ratio
    assert speed[("over GR, no bias", 128)] == [(4096, pytest.approx(1.2))]
    assert speed[("Mosaic over GR, no bias", 128)] == [(4096, pytest.approx(1.5))]
    assert data["mfu"] == {("hstu", "pallas"): 0.41, ("hstu", "xla"): 0.2, ("hstu_stu", "mosaic"): 0.45}
    assert data["failed"] == ["HSTU XLA L=4096 d=64: XlaRuntimeError: RESOURCE_EXHAUSTED",
                              "train step wukong pallas: ValueError: boom"]
    assert data["matmul_tflops"] == 750.0 and data["device"] == "NVIDIA H100 80GB HBM3"
    assert data["interpret"] is False
    assert plot_kernels.series(Session({**KERNELS, "interpret": True}, None, None))["interpret"] is True


def _write(folder, **files):
    for name, data in files.items():
        (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_plot_writes_a_png_and_an_svg(tmp_path):
    _write(tmp_path, **{"kernels.json": KERNELS, "hstu_side_by_side.json": SIDE_BY_SIDE, "train_step.json": TRAIN})
    assert plot_kernels.main([str(tmp_path)]) == 0
    png, svg = tmp_path / "kernel_speed.png", tmp_path / "kernel_speed.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "HSTU attention forward" in svg.read_text()


def test_a_cut_short_session_plots_the_rows_its_log_kept(tmp_path):
    rows = "\n".join(json.dumps(r) for r in KERNELS["hstu"][:4])
    _write(tmp_path, **{"session.log": f"== kernels (timeout 200s): ...\n"
                                       f'{{"matmul_bf16_tflops": 740.0, "interpret": false}}\n{rows}\n'})
    session = load_session(str(tmp_path))
    assert session.side_by_side is None and session.train is None
    out = tmp_path / "plots" / "speed.png"
    out.parent.mkdir()
    assert plot_kernels.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "plots" / "speed.svg").exists()
    assert plot_kernels.series(session)["matmul_tflops"] == 740.0


def test_cli_errors_exit_2_with_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "benchmarks.plot_kernels", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not a folder" in missing.stderr and "Traceback" not in missing.stderr
    empty = subprocess.run([sys.executable, "-m", "benchmarks.plot_kernels", str(tmp_path)],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "no kernels.json" in empty.stderr and "Traceback" not in empty.stderr
    _write(tmp_path, **{"train_step.json": TRAIN})
    blocked = tmp_path / "no-such-dir" / "x.png"
    unwritable = subprocess.run([sys.executable, "-m", "benchmarks.plot_kernels", str(tmp_path), "--out", str(blocked)],
                                capture_output=True, text=True)
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
    assert len(unwritable.stderr.strip().splitlines()) == 1
