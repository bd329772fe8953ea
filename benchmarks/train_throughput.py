"""Train throughput: examples/s and achieved GFLOP/s per model size, beside the CPU/GPU matmul roofline.

    python -m benchmarks.train_throughput [--suite ctr|sequences|ranking] [--steps N] [--batch-size B] [--out FILE]

Suites: `ctr` trains Wukong and DLRM on the quickstart world (an example is one impression);
`sequences` trains HSTU and SASRec on the synthetic sequence view of sweeps/hstu_synthetic.yaml
(an example is one user sequence of max_len positions, with 128 negatives shared per sequence);
`ranking` trains OneTrans, HSTU-as-ranker and DIN on the ranking view of sweeps/onetrans_synthetic.yaml
(an example is one impression with two 32-event behaviour sequences).
Achieved GFLOP/s = 3 x forward FLOPs/example x examples/s (the DESIGN's train-FLOP convention).
The roofline is a dense float32 matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks.json_report import emit
import jax
import jax.numpy as jnp

from scaling.config import load_run_config
from scaling.train.loop import train

SWEEPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps")
# suite -> (config, default models, default batch size, steps, overrides that keep the evaluation small)
SUITES = {
    "ctr": ("quickstart.yaml", "wukong:xs,wukong:m,wukong:xl,dlrm:m", 512, 300, ["data.eval_examples=4096"]),
    "sequences": ("hstu_synthetic.yaml", "hstu:s,hstu:l,sasrec:s,sasrec:l", 128, 100, ["data.eval_users=256"]),
    "ranking": ("onetrans_synthetic.yaml", "onetrans:s,onetrans:l,hstu_ranker:s,din:s", 256, 100,
                ["data.eval_examples=2048"]),
}


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 n x n matmul throughput (GFLOP/s): the roofline the models are compared with."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="ctr")
    parser.add_argument("--steps", type=int, default=None, help="train steps per model (default per suite)")
    parser.add_argument("--batch-size", type=int, default=None, help="default per suite: 512 ctr, 128 sequences, 256 ranking")
    parser.add_argument("--models", default="", help="family:size,... (default per suite)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    config_name, models, batch_size, steps, extra = SUITES[args.suite]
    args.steps = args.steps or steps
    args.batch_size = args.batch_size or batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in (args.models or models).split(","):
            family, size = item.split(":")
            config = load_run_config(os.path.join(SWEEPS, config_name), [
                f"model.name={family}", f"model.size={size}", f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}", "train.eval_every=0", "train.checkpoint_every=0",
                f"train.log_every={max(args.steps // 4, 1)}", *extra,
                "logging.progress=false", "logging.wandb.mode=disabled", f"train.output_dir={tmp}",
            ])
            record = train(config)
            rows.append({
                "model": family, "size": size, "status": record.status,
                "params_dense": record.params_dense, "params_embedding": record.params_embedding,
                "mflops_per_example": record.flops_per_example_analytic / 1e6,
                "examples_per_s": record.examples_per_s,
                "achieved_train_gflops_per_s": 3 * record.flops_per_example_analytic * record.examples_per_s / 1e9,
            })
    roof = matmul_gflops()
    for row in rows:
        row["fraction_of_matmul_roofline"] = row["achieved_train_gflops_per_s"] / roof
    out = {
        "benchmark": "train_throughput", "suite": args.suite, "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "batch_size": args.batch_size, "steps": args.steps,
        "matmul_gflops_per_s": roof, "models": rows,
    }
    emit(out, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
