"""HSTU attention tile sweep: one process times the kernel at each tile setting on the same inputs.

    python -m benchmarks.tile_sweep [--settings "FQ,FK,KVQ,KVK,DQQ,DQK,WARPS,STAGES,G,GKV ..."]
                                    [--length 4096] [--dim 128] [--heads 4] [--tokens 32768]
                                    [--iters 10] [--smoke] [--out FILE]

A setting is forward BQ, BK, dK/dV BQ, BK, dQ BQ, BK, num_warps, num_stages, heads per program and
dK/dV's heads per program (scaling/kernels/hstu_attention.Blocks; 0 anywhere: the library's
default). The default settings are gpu_session.sh's, most telling first: the library's defaults,
the former one-tile backward (both backward kernels on mma.sync), one head per program everywhere
(all wgmma), the defaults with 64 x 64 forward tiles (44 B of register spill), dK/dV at two heads
on mma.sync, the former one-head defaults, the defaults with a deeper pipeline, and one head per
program with a 128-row forward tile (as Triton's own H100 attention tutorial tiles it), 128 x 32
(255 registers, no spill) and 128 x 64 (24 B of spill with the bias, none without).

The model's configuration (relative bias, bf16, B = tokens / L full sequences), as
benchmarks/kernels.py's HSTU rows, in one process (JAX starts once) on the same seeded inputs;
each row is printed as a JSON line as it finishes (a sweep cut short keeps its rows). Rows carry
the forward's and forward + backward's median ms and TFLOP/s (benchmarks/kernels.py's causal FLOP
count) and the tiles the setting resolved to; the report names the fastest setting for each. --smoke: tiny sizes with 16-row tiles (CPU: interpret
mode), which checks the script, not the speed.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.json_report import emit
from benchmarks.kernels import bench_hstu
from scaling.kernels.hstu_attention import Blocks
from scaling.kernels.tiles import TILE_FIELDS

DEFAULT_SETTINGS = ("0,0,0,0,0,0,0,2,0,0 64,32,32,32,32,32,8,2,2,2 64,64,32,64,64,32,8,2,1,1 "
                    "64,64,32,64,64,16,8,2,2,1 64,32,32,32,64,16,8,2,2,2 64,64,64,32,64,32,8,2,1,1 "
                    "0,0,0,0,0,0,0,3,0,0 128,32,32,64,64,32,8,2,1,1 128,64,32,64,64,32,8,2,1,1")


def parse_setting(text: str) -> Blocks:
    """'64,32,32,64,64,16,8,2,2,1' -> Blocks (0: the default); ValueError names what is wrong."""
    values = [int(x) for x in text.split(",")]
    if len(values) != len(TILE_FIELDS) + 4:
        raise ValueError(f"setting {text!r}: expected {len(TILE_FIELDS) + 4} comma-separated integers "
                         "(6 tile sizes, num_warps, num_stages, heads per program, dK/dV's)")
    *tiles, warps, stages, group, kv_group = values
    return Blocks(*(t or None for t in tiles), num_warps=warps or None, num_stages=stages or 2,
                  heads_per_program=group or None, dkdv_heads_per_program=kv_group or None)


def sweep(settings: list[tuple[str, Blocks]], length: int, dim: int, heads: int, tokens: int,
          iters: int) -> list[dict]:
    """One row per setting: benchmarks/kernels.py's HSTU row of the kernel at that setting, tagged
    with it, on the same (seeded) inputs."""
    return [row for text, blocks in settings
            for row in bench_hstu([length], [dim], tokens, heads, iters, blocks, impls=("pallas",),
                                  tag={"setting": text, "num_warps": blocks.num_warps,
                                       "num_stages": blocks.num_stages})]


def fastest(rows: list[dict], key: str) -> str | None:
    timed = [r for r in rows if key in r]
    return min(timed, key=lambda r: r[key])["setting"] if timed else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="space-separated settings (module docstring)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / L)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 16-row tiles (CPU: interpret mode)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        settings = [(text, parse_setting(text)) for text in args.settings.split()]
    except ValueError as err:
        parser.error(str(err))
    length, dim, heads, tokens, iters = args.length, args.dim, args.heads, args.tokens, args.iters
    if args.smoke:  # every setting's tiles capped to 16 rows: the sizes the interpreter handles
        length, dim, heads, tokens, iters = 32, 16, 2, 64, 3
        settings = [(text, Blocks.uniform(16, num_warps=b.num_warps, num_stages=b.num_stages,
                                          heads_per_program=b.heads_per_program,
                                          dkdv_heads_per_program=b.dkdv_heads_per_program))
                    for text, b in settings]
    rows = sweep(settings, length, dim, heads, tokens, iters)
    report = {"benchmark": "tile_sweep", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "interpret": jax.default_backend() != "gpu", "jax": jax.__version__, "smoke": args.smoke,
              "fastest_fwd": fastest(rows, "fwd_ms"), "fastest_fwd_bwd": fastest(rows, "fwd_bwd_ms"), "rows": rows}
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
