"""Where the HSTU attention step spends its device time, kernel by kernel (for a GPU session).

    python -m benchmarks.kernel_profile [--length 4096] [--dim 128] [--heads 4] [--tokens 32768]
        [--no-bias] [--impl pallas|mosaic] [--heads-per-program 0] [--iters 5] [--smoke] [--out FILE]

Runs the forward + backward of `impl=pallas` HSTU attention (bf16, the relative bias unless
--no-bias; B = tokens / L full-length sequences) under `jax.profiler.trace`, reads the Perfetto
trace JAX writes, and sums the device time of every kernel over `--iters` calls: the Pallas
kernels (hstu_attention_fwd, _dkdv, _dq, _dbias) and XLA's own (padding, the bias tables'
gradient reduction, casts). Each Pallas kernel's achieved TFLOP/s is put beside a bf16 matmul
measured in the same run, from the matmul FLOPs it does per attended (query, key) pair and head,
with P = B h L (L + 1) / 2 causal pairs and d = the head dim:

    forward  4 d P  (q k^T, p v)          dK/dV  8 d P  (k q^T, v dO^T, dS^T q, p^T dO)
    dQ       6 d P  (q k^T, dO v^T, dS k) dbias  4 d P  (k q^T, v dO^T; only when G < h)

So the report says which kernel takes the time and how far each is from the tensor cores' rate;
the elementwise share (SiLU, mask, bias: benchmarks/kernel_ir.py) is what a low ratio points at.
`--impl mosaic` profiles the Mosaic GPU kernels instead (scaling/kernels/hstu_attention_mgpu.py,
no bias): hstu_mgpu_fwd 4 d P, _dq 6 d P, and dK/dV as one kernel (_dkdv, 8 d P) or two (_dv
4 d P: k q^T, p^T dO; _dk 6 d P: k q^T, v dO^T, dS^T q).
Events are taken from the device's stream lines (on a GPU, "/device:GPU:0"'s "Stream" threads);
on a CPU (--smoke, interpret mode) there is no device line and the host's events are summed
instead, which checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import tempfile

import jax

from benchmarks.json_report import emit
from benchmarks.kernels import hstu_functions, hstu_inputs, matmul_tflops
from scaling.kernels.hstu_attention import Blocks
from scaling.kernels.hstu_attention_mgpu import MosaicBlocks

FLOPS_PER_PAIR = {"hstu_attention_fwd": 4, "hstu_attention_dkdv": 8, "hstu_attention_dq": 6, "hstu_attention_dbias": 4,
                  "hstu_mgpu_fwd": 4, "hstu_mgpu_dq": 6, "hstu_mgpu_dkdv": 8, "hstu_mgpu_dv": 4, "hstu_mgpu_dk": 6}
KERNELS = tuple(FLOPS_PER_PAIR)


def device_times(trace_dir: str) -> tuple[dict[str, float], str]:
    """({event name: summed microseconds}, which line was read) from the Perfetto trace under
    trace_dir: the GPU stream threads when there are any, else every complete event on the host."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    gpu = {pid for pid, name in processes.items() if "GPU" in name}
    streams = {key for key, name in threads.items() if key[0] in gpu and name.lower().startswith("stream")}
    if streams:
        source, keep = "GPU streams", lambda e: (e["pid"], e.get("tid")) in streams
    elif gpu:  # no stream lines: every line of the device (derived lines may repeat a kernel)
        source, keep = "GPU, every line (no stream line found)", lambda e: e["pid"] in gpu
    else:
        source, keep = "host (no device line: interpret mode)", lambda e: True
    totals: collections.Counter = collections.Counter()
    for e in events:
        # "$file.py:line" events are Python frames on the host
        if e.get("ph") == "X" and not e["name"].startswith("$") and keep(e):
            totals[e["name"]] += e.get("dur", 0.0)
    return dict(totals), source


def kernel_of(event: str) -> str | None:
    """The Pallas kernel an event name belongs to (Triton may decorate the name), or None."""
    for name in sorted(KERNELS, key=len, reverse=True):
        if name in event:
            return name
    return None


def profile(length: int, dim: int, heads: int, tokens: int, bias: bool, blocks: Blocks, iters: int,
            matmul_n: int, impl: str = "pallas") -> dict:
    """The report for one shape (module docstring); impl mosaic: the Mosaic GPU kernels, no bias."""
    batch = max(1, tokens // length)
    args, (lengths, ts, cot) = hstu_inputs(batch, length, heads, dim)
    bias = bias and impl == "pallas"
    if not bias:
        args = (*args[:3], None, None)
    _, both = hstu_functions(impl, blocks, length, lengths, ts if bias else None, cot)
    for _ in range(2):  # compile (and let any lazily compiled helper compile) outside the trace
        jax.block_until_ready(both(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(iters):
                jax.block_until_ready(both(*args))
        totals, source = device_times(trace_dir)
    peak = matmul_tflops(matmul_n, 5)
    pairs = batch * heads * length * (length + 1) / 2
    rows, other = [], collections.Counter()
    for event, micros in totals.items():
        kernel = kernel_of(event)
        if kernel is None:
            other[event] += micros / iters
            continue
        ms = micros / iters / 1e3
        tflops = FLOPS_PER_PAIR[kernel] * dim * pairs / ms / 1e9
        rows.append({"kernel": kernel, "event": event, "ms_per_call": ms, "matmul_tflops": tflops,
                     "fraction_of_matmul_peak": tflops / peak})
    kernel_ms = sum(r["ms_per_call"] for r in rows)
    other_ms = sum(other.values()) / 1e3
    for r in rows:
        r["share_of_step"] = r["ms_per_call"] / (kernel_ms + other_ms)
    return {
        "benchmark": "kernel_profile", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "events_from": source, "impl": impl, "dtype": "bfloat16", "L": length, "d": dim, "heads": heads,
        "batch": batch, "bias": bias, "iters": iters,
        "tiles": (blocks.resolve(heads, dim, bias)._asdict() if impl == "pallas"
                  else dataclasses.asdict(MosaicBlocks())),
        "matmul_bf16_tflops": peak, "kernels": sorted(rows, key=lambda r: -r["ms_per_call"]),
        "pallas_ms_per_call": kernel_ms, "other_ms_per_call": other_ms,
        "other_top": [{"event": e, "ms_per_call": us / 1e3} for e, us in other.most_common(8)],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128, help="head dim")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / L)")
    parser.add_argument("--no-bias", action="store_true", help="without the relative bias")
    parser.add_argument("--impl", choices=("pallas", "mosaic"), default="pallas",
                        help="the Triton kernels, or the Mosaic GPU ones (no bias)")
    parser.add_argument("--heads-per-program", type=int, default=0, help="0: the library's default")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: the kernels in interpret mode)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    blocks = Blocks(heads_per_program=args.heads_per_program or None)
    if args.smoke:
        small = Blocks.uniform(16, heads_per_program=blocks.heads_per_program)
        if args.impl == "mosaic":  # head dims in multiples of 64; one sequence of one head (interpreted)
            report = profile(64, 64, 1, 64, False, small, 2, 256, "mosaic")
        else:
            report = profile(64, 16, 2, 128, not args.no_bias, small, 2, 256)
    else:
        report = profile(args.length, args.dim, args.heads, args.tokens, not args.no_bias, blocks, args.iters, 8192,
                         args.impl)
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
