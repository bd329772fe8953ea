"""Sharding layouts on 8 simulated CPU devices: step time, memory per device, lookup traffic (JSON).

    python -m benchmarks.sharding [--suite steps,memory,lookups] [--steps 20] [--out FILE]

Suites:
  steps    train step time (median of timed steps, inputs already on device) and examples/s of a
           small Wukong, DLRM and HSTU under each layout (dp, fsdp, fsdp_tp, tp, and fsdp with
           row-wise embedding tables), with compile time and per-device parameter/state bytes.
           Simulated devices share this host's cores, so a layout's collectives cost memory copies,
           not network time: read the numbers as overheads relative to dp on the same host.
  memory   per-device memory of a DLRM whose tables (26 fields up to 1M ids, d = 64: 2.5M rows,
           0.6 GiB) do not fit one device's share (--device-mib, default 256 MiB) when replicated:
           the placement's parameter and train-state bytes and XLA's memory_analysis() of the
           AOT-compiled train step (nothing is allocated or run), per placement: replicated tables
           (dp, and fsdp whose dense parameters alone are split), row_wise, table_wise, and gspmd
           under fsdp (vocabulary-sharded tables left to GSPMD: the fsdp treatment of a table).
  lookups  per-device collective bytes of one forward + backward lookup per strategy and global
           batch (benchmarks/sharding_lookups.py: lookup_comm_bytes).
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 host devices must be requested before JAX starts
    _flag = "--xla_force_host_platform_device_count=8"
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from benchmarks.json_report import emit
import jax  # noqa: E402

from scaling.config import load_run_config  # noqa: E402
from scaling.sharding.plan import step_memory  # noqa: E402
from scaling.train.loop import dataset_of  # noqa: E402
from scaling.train.setup import prepare  # noqa: E402

SWEEPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps")
_SMALL = ["train.eval_batch_size=256", "logging.progress=false"]
# family -> (sweep, overrides, global batch)
MODELS = {
    "wukong": ("quickstart.yaml", ["model.size=s", "data.eval_examples=1024"], 512),
    "dlrm": ("quickstart.yaml", ["model.name=dlrm", "model.size=s", "data.eval_examples=1024"], 512),
    "hstu": ("hstu_synthetic.yaml", ["model.size=s", "data.num_users=1000", "data.num_items=2000"], 64),
}
# variant -> overrides (each on the 8-device mesh that exercises it)
VARIANTS = {
    "dp": ["sharding.layout=dp", "sharding.mesh.data=8"],
    "fsdp": ["sharding.layout=fsdp", "sharding.mesh.data=1", "sharding.mesh.fsdp=8"],
    "fsdp_tp": ["sharding.layout=fsdp_tp", "sharding.mesh.data=1", "sharding.mesh.fsdp=4", "sharding.mesh.tensor=2"],
    "tp": ["sharding.layout=tp", "sharding.mesh.data=4", "sharding.mesh.tensor=2"],
    "fsdp+row_wise": ["sharding.layout=fsdp", "sharding.mesh.data=1", "sharding.mesh.fsdp=8", "sharding.embedding=row_wise"],
}
BIG_DLRM = ["model.name=dlrm", "model.size=s", "model.embed_dim=64", "data.num_fields=26", "data.max_cardinality=1000000",
            "data.eval_examples=512", "train.batch_size=1024", "train.eval_batch_size=1024"]
PLACEMENTS = {
    "dp/replicated": ["sharding.layout=dp"],
    "fsdp/replicated": ["sharding.layout=fsdp"],
    "dp/row_wise": ["sharding.layout=dp", "sharding.embedding=row_wise"],
    "dp/table_wise": ["sharding.layout=dp", "sharding.embedding=table_wise"],
    "fsdp/gspmd": ["sharding.layout=fsdp", "sharding.embedding=gspmd"],
    "fsdp/row_wise": ["sharding.layout=fsdp", "sharding.embedding=row_wise"],
}


def _placement(summary: dict) -> dict:
    keys = ("layout", "mesh", "embedding", "param_bytes", "param_bytes_per_device", "replicated_param_share",
            "dense_replicated_share", "state_bytes_per_device")
    return {k: summary[k] for k in keys}


def step_times(steps: int) -> list[dict]:
    rows = []
    for family, (sweep, overrides, batch) in MODELS.items():
        for variant, extra in VARIANTS.items():
            cfg = load_run_config(os.path.join(SWEEPS, sweep), [*overrides, *_SMALL, f"train.batch_size={batch}", *extra])
            setup = prepare(cfg, dataset_of(cfg.data))
            p = setup.partitioner
            with p.activate():
                state = p.init(setup.init_state, setup.abstract)
                t0 = time.perf_counter()
                step = setup.compile_train_step()
                compile_s = time.perf_counter() - t0
                source = setup.task.train_iterator(batch, cfg.seed)
                batches = [p.shard_batch(next(source)) for _ in range(steps + 2)]
                times = []
                for i, b in enumerate(batches):
                    t0 = time.perf_counter()
                    state, metrics = step(state, b)
                    jax.block_until_ready(metrics["loss"])
                    if i >= 2:  # two warm-up steps
                        times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            rows.append({"family": family, "size": cfg.model.size, "variant": variant, "batch": batch,
                         "compile_s": round(compile_s, 2), "step_ms": round(ms, 2),
                         "examples_per_s": round(batch / (ms / 1e3), 1), **_placement(p.summary(setup.abstract)),
                         "compiled_step": step_memory(step)})
            print(f"steps {family}:{cfg.model.size} {variant}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    return rows


def memory(device_mib: float) -> list[dict]:
    rows = []
    for name, extra in PLACEMENTS.items():
        cfg = load_run_config(os.path.join(SWEEPS, "quickstart.yaml"), [*BIG_DLRM, *_SMALL[1:], *extra])
        setup = prepare(cfg, dataset_of(cfg.data))
        with setup.partitioner.activate():
            t0 = time.perf_counter()
            compiled = setup.compile_train_step()
            compile_s = time.perf_counter() - t0
        mem = step_memory(compiled)
        rows.append({"placement": name, "compile_s": round(compile_s, 2),
                     **_placement(setup.partitioner.summary(setup.abstract)), "compiled_step": mem,
                     "fits_device": bool(mem) and mem["total"] <= device_mib * 2**20})
        print(f"memory {name}: {mem.get('total', 0) / 2**20:.0f} MiB per device", file=sys.stderr, flush=True)
    return rows


def lookups() -> dict:
    from benchmarks.sharding_lookups import lookup_comm_bytes

    return {"fields": 8, "cardinality": 100_000, "dim": 64, "mesh": [8, 1, 1],
            "results": [lookup_comm_bytes(s, b) for s in ("row_wise", "table_wise", "gspmd") for b in (1024, 4096, 16384)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="steps,memory,lookups", help="comma-separated: steps, memory, lookups")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per (model, layout)")
    parser.add_argument("--device-mib", type=float, default=256.0, help="memory suite: one device's notional share")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    suites = args.suite.split(",")
    unknown = set(suites) - {"steps", "memory", "lookups"}
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}; expected steps, memory, lookups")
    report = {"devices": jax.device_count(), "backend": jax.default_backend(), "host_cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    if "steps" in suites:
        report["steps"] = step_times(args.steps)
    if "memory" in suites:
        report["memory"] = {"device_mib": args.device_mib, "model": " ".join(BIG_DLRM), "results": memory(args.device_mib)}
    if "lookups" in suites:
        report["lookups"] = lookups()
    emit(report, args.out, indent=1)
    return report


if __name__ == "__main__":
    main()
