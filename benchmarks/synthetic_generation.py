"""Throughput of the synthetic CTR generator on one CPU core; prints one JSON object.

    python benchmarks/synthetic_generation.py [--batch-size 4096] [--examples 400000] [key=value ...]

Measures (1) direct vectorized generation of train batches (`SyntheticCTR.batch`) pinned to one
core with single-threaded BLAS, and (2) the grain iterator with prefetch (what training sees).
Target: >= 200k examples/s for direct generation on one core. Extra `key=value` arguments
override the data config (e.g. num_fields=39).
"""

from __future__ import annotations

import os

# One core: single-threaded BLAS/OpenMP must be set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scaling.config_schema import build  # noqa: E402
from scaling.data.synthetic_ctr import SyntheticCTRConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--examples", type=int, default=400_000, help="examples per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many measurements")
    parser.add_argument("overrides", nargs="*", help="data config overrides, key=value")
    args = parser.parse_args()

    pinned = False
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            pinned = True
        except OSError:
            pass

    data = {"name": "synthetic_ctr"}
    for item in args.overrides:
        key, _, value = item.partition("=")
        data[key] = yaml.safe_load(value)
    config = build(SyntheticCTRConfig, data)

    t0 = time.perf_counter()
    dataset = config.build()
    build_s = time.perf_counter() - t0

    B = args.batch_size
    n_batches = max(1, args.examples // B)
    dataset.batch(0, B)  # warm up
    direct = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        for j in range(n_batches):
            dataset.batch(r * n_batches + j, B)
        direct.append(n_batches * B / (time.perf_counter() - t0))

    it = dataset.train_iterator(B, prefetch=2)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    iterator_rate = n_batches * B / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    dataset.eval_arrays()
    eval_s = time.perf_counter() - t0

    result = {
        "benchmark": "synthetic_generation",
        "examples_per_s_one_core": round(max(direct), 1),
        "examples_per_s_runs": [round(x, 1) for x in direct],
        "iterator_examples_per_s": round(iterator_rate, 1),
        "target_examples_per_s": 200_000,
        "meets_target": max(direct) >= 200_000,
        "batch_size": B,
        "examples_per_run": n_batches * B,
        "build_s": round(build_s, 3),
        "eval_set_s": round(eval_s, 3),
        "eval_examples": config.eval_examples,
        "num_fields": config.num_fields,
        "num_dense": config.num_dense,
        "total_vocab": dataset.spec.total_vocab,
        "pinned_to_one_core": pinned,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
