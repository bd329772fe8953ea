"""Running a Pallas kernel on a device mesh: `shard_map` over the batch (and head) axes.

GSPMD cannot partition a `pl.pallas_call` (on GPU it is an opaque Triton custom call), so when a
mesh with more than one device is active (`jax.set_mesh`, as the partitioner's `activate()` does)
the kernel path runs under `jax.shard_map` and every device runs the kernel on its own shard:

  - "batch" dimensions are split over the mesh's batch axes (data, then fsdp: scaling/sharding/
    mesh.py's BATCH_AXES), each taken if it is > 1 and keeps the split dividing the batch;
  - "heads" dimensions are split over "tensor" when the active layout maps `heads` to tensor
    (fsdp_tp, tp) and tensor divides the head count; otherwise heads stay whole;
  - every other argument (bias tables, Y, the LayerNorm affine) is replicated, and every output is
    split the way its named dimensions say.

The per-shard problems are independent (attention is per sequence and head, the FM block per
example), so no collective runs in the forward. The kernels' custom_vjp lives inside the map:
replicated arguments are cast to vary over the split axes (`lax.pcast(..., to="varying")`) before
the kernel sees them, so their cotangents are per-device partial sums and the transpose of that
cast is the psum over the split axes that makes them whole gradients. `check_vma` is on for
compiled kernels (GPU): the kernels declare their outputs as varying like their inputs
(`out_struct`). It is off for interpreted kernels (CPU tests, `impl=pallas` off GPU) because JAX
0.11's Pallas HLO interpreter cannot run a kernel on varying values ("Scan carry input and output
got mismatched varying manual axes" from its grid loop); shard_map's check_vma=False transpose
psums the replicated inputs' cotangents itself, so the gradients are the same.

No mesh, a 1-device mesh, or a mesh whose axes are all already manual (a caller's own shard_map):
the kernel is called as is. Axes that are already manual are never mapped again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, ManualAxisType, PartitionSpec as P

__all__ = ["out_struct", "mapped_axes", "splits_heads", "shard_kernel"]

BATCH_AXES = ("data", "fsdp")  # scaling.sharding.mesh.BATCH_AXES (kept import-free of the sharding package)
HEAD_AXES = ("tensor",)

Names = tuple[str | None, ...]  # logical name per dimension ("batch", "heads" or None)


def out_struct(shape: Sequence[int], dtype: Any, *like: jax.Array | None) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape varying over every manual mesh axis one of the kernel's inputs `like`
    varies over (what `check_vma=True` requires inside shard_map; empty, and ignored, outside one)."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like if x is not None))
    return jax.ShapeDtypeStruct(tuple(shape), dtype, manual_axis_type=ManualAxisType(varying=varying))


def vary_like(out: jax.Array, *like: jax.Array | None) -> jax.Array:
    """out cast to vary over every manual mesh axis one of `like` varies over (a kernel whose
    output type carries no varying axes, as Mosaic GPU's `plgpu.kernel` in JAX 0.11; no-op outside
    shard_map)."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like if x is not None))
    missing = tuple(sorted(varying - jax.typeof(out).manual_axis_type.varying))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _free_axes(mesh) -> dict[str, int]:
    """{axis: size} of the mesh's axes that are not manual yet (size > 1 only)."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return {a: int(s) for a, s in mesh.shape.items() if s > 1 and types[a] != AxisType.Manual}


def _heads_split_by_layout() -> bool:
    from scaling.sharding.rules import active_rules  # no import cycle at module load

    rules = active_rules()
    axes = rules.axes_for("heads") if rules is not None else None
    return bool(axes) and "tensor" in axes


def mapped_axes(sizes: dict[str, int], mesh=None) -> dict[str, tuple[str, ...]]:
    """{logical name: mesh axes} for dimension sizes {"batch": B, "heads": h} on `mesh` (default:
    the active abstract mesh); empty when the kernel needs no shard_map."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return {}
    free = _free_axes(mesh)
    if not free:
        return {}
    out: dict[str, tuple[str, ...]] = {"batch": ()}
    split = 1
    for axis in BATCH_AXES:
        if axis in free and sizes.get("batch", 0) % (split * free[axis]) == 0:
            out["batch"] += (axis,)
            split *= free[axis]
    if "heads" in sizes and _heads_split_by_layout():
        out["heads"] = tuple(a for a in HEAD_AXES if a in free and sizes["heads"] % free[a] == 0)
    return out


def splits_heads(heads: int, mesh=None) -> bool:
    """Whether a kernel over `heads` heads would run with its heads split over devices (the active
    layout maps heads to a mesh axis that divides them)."""
    return bool(mapped_axes({"heads": heads}, mesh).get("heads"))


def _spec(names: Names | None, axes: dict[str, tuple[str, ...]]) -> P:
    if not names:
        return P()
    entries = []
    for name in names:
        got = axes.get(name, ()) if name is not None else ()
        entries.append(None if not got else got[0] if len(got) == 1 else got)
    return P(*entries)


def _sizes(args: Sequence[Any], arg_names: Sequence[Names | None]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for arg, names in zip(args, arg_names, strict=True):
        if arg is None or not names:
            continue
        for size, name in zip(arg.shape, names):
            if name is None:
                continue
            if sizes.setdefault(name, int(size)) != int(size):
                raise ValueError(f"kernel arguments disagree on the size of their {name!r} dimension: "
                                 f"{sizes[name]} vs {size}")
    return sizes


def shard_kernel(fn: Callable[..., Any], args: Sequence[Any], arg_names: Sequence[Names | None],
                 out_names: Names, *, check_vma: bool = True) -> Any:
    """fn(*args) with each device running fn on its shard when a multi-device mesh is active
    (module docstring). arg_names: per argument, its dimensions' logical names (None or () for a
    replicated argument; None arguments pass through); out_names: the single output's.

    Differentiable like fn: its custom_vjp runs inside the map, the backward kernels per device.
    check_vma=False (interpreted kernels) skips the casts: shard_map's transpose then psums each
    input's cotangent over the mesh axes its spec leaves out (after dividing the output's cotangent
    by the output's replication), which gives the same gradients."""
    axes = mapped_axes(_sizes(args, arg_names))
    if not axes:
        return fn(*args)
    used = tuple(a for names in axes.values() for a in names)
    present = tuple(i for i, a in enumerate(args) if a is not None)

    def body(*local):
        full = list(args)
        for i, value in zip(present, local):
            if check_vma and used:
                missing = tuple(a for a in used if a not in jax.typeof(value).manual_axis_type.varying)
                value = jax.lax.pcast(value, missing, to="varying") if missing else value
            full[i] = value
        return fn(*full)

    mesh = jax.sharding.get_abstract_mesh()
    free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
    in_specs = tuple(_spec(arg_names[i], axes) for i in present)
    mapped = jax.shard_map(body, in_specs=in_specs, out_specs=_spec(out_names, axes), axis_names=free,
                           check_vma=check_vma)
    return mapped(*(args[i] for i in present))
