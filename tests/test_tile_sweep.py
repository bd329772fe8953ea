"""benchmarks/tile_sweep.py: settings parsing, and one interpreted sweep (the script, not the speed)."""

from __future__ import annotations

import pytest

from benchmarks.tile_sweep import DEFAULT_SETTINGS, fastest, parse_setting, sweep
from scaling.kernels.hstu_attention import Blocks


def test_settings_parse_to_blocks_with_zero_as_the_default():
    assert parse_setting("64,32,32,64,64,16,8,3,2,1") == Blocks(64, 32, 32, 64, 64, 16, num_warps=8, num_stages=3,
                                                                heads_per_program=2, dkdv_heads_per_program=1)
    assert parse_setting("0,0,0,0,0,0,0,2,0,0") == Blocks()
    assert len([parse_setting(s) for s in DEFAULT_SETTINGS.split()]) == 9
    with pytest.raises(ValueError, match="expected 10 comma-separated integers"):
        parse_setting("64,32")
    with pytest.raises(ValueError, match="dq_block_k"):
        parse_setting("64,32,32,64,64,24,8,2,2,1")


def test_an_interpreted_sweep_times_every_setting_on_the_same_inputs():
    settings = [("a", Blocks.uniform(16)), ("b", Blocks.uniform(16, heads_per_program=2, dkdv_heads_per_program=1))]
    rows = sweep(settings, length=32, dim=16, heads=2, tokens=64, iters=1)
    assert [r["setting"] for r in rows] == ["a", "b"] and all(r["batch"] == 2 for r in rows)
    assert rows[1]["tiles"]["heads_per_program"] == 2 and rows[1]["tiles"]["dkdv_heads_per_program"] == 1
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_tflops"] > 0 for r in rows)
    assert fastest(rows, "fwd_ms") in ("a", "b") and fastest([{"setting": "x", "error": "boom"}], "fwd_ms") is None
