"""benchmarks/kernel_compile.py's settings parsing (its compile step needs a Python with the
`triton` package and runs offline, not in the suite)."""

from __future__ import annotations

from benchmarks.kernel_compile import parse_tiles, resolved, summarize


def test_tiles_parse_per_kernel_with_one_backward_tile_for_both():
    assert parse_tiles("64x32:32x64:64x16,64x64:64x32,default") == [
        (64, 32, 32, 64, 64, 16),  # forward : dK/dV : dQ
        (64, 64, 64, 32, 64, 32),  # one backward tile: both kernels take it
        None,  # the library's defaults
    ]


def test_resolved_settings_are_what_the_kernels_run():
    blocks, tiles, warps = resolved(None, 0, 128, 0, 4, True)  # defaults: 4 heads of 128 with the bias
    assert tiles == blocks.resolve(4, 128, True) == (64, 32, 32, 64, 64, 16, 2, 1) and warps == 8
    _, tiles, warps = resolved((64, 64, 64, 32, 64, 32), 4, 32, 1, 2, False)
    assert tiles[:6] == (64, 64, 64, 32, 64, 32) and tiles.heads_per_program == 1 and warps == 4


def test_summary_counts_fits_tensor_core_paths_and_errors():
    rows = [{"kernel": "a", "fits": True, "wgmma": 60, "mma_sync": 0},
            {"kernel": "b", "fits": False, "wgmma": 0, "mma_sync": 144},
            {"kernel": "c", "fits": True, "wgmma": 0, "mma_sync": 0},  # no dot (a LayerNorm)
            {"kernel": "d", "error": "CompilationError: ..."}]
    assert summarize(rows) == {"kernels": 4, "fit": 2, "wgmma_only": 1, "mma_sync": ["b"], "errors": ["d"]}
