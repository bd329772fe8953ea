"""Compile the Mosaic GPU HSTU kernels (scaling/kernels/hstu_attention_mgpu.py: forward, dQ and
dK/dV) for an H100 on a machine without one, through to ptxas, and report what each became.

    python -m benchmarks.mosaic_compile [--dims 128,64] [--settings 64x2,64x2s,64x2f,64x3,128x2]
        [--length 4096] [--heads 4] [--tokens 32768] [--gpu h100|h200] [--out FILE]

A setting is BKxSTAGES (MosaicBlocks.block_k, num_stages), then optionally s for the consumers
without their ping-pong (pingpong=False) and f for one fused dK/dV kernel (split_dkdv=False; the
default splits it where d > 64). Needs JAX's CUDA plugin (`pip install
-e '.[cuda12]'`), not a GPU: the compile-only client of benchmarks/gpu_aot.py compiles a jitted
forward + backward, and Mosaic GPU lowers each kernel to PTX and runs ptxas for sm_90a as it
compiles. With MOSAIC_GPU_DUMP_PTX / _PTXAS (set here, into a temporary folder) it leaves the PTX
and ptxas's report, read back per kernel (one row per setting and kernel):

  registers, spill_store_bytes, spill_load_bytes   ptxas, per thread (a CTA is 3 warpgroups: the
                                                   kernel moves registers from the producer to
                                                   the consumers at run time, setmaxnreg)
  smem_bytes     the kernel's shared-memory scratch (Q, the K/V ring, P)
  wgmma          the PTX's wgmma.mma_async instructions by shape (m64nNk16)
  ptxas_notes    ptxas's informational lines that are not the usual summary (e.g. C7519: a
                 warpgroup.arrive it injected so that a wgmma can read registers)
  fits           compiled, no spill, shared memory within the GPU's 227 KiB per block
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

from benchmarks.gpu_aot import compile_only_devices, has_cuda_plugin
from benchmarks.gpu_targets import GPUS
from benchmarks.json_report import emit

SMEM_LIMIT = 227 * 1024


def parse_setting(text: str) -> tuple[int, int, bool, bool | None]:
    """'64x2' -> (block_k, num_stages, pingpong, split_dkdv): (64, 2, True, None); '64x2s' ->
    (64, 2, False, None); '64x2f' -> (64, 2, True, False). ValueError names what is wrong."""
    match = re.fullmatch(r"(\d+)x(\d+)(s?)(f?)", text.strip())
    if not match:
        raise ValueError(f"setting {text!r}: expected BKxSTAGES[s][f], e.g. 64x2, 64x2s or 64x2f")
    return int(match.group(1)), int(match.group(2)), not match.group(3), False if match.group(4) else None


# dK/dV is one kernel or two (MosaicBlocks.split_dkdv): a row for each that compiled
KERNELS = ("hstu_mgpu_fwd", "hstu_mgpu_dq", "hstu_mgpu_dkdv", "hstu_mgpu_dk", "hstu_mgpu_dv")


def read_dump(folder: str, kernel: str = "") -> dict:
    """What Mosaic GPU's dump folder says of one kernel (its files start with `kernel`)."""
    row: dict = {}
    ptxas = "\n".join(open(p).read() for p in sorted(glob.glob(os.path.join(folder, f"{kernel}*.ptxas"))))
    if m := re.search(r"Used (\d+) registers", ptxas):
        row["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas):
        row["spill_store_bytes"], row["spill_load_bytes"] = int(m.group(1)), int(m.group(2))
    row["ptxas_notes"] = [line.strip() for line in ptxas.splitlines()
                          if re.search(r"\(C\d+\)|warning", line) and "spill" not in line]
    resources = "\n".join(open(p).read() for p in glob.glob(os.path.join(folder, f"{kernel}*resources*")))
    if m := re.search(r"smem_scratch_bytes=(\d+)", resources):
        row["smem_bytes"] = int(m.group(1))
    ptx = "\n".join(open(p).read() for p in glob.glob(os.path.join(folder, f"{kernel}*.ptx")))
    shapes = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    row["wgmma"] = dict(sorted(shapes.items()))
    return row


def compile_row(dim: int, block_k: int, stages: int, pingpong: bool, split: bool | None, length: int, heads: int,
                tokens: int, devices) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from scaling.kernels.hstu_attention_mgpu import MosaicBlocks, mosaic_mha

    batch = max(1, tokens // length)
    base = {"d": dim, "block_k": block_k, "num_stages": stages, "pingpong": pingpong, "split_dkdv": split,
            "L": length, "heads": heads, "batch": batch}
    sharding = SingleDeviceSharding(devices[0])
    qkv = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MOSAIC_GPU_DUMP_TO"] = folder
        try:
            blocks = MosaicBlocks(block_k=block_k, num_stages=stages, pingpong=pingpong, split_dkdv=split)

            def forward_backward(q, k, v, n):
                out, pullback = jax.vjp(lambda *x: mosaic_mha(*x, n, norm=float(length), blocks=blocks,
                                                              interpret=False), q, k, v)
                return pullback(out)

            jax.jit(forward_backward).lower(qkv, qkv, qkv, lengths).compile()
        except Exception as err:  # noqa: BLE001 - a setting that does not compile is a row, not a crash
            return [{**base, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                     "fits": False}]
        rows = [{**base, "kernel": kernel, **read_dump(folder, kernel)} for kernel in KERNELS
                if glob.glob(os.path.join(folder, f"{kernel}_*.ptxas"))]
    for row in rows:
        row["fits"] = (row.get("spill_store_bytes", 1) == 0 and row.get("smem_bytes", SMEM_LIMIT + 1) <= SMEM_LIMIT
                       and bool(row.get("wgmma")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--settings", default="64x2,64x2s,64x2f,64x3,128x2", help="BKxSTAGES[s][f], comma-separated")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / L)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.settings.split(",")]
        dims = [int(d) for d in args.dims.split(",")]
    except ValueError as err:
        parser.error(str(err))
    if not has_cuda_plugin():
        print("mosaic_compile: JAX's CUDA plugin is not installed; pip install -e '.[cuda12]' (no GPU needed)",
              file=sys.stderr)
        return 2
    os.environ["MOSAIC_GPU_DUMP_PTX"] = os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    devices = compile_only_devices(GPUS[args.gpu], 1)
    rows = []
    for dim in dims:
        for block_k, stages, pingpong, split in settings:
            for row in compile_row(dim, block_k, stages, pingpong, split, args.length, args.heads, args.tokens,
                                   devices):
                rows.append(row)
                print({k: row.get(k) for k in ("kernel", "d", "block_k", "num_stages", "pingpong", "registers",
                                               "spill_store_bytes", "smem_bytes", "wgmma", "fits", "error")
                       if k in row}, file=sys.stderr)
    emit({"benchmark": "mosaic_compile", "gpu": args.gpu, "kernels": "hstu_attention_mgpu (no bias)",
          "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
