"""Collective bytes of one embedding lookup (forward + backward) per strategy, read from the HLO.

    python -m benchmarks.sharding_lookups [--batches 256,1024,4096,16384] [--strategies row_wise,table_wise,gspmd]
                                          [--fields 8] [--cardinality 100000] [--dim 64] [--mesh 8,1,1]
                                          [--shards-batch 4096] [--out FILE]

For each strategy and global batch it lowers and compiles, on 8 simulated CPU devices (set here,
before JAX is imported), `grad(0.5 * sum(lookup_fields(table, sparse)^2))` with the table in the
strategy's stored layout and sharding and the ids split over the batch axes, then sums the
collectives of the compiled (SPMD-partitioned, so per-device) HLO by kind. Nothing runs and
nothing is allocated: the arguments are ShapeDtypeStructs.

Bytes convention: for each collective op, the bytes of its result buffer(s) on one device (an
all-to-all's result is what the device sends and keeps, an all-gather's the gathered array, an
all-reduce's the reduced one). Expectation: all-to-all bytes grow with the local batch; GSPMD's
gather / all-reduce with the global one (the brief in shared/reference/jax_codebases.md, sec. 4).
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # multi-device CPU must be requested before JAX starts
    _flag = "--xla_force_host_platform_device_count=8"
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import argparse  # noqa: E402
import re  # noqa: E402
from collections import defaultdict  # noqa: E402

from benchmarks.json_report import emit
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from scaling.config import MeshConfig  # noqa: E402
from scaling.sharding.embedding import EmbeddingPlacement, embedding_placement, lookup_fields, new_layout  # noqa: E402
from scaling.sharding.mesh import BATCH_AXES, make_mesh  # noqa: E402

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%name = <shape or (tuple of shapes)> <op>(` ; async pairs are counted at their -start
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Compiled HLO text -> ({op kind: bytes of its results per device}, {op kind: op count})."""
    sizes: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        shapes = _SHAPE.findall(match.group(1))
        if match.group(3) and len(shapes) > 1:  # an async start's tuple: (operands..., results...)
            shapes = shapes[len(shapes) // 2:]
        kind = match.group(2)
        counts[kind] += 1
        for dtype, dims in shapes:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            sizes[kind] += n * _DTYPE_BYTES[dtype]
    return {k: sizes.get(k, 0) for k in COLLECTIVES}, {k: counts.get(k, 0) for k in COLLECTIVES}


def lookup_comm_bytes(strategy: str, global_batch: int, *, fields: int = 8, cardinality: int = 100_000,
                      dim: int = 64, mesh_shape: tuple[int, int, int] = (8, 1, 1), capacity: float = 2.0) -> dict:
    """Per-device collective bytes of a forward + backward lookup of `fields` single-hot fields
    (each `cardinality` rows of `dim` floats) for `global_batch` examples under `strategy`, on a
    (data, fsdp, tensor) = `mesh_shape` mesh over the first prod(mesh_shape) devices."""
    cfg = MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = make_mesh(cfg, jax.devices()[: mesh_shape[0] * mesh_shape[1] * mesh_shape[2]])
    placement = EmbeddingPlacement(strategy, mesh, capacity)
    blocks = (cardinality,) * fields
    layout = new_layout(sum(blocks), blocks=blocks, placement=placement)
    table_sharding = NamedSharding(mesh, layout.spec)
    table = jax.ShapeDtypeStruct((layout.stored_rows, dim), jnp.float32, sharding=table_sharding)
    ids = jax.ShapeDtypeStruct((global_batch, fields), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES)))

    def loss(t, sparse):
        return 0.5 * jnp.sum(jnp.square(lookup_fields(t, sparse, layout=layout)))

    with jax.set_mesh(mesh), embedding_placement(placement):
        step = jax.jit(jax.grad(loss), out_shardings=table_sharding)
        compiled = step.lower(table, ids).compile()
    sizes, counts = collective_bytes(compiled.as_text())
    shards = placement.shards
    return {"strategy": strategy, "global_batch": global_batch, "local_batch": global_batch // shards,
            "stored_rows": layout.stored_rows, "bytes": sizes, "ops": counts, "total_bytes": sum(sizes.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,1024,4096,16384")
    parser.add_argument("--strategies", default="row_wise,table_wise,gspmd")
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--cardinality", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--capacity", type=float, default=2.0)
    parser.add_argument("--mesh", default="8,1,1", help="data,fsdp,tensor")
    parser.add_argument("--shards-batch", type=int, default=4096,
                        help="also: this global batch on meshes of 2, 4 and 8 devices (data axis); 0: skip")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    sizes = dict(fields=args.fields, cardinality=args.cardinality, dim=args.dim, capacity=args.capacity)
    strategies = args.strategies.split(",")
    results = [lookup_comm_bytes(s, int(b), mesh_shape=mesh_shape, **sizes)
               for s in strategies for b in args.batches.split(",")]
    # Fixed global batch, more batch devices: per-device all-to-all bytes follow the local batch
    # (fall), a global gather/all-reduce does not.
    by_shards = [dict(lookup_comm_bytes(s, args.shards_batch, mesh_shape=(k, 1, 1), **sizes), shards=k)
                 for s in strategies for k in (2, 4, 8)] if args.shards_batch else []
    report = {"devices": jax.device_count(), "backend": jax.default_backend(), "mesh": mesh_shape, **sizes,
              "bytes_convention": "per device, result buffers of each collective in the compiled HLO",
              "results": results, "by_shards": by_shards}
    emit(report, args.out, indent=1)
    return report


if __name__ == "__main__":
    main()
