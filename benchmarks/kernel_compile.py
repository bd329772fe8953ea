"""Registers, spills and shared memory of the Pallas kernels compiled for an H100, without a GPU.

    python -m benchmarks.kernel_compile --triton-python PY [--dims 64,128] [--length 4096]
        [--tiles 64x64:32x64:64x32,64x64:64x32,...] [--warps 4,8] [--heads 2] [--head-groups 0]
        [--op hstu|fm|flash|norm] [--projected] [--dtype bfloat16|float32] [--out FILE]

JAX lowers each kernel to Triton IR here (cross-lowering for an abstract H100, bf16 unless
--dtype float32: the fp32 dots then lower at JAX's default matmul precision, TF32, or IEEE fp32
with JAX_DEFAULT_MATMUL_PRECISION=highest); a child process of PY (any Python with the `triton`
package, whose wheel carries ptxas) compiles that IR to sm_90a PTX and a cubin with the same
num_warps / num_stages, and `ptxas -v` reports registers per thread, spill bytes and the kernel's
shared memory. The PTX's tensor-core instructions are counted too: `wgmma` (Hopper's warpgroup
MMA) and `mma_sync` (Ampere's, which Triton falls back to for a dot whose output has fewer than
64 rows, at a fraction of the H100's tensor-core rate). Spills (local-memory traffic in the inner
loop) and shared memory beyond 227 KB per block (a launch failure) rule a tile setting out before
any GPU time is spent on it; the fastest of the rest is for the GPU to say (gpu_session.sh's tile
sweep). The Triton in PY need not be the one inside jaxlib, so the counts are what a recent
Triton makes of the same IR, not necessarily what XLA's build will.

`--op fm` compiles the Wukong FM block's two kernels instead, for n x d x k settings (B = 4096)
with the warps the library picks; `--op flash` the softmax attention's three (OneTrans), for
Nq x Nk x d settings (--heads heads, causal, the queries ending at the last key) at the library's
tiles and warps. For HSTU, tiles are forward BQxBK:dK/dV BQxBK:dQ BQxBK (given one backward
tile, both kernels take it), or `default` (with --warps 0: the library's defaults, `Blocks()`);
each setting is lowered with and without the relative bias, for every head dim, warp count and
heads-per-program setting (--head-groups, of --heads heads; 0: the library's default,
`Blocks.resolve`). One program holds G heads' accumulators, so G is bounded by registers: this is
where to see the bound.
`--op norm` compiles HSTU's LayerNorm kernels (scaling/kernels/row_norm.py, with and without the
gate) for row widths --norm-dims at the library's rows per program (`block_rows`).
`--projected` lowers HSTU through `projected_mha`, the model's training path, whose backward
kernels also write the packed projection's gradient (they hold one more tile at the end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import tempfile

from benchmarks.json_report import emit
from benchmarks.triton_ir import flash_ttir, fm_ttir, hstu_ttir, norm_ttir

SMEM_LIMIT = 227 * 1024  # H100: the most shared memory one block may use

_CHILD = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
jobs, out = json.load(open(sys.argv[1])), []
for job in jobs:
    try:
        kernel = triton.compile(job["ttir"], target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True).stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        ptx = kernel.asm["ptx"]
        out.append({"wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                    "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
                    "registers": int(regs.group(1)) if regs else None,
                    "spill_store_bytes": int(spill.group(1)) if spill else None,
                    "spill_load_bytes": int(spill.group(2)) if spill else None,
                    "shared_bytes": int(kernel.metadata.shared)})
    except Exception as err:  # noqa: BLE001
        out.append({"error": f"{type(err).__name__}: {str(err)[:300]}"})
print(json.dumps({"triton": triton.__version__, "results": out}))
'''


def jax_precision():
    """JAX's default matmul precision (what the kernels' fp32 dots lower with)."""
    import jax

    return jax.config.jax_default_matmul_precision or "default"


def compile_ttir(jobs: list[dict], triton_python: str) -> tuple[str, list[dict]]:
    """(Triton version, one result per job): each job {"ttir": path, "num_warps", "num_stages"}
    compiled for sm_90a in a child process of `triton_python`; a result has registers, spill
    bytes, shared bytes and `fits` (no spill, shared memory within a block's), or an error."""
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "jobs.json"), "w") as f:
            json.dump(jobs, f)
        child = subprocess.run([triton_python, "-c", _CHILD, os.path.join(work, "jobs.json")],
                               capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        raise SystemExit(f"error: compiling with {triton_python} failed: {child.stderr.strip().splitlines()[-1]}")
    compiled = json.loads(child.stdout.strip().splitlines()[-1])
    for result in compiled["results"]:
        if "error" not in result:
            result["fits"] = result["spill_store_bytes"] == 0 and result["shared_bytes"] <= SMEM_LIMIT
    return compiled["triton"], compiled["results"]


def summarize(rows: list[dict]) -> dict:
    """Counts over compiled kernels: how many fit (no spill, shared memory within a block's), how
    many run every dot on wgmma, and which use mma.sync or failed to compile."""
    compiled = [r for r in rows if "error" not in r]
    return {"kernels": len(rows), "fit": sum(bool(r.get("fits")) for r in compiled),
            "wgmma_only": sum(r.get("wgmma", 0) > 0 and r.get("mma_sync", 0) == 0 for r in compiled),
            "mma_sync": sorted({r["kernel"] for r in compiled if r.get("mma_sync", 0) > 0}),
            "errors": sorted({r["kernel"] for r in rows if "error" in r})}


def parse_tiles(text: str) -> list[tuple[int, ...] | None]:
    """'64x32:32x64:64x32,64x64:64x32,default' -> [(64, 32, 32, 64, 64, 32), (64, 64, 64, 32, 64, 32),
    None]: forward, dK/dV and dQ tiles (BQxBK each; one backward tile: both kernels'), None: the
    library's defaults."""
    out = []
    for item in text.split(","):
        if item == "default":
            out.append(None)
            continue
        parts = item.split(":")
        if len(parts) == 2:
            parts.append(parts[1])
        out.append(tuple(int(x) for part in parts for x in part.split("x")))
    return out


def resolved(tiles, warps: int, dim: int, group: int, heads: int, bias: bool, itemsize: int = 2):
    """(Blocks, its `Tiles`, num_warps) as the kernels will use them; warps / group 0: the default."""
    from scaling.kernels.hstu_attention import Blocks
    from scaling.kernels.hstu_attention_fwd import MhaConfig

    knobs = dict(num_warps=warps or None, heads_per_program=group or None)
    blocks = Blocks(**knobs) if tiles is None else Blocks(*tiles, **knobs)
    tiles = blocks.resolve(heads, dim, bias, itemsize)
    config = MhaConfig(norm=1.0, num_warps=warps or None, heads_per_program=tiles.heads_per_program)
    return blocks, tiles, config.compiler_params(dim).num_warps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton-python", required=True, help="a Python with the triton package")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tiles", default="64x64:64x64,128x64:64x64,64x64:32x64:64x32,64x32:32x64:64x32,64x64:32x32",
                        help="forward BQxBK:dK/dV BQxBK[:dQ BQxBK] (dQ's defaults to dK/dV's), comma-separated; "
                             "'default': the library's tiles")
    parser.add_argument("--warps", default="4,8", help="0: the library's default")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="HSTU heads (one sequence of --length tokens)")
    parser.add_argument("--head-groups", default="0", help="heads per program, comma-separated; 0: the default")
    parser.add_argument("--norm-dims", default="256,1024,2048,4096", help="--op norm: row widths d")
    parser.add_argument("--op", default="hstu", choices=("hstu", "fm", "flash", "norm"),
                        help="HSTU attention, the Wukong FM block, the softmax (OneTrans) attention or HSTU's LayerNorm")
    parser.add_argument("--fm-shapes", default="27x16x12,48x64x24,64x64x32,64x128x24,128x64x32,96x160x48",
                        help="FM block n x d x k settings (--op fm), with the library's warps")
    parser.add_argument("--flash-shapes", default="528x528x48,272x528x48,16x528x48,4096x4096x64,4096x4096x128",
                        help="softmax attention Nq x Nk x d settings (--op flash)")
    parser.add_argument("--projected", action="store_true",
                        help="HSTU through projected_mha (the training step's fused projection backward)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the kernels' inputs; float32 dots at JAX's default matmul precision (TF32) "
                             "or, with JAX_DEFAULT_MATMUL_PRECISION=highest, IEEE fp32")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    if shutil.which(args.triton_python) is None:
        parser.error(f"--triton-python {args.triton_python!r} is not an executable Python")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    itemsize = 2 if args.dtype == "bfloat16" else 4
    jobs, rows = [], []
    with tempfile.TemporaryDirectory() as work:
        for shape in (args.fm_shapes.split(",") if args.op == "fm" else ()):
            from scaling.kernels.fm_block import launch_warps, tile_sizes

            n, d, k = (int(x) for x in shape.split("x"))
            warps = dict(zip(("wukong_fm_block_fwd", "wukong_fm_block_bwd"),
                             launch_warps(*tile_sizes(n, d, k))))
            for kernel, path in sorted(fm_ttir(n, d, k, tempfile.mkdtemp(dir=work), args.dtype).items()):
                rows.append({"kernel": kernel, "n": n, "d": d, "k": k, "num_warps": warps[kernel],
                             "num_stages": args.num_stages})
                jobs.append({"ttir": path, "num_warps": warps[kernel], "num_stages": args.num_stages})
        for shape in (args.flash_shapes.split(",") if args.op == "flash" else ()):
            from scaling.kernels.flash_attention import FlashBlocks, launch_warps

            nq, nk, d = (int(x) for x in shape.split("x"))
            warps = launch_warps(d, d, FlashBlocks(), itemsize)
            where = tempfile.mkdtemp(dir=work)
            for kernel, path in sorted(flash_ttir(nq, nk, d, where, args.heads, dtype=args.dtype).items()):
                rows.append({"kernel": kernel, "nq": nq, "nk": nk, "d": d, "heads": args.heads, "num_warps": warps,
                             "num_stages": args.num_stages,
                             "tiles": list(FlashBlocks().resolve(itemsize, d))})
                jobs.append({"ttir": path, "num_warps": warps, "num_stages": args.num_stages})
        for d in (int(x) for x in args.norm_dims.split(",")) if args.op == "norm" else ():
            from scaling.kernels.row_norm import ROW_WARPS, block_rows
            from scaling.kernels.tiles import tile_dim

            for gated in (False, True):
                for kernel, path in sorted(norm_ttir(d, gated, tempfile.mkdtemp(dir=work), args.dtype).items()):
                    rows.append({"kernel": kernel, "d": d, "gated": gated, "num_warps": ROW_WARPS,
                                 "num_stages": args.num_stages, "block_rows": block_rows(tile_dim(d), itemsize)})
                    jobs.append({"ttir": path, "num_warps": ROW_WARPS, "num_stages": args.num_stages})
        for dim in (int(d) for d in args.dims.split(",")) if args.op == "hstu" else ():
            settings = itertools.product(parse_tiles(args.tiles), (int(w) for w in args.warps.split(",")),
                                         (int(g) for g in args.head_groups.split(",")))
            for tiles, warps, group in settings:
                for bias in (False, True):
                    blocks, used, nw = resolved(tiles, warps, dim, group, args.heads, bias, itemsize)
                    where = tempfile.mkdtemp(dir=work)
                    ttir = hstu_ttir(dim, args.length, blocks, bias, where, args.heads, dtype=args.dtype,
                                     projected=args.projected)
                    for kernel, path in sorted(ttir.items()):
                        rows.append({"kernel": kernel, "d": dim, "bias": bias, "projected": args.projected,
                                     "forward_tile": list(used[:2]), "dkdv_tile": list(used[2:4]),
                                     "dq_tile": list(used[4:6]), "num_warps": nw,
                                     "num_stages": args.num_stages, "heads": args.heads,
                                     "heads_per_program": used.heads_per_program,
                                     "dkdv_heads_per_program": used.dkdv_heads_per_program,
                                     "defaults": tiles is None and not warps and not group})
                        jobs.append({"ttir": path, "num_warps": nw, "num_stages": args.num_stages})
        version, results = compile_ttir(jobs, args.triton_python)
    for row, result in zip(rows, results, strict=True):
        row.update(result)
    report = {"benchmark": "kernel_compile", "target": "sm_90a (H100), compiled offline", "triton": version,
              "length": args.length, "dtype": args.dtype,
              "matmul_precision": jax_precision(), "summary": summarize(rows), "rows": rows}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
