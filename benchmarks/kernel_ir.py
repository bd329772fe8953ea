"""Work per score element of the HSTU kernels, read from their Triton IR (no GPU needed).

    python -m benchmarks.kernel_ir [--length 512] [--dim 128] [--block 64] [--heads-per-program 1] [--out FILE]

Lowers value_and_grad of the `auto` HSTU attention (bf16, block x block tiles) for an abstract
H100 (benchmarks/triton_ir.py: the Pallas -> Triton-IR step runs on any machine), with and
without the relative bias, and counts in each kernel's loop bodies (`scf.for`) the operations on
[block, block] tiles other than the matmuls, loads and layout ops (splat, broadcast, expand_dims, make_range, addptr):
the per-element work the CUDA cores do beside the tensor cores. Reported per loop, in program
order, with the costly kinds broken out: IEEE divisions (arith.divf, ~10 instructions each),
libdevice calls (tt.extern_elementwise: expf, logf, floorf, ...), hardware approximations
(tt.elementwise_inline_asm: tanh.approx, lg2.approx), selects and integer compares (masking).
With --heads-per-program G (of 2 heads, G = 1 or 2) one program computes G heads and the counts
are for all G: the bias's share is paid once, the rest G times. A count of IR operations is a
proxy for instructions, not a timing: the GPU decides the rest.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile

from benchmarks.json_report import emit
from benchmarks.triton_ir import hstu_ttir

_SKIPPED = {"tt.dot", "tt.load", "tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.make_range"}


def loop_bodies(module: str) -> list[list[str]]:
    """The lines of each top-level `scf.for` region of one Triton module, in order."""
    lines, out, i = module.splitlines(), [], 0
    while i < len(lines):
        if "scf.for" in lines[i] and "{" in lines[i]:
            depth, body = 0, []
            for j in range(i, len(lines)):
                depth += lines[j].count("{") - lines[j].count("}")
                body.append(lines[j])
                if depth == 0:
                    break
            out.append(body[1:])
            i = j
        i += 1
    return out


def tile_ops(body: list[str], block: int) -> dict[str, int]:
    """Operation counts on [block, block] tiles in a loop body (see the module docstring)."""
    tile = f"tensor<{block}x{block}x"
    ops: collections.Counter = collections.Counter()
    for line in body:
        match = re.search(r"=\s+\"?([a-z_]+\.[a-z_]+)", line)
        if match and tile in line and match.group(1) not in _SKIPPED:
            ops[match.group(1)] += 1
    return {"tile_ops": sum(ops.values()), "ieee_div": ops["arith.divf"], "libdevice": ops["tt.extern_elementwise"],
            "hw_approx": ops["tt.elementwise_inline_asm"], "select": ops["arith.select"], "int_compare": ops["arith.cmpi"]}


def measure(length: int, dim: int, block: int, bias: bool, group: int = 1) -> dict[str, list[dict[str, int]]]:
    """{kernel name: per loop body counts} of the HSTU kernels at block x block tiles, G = group
    heads per program (of 2)."""
    from scaling.kernels.hstu_attention import Blocks

    with tempfile.TemporaryDirectory() as directory:
        paths = hstu_ttir(dim, length, Blocks.uniform(block, heads_per_program=group), bias, directory)
        out = {}
        for name, path in sorted(paths.items()):
            with open(path) as f:
                loops = [tile_ops(body, block) for body in loop_bodies(f.read())]
            if loops:
                out[name] = loops
        return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--heads-per-program", type=int, default=1, choices=(1, 2))
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    group = args.heads_per_program
    report = {"benchmark": "kernel_ir", "dtype": "bfloat16", "length": args.length, "dim": args.dim,
              "block": args.block, "heads_per_program": group, "target": "abstract H100 (cross-lowered, not compiled)",
              "count": "ops on [block, block] tiles per loop iteration (all the program's heads), matmuls/loads/layout "
                       "ops excluded",
              "no_bias": measure(args.length, args.dim, args.block, False, group),
              "relative_bias": measure(args.length, args.dim, args.block, True, group)}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
