"""benchmarks/mosaic_compile.py: its settings parser, what it reads from Mosaic GPU's dump folder
(on hand-made ptxas, resources and PTX text) and its CLI's errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.gpu_aot import has_cuda_plugin
from benchmarks.mosaic_compile import parse_setting, read_dump


def test_settings_parse_and_bad_ones_are_named():
    assert parse_setting("64x2") == (64, 2, True, None) and parse_setting(" 128x3 ") == (128, 3, True, None)
    assert parse_setting("64x2s") == (64, 2, False, None) and parse_setting("64x2sf") == (64, 2, False, False)
    with pytest.raises(ValueError, match="'64-2'"):
        parse_setting("64-2")


def test_the_dump_folder_is_read_back(tmp_path):
    (tmp_path / "entry_0.ptxas").write_text(
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 1190 by compiler\n"
        "ptxas warning : Registers are spilled to local memory in function 'entry', 16 bytes spill stores\n"
        "    16 bytes stack frame, 16 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem\n")
    (tmp_path / "entry_0.resources.txt").write_text("Resources(smem_scratch_bytes=114688, tmem_scratch_cols=0)")
    (tmp_path / "entry_0.ptx").write_text("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n" * 3
                                          + "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};\n")
    row = read_dump(str(tmp_path))
    assert row["registers"] == 168 and row["spill_store_bytes"] == 16 and row["spill_load_bytes"] == 36
    assert row["smem_bytes"] == 114688
    assert row["wgmma"] == {"m64n128k16": 1, "m64n64k16": 3}
    assert len(row["ptxas_notes"]) == 1 and "C7519" in row["ptxas_notes"][0]


def test_cli_errors_exit_2():
    bad = subprocess.run([sys.executable, "-m", "benchmarks.mosaic_compile", "--settings", "64"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "BKxSTAGES" in bad.stderr and "Traceback" not in bad.stderr
    if not has_cuda_plugin():
        missing = subprocess.run([sys.executable, "-m", "benchmarks.mosaic_compile"], capture_output=True, text=True)
        assert missing.returncode == 2 and "CUDA plugin" in missing.stderr and "Traceback" not in missing.stderr
