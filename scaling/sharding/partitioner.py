"""The partitioner: where every array of a run lives, and the jitted functions that keep it there.

    p = Partitioner.from_config(config.sharding)            # mesh + layout rules (+ embedding placement)
    with p.activate():                                       # jax.set_mesh + the rules `constrain` reads
        abstract = jax.eval_shape(init_fn)                   # TrainState of ShapeDtypeStructs, no memory
        state = p.init(init_fn, abstract)                    # jitted, created sharded (never whole on one device)
        step = p.compile_train_step(train_step, abstract, abstract_batch)   # AOT, state donated
        state, metrics = step(state, p.shard_batch(host_batch))

Shardings come from the layout (scaling.sharding.rules) and the logical axis names every parameter
carries (scaling.sharding.annotate):
  - dense parameters: their logical axes resolved by the rules (largest dimension first);
  - embedding tables: the `sharding.embedding` placement (scaling.sharding.embedding), which the
    table records in its metadata when it is made: its lookup decides where rows must be, so the
    layout's rules apply only to a table without that metadata;
  - optimizer leaves: the spec of the parameter they mirror, found by tree path (the longest
    suffix of the leaf's path that is a parameter path); a mirror of another shape and the same
    rank (row-wise Adagrad's [rows, 1]) keeps the dimensions whose size matches; anything else
    (counts, scalars, the learning-rate peak) is replicated;
  - the step counter, the dropout keys: replicated.

Batches are split over the batch axes (data x fsdp). Inputs are assembled with
`jax.make_array_from_process_local_data` from the rows each process's devices hold
(`local_rows`, read off the batch sharding): a training process loads only those rows
(`shard_local_batch`), an evaluation chunk held whole by every process is cut to them
(`shard_batch`). One code path serves one process or many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaling.config import ShardingConfig
from scaling.config_schema import ConfigError
from scaling.models.embedding import EmbeddingTable
from scaling.sharding.annotate import logical_axes
from scaling.sharding.embedding import (EmbeddingPlacement, TableLayout, embedding_placement, table_layout,
                                       table_partition_spec)
from scaling.sharding.mesh import batch_sharding, make_mesh
from scaling.sharding.rules import Resolved, Rules, load_layout, resolve, shards, use_rules

PARAM_GROUPS = ("dense", "embed")  # TrainState fields holding parameters (nnx.State)
OPTIMIZER_GROUPS = {"opt_dense": "dense", "opt_embed": "embed"}


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
    """One parameter's placement. bytes: the whole array; bytes_per_device: the shard each device holds."""

    path: str  # 'dense/layers/0/kernel'
    shape: tuple[int, ...]
    dtype: str
    logical: tuple[str | None, ...]
    spec: P
    bytes: int
    bytes_per_device: int
    fallbacks: tuple[str, ...]

    @property
    def group(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def replicated(self) -> bool:
        return all(e is None for e in self.spec)


def leaf_path(keypath) -> tuple[str, ...]:
    """A jax key path -> its keys as strings, without the Variable's trailing `.value`."""
    out = []
    for k in keypath:
        out.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    if out and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and out[-1] == "value":
        out.pop()
    return tuple(out)


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32 words
    return np.dtype(dtype).itemsize


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class Partitioner:
    """Mesh + layout rules + embedding placement -> shardings, sharded init, compiled steps."""

    def __init__(self, mesh: Mesh, rules: Rules, embedding: str = "replicated", capacity: float = 2.0):
        self.mesh = mesh
        self.rules = rules
        self.embedding = embedding
        self.placement = EmbeddingPlacement(embedding, mesh, capacity)
        self.mesh_sizes = {k: int(v) for k, v in mesh.shape.items()}

    @classmethod
    def from_config(cls, sharding: ShardingConfig, devices: list | None = None) -> Partitioner:
        return cls(make_mesh(sharding.mesh, devices), load_layout(sharding.layout, sharding.rules), sharding.embedding,
                   sharding.embedding_capacity)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """While tracing and running: the mesh (jax.set_mesh), the layout's rules (for `constrain`)
        and the embedding placement (tables are laid out at init and exchanged in lookups by it)."""
        with jax.set_mesh(self.mesh), use_rules(self.rules), embedding_placement(self.placement):
            yield

    # -- shardings ----------------------------------------------------------------------------
    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def _param_resolved(self, group: str, path: tuple[str, ...], variable: nnx.Variable) -> Resolved:
        name = "/".join((group, *path))
        shape = tuple(variable.shape)
        table_spec = table_partition_spec(variable) if isinstance(variable, EmbeddingTable) else None
        if table_spec is not None:  # its placement's layout, padded to one entry per dimension
            return Resolved(P(*table_spec, *([None] * (len(shape) - len(table_spec)))))
        axes = logical_axes(variable)
        if axes is None:
            raise ConfigError("sharding.layout", f"parameter {name} (shape {shape}) has no logical axes; create it "
                                                 "with scaling.sharding.annotate.logical_param")
        return resolve(shape, axes, self.rules, self.mesh_sizes, what=f"parameter {name}")

    def _param_table(self, abstract_state) -> dict[str, dict[tuple[str, ...], tuple[Resolved, nnx.Variable]]]:
        """{group: {param path: (resolved spec, abstract variable)}} for the state's parameters."""
        table: dict[str, dict] = {}
        for group in PARAM_GROUPS:
            entries = {}
            flat, _ = jax.tree_util.tree_flatten_with_path(getattr(abstract_state, group), is_leaf=_is_variable)
            for keypath, variable in flat:
                path = leaf_path(keypath)
                entries[path] = (self._param_resolved(group, path, variable), variable)
            table[group] = entries
        return table

    def table_layouts(self, abstract_state) -> dict[str, TableLayout]:
        """{'embed/...' path: layout} of every embedding table that carries a placement layout."""
        out = {}
        for group, entries in self._param_table(abstract_state).items():
            for path, (_, variable) in entries.items():
                layout = table_layout(variable) if isinstance(variable, EmbeddingTable) else None
                if layout is not None:
                    out["/".join((group, *path))] = layout
        return out

    def placements(self, abstract_state) -> list[ParamPlacement]:
        """Every parameter's placement, dense first, in tree order."""
        out = []
        for group, entries in self._param_table(abstract_state).items():
            for path, (resolved, variable) in entries.items():
                shape = tuple(variable.shape)
                nbytes = int(np.prod(shape, dtype=np.int64)) * _itemsize(variable.dtype)
                out.append(ParamPlacement(
                    path="/".join((group, *path)), shape=shape, dtype=str(np.dtype(variable.dtype)),
                    logical=tuple(logical_axes(variable) or (None,) * len(shape)), spec=resolved.spec, bytes=nbytes,
                    bytes_per_device=nbytes // shards(resolved.spec, self.mesh_sizes), fallbacks=resolved.fallbacks))
        return out

    def state_specs(self, abstract_state):
        """A PartitionSpec for every leaf of the (abstract) train state, same tree structure."""
        params = {g: {p: (r.spec, tuple(v.shape)) for p, (r, v) in entries.items()}
                  for g, entries in self._param_table(abstract_state).items()}

        def spec_of(keypath, leaf) -> P:
            parts = leaf_path(keypath)
            top, rest = parts[0], parts[1:]
            if top in params:
                return params[top][rest][0]
            if top in OPTIMIZER_GROUPS:
                group = params[OPTIMIZER_GROUPS[top]]
                for start in range(len(rest)):  # the longest suffix that is a parameter path
                    if rest[start:] in group:
                        return _mirror(*group[rest[start:]], tuple(leaf.shape))
            return P()

        return jax.tree_util.tree_map_with_path(spec_of, abstract_state)

    def state_shardings(self, abstract_state):
        """NamedShardings of every leaf of the train state (in/out shardings of the jitted steps)."""
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.state_specs(abstract_state),
                            is_leaf=lambda x: isinstance(x, P))

    def sharded_abstract(self, abstract_state):
        """The abstract state with each leaf's sharding attached (AOT lowering, checkpoint restore)."""
        return jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
                            abstract_state, self.state_shardings(abstract_state))

    # -- jitted functions -----------------------------------------------------------------------
    def init(self, init_fn: Callable[[], Any], abstract_state) -> Any:
        """Run `init_fn` (no arguments -> the train state) jitted, every leaf created in its shard."""
        return jax.jit(init_fn, out_shardings=self.state_shardings(abstract_state))()

    def compile_train_step(self, step_fn: Callable, abstract_state, abstract_batch: Mapping[str, jax.ShapeDtypeStruct]):
        """AOT-compile (state, batch) -> (state, metrics): state donated and kept in its layout,
        batch split over the batch axes, metrics replicated. Call inside `activate()`."""
        shardings = self.state_shardings(abstract_state)
        jitted = jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                         out_shardings=(shardings, self.replicated), donate_argnums=0)
        return jitted.lower(self.sharded_abstract(abstract_state), dict(abstract_batch)).compile()

    def jit_eval_step(self, eval_fn: Callable, abstract_state) -> Callable:
        """(state, batch) -> outputs (replicated), the state read in place (not donated)."""
        return jax.jit(eval_fn, in_shardings=(self.state_shardings(abstract_state), self.batch_sharding),
                       out_shardings=self.replicated)

    def local_rows(self, global_batch: int) -> np.ndarray:
        """The rows of a global batch of `global_batch` that this process's devices hold (int64,
        ascending): what its data loader must read. They come from the batch sharding itself, so
        the assembled global array is the global batch whatever the mesh's device order; with the
        default mesh (jax.devices() order, processes in turn) process p holds the p-th contiguous
        block. Rows replicated over a mesh axis that spans processes are read by each of them."""
        return _local_rows(self.batch_sharding, int(global_batch))

    def process_rows(self, global_batch: int) -> dict[str, list[list[int]]]:
        """{process index: [[start, stop), ...]}: the rows of a global batch each process loads
        (what the run record keeps of a multi-process run)."""
        held: dict[int, set[int]] = {}
        for device, index in self.batch_sharding.devices_indices_map((int(global_batch),)).items():
            held.setdefault(device.process_index, set()).update(range(int(global_batch))[index[0]])
        out = {}
        for process, rows in sorted(held.items()):
            spans: list[list[int]] = []
            for r in sorted(rows):
                if spans and spans[-1][1] == r:
                    spans[-1][1] = r + 1
                else:
                    spans.append([r, r + 1])
            out[str(process)] = spans
        return out

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole global batch, held by every process (evaluation chunks, tests) -> global arrays
        split over the batch axes; each process places only its own rows."""
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            rows = self.local_rows(len(v))
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v[rows] if len(rows) < len(v) else v, v.shape)
        return out

    def shard_local_batch(self, batch: Mapping[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
        """This process's rows (`local_rows(global_batch)`, in that order) of a global batch ->
        global arrays of `global_batch` rows split over the batch axes."""
        expected = len(self.local_rows(global_batch))
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if len(v) != expected:
                raise ValueError(f"batch[{k!r}] has {len(v)} rows; this process holds {expected} of the global batch of {global_batch}")
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v, (global_batch, *v.shape[1:]))
        return out

    # -- reports --------------------------------------------------------------------------------
    def summary(self, abstract_state) -> dict[str, Any]:
        """What the run record keeps about the layout: mesh, per-device parameter and state bytes,
        the share of parameter bytes every device holds whole (replicated), fallbacks."""
        placements = self.placements(abstract_state)
        total = sum(p.bytes for p in placements)
        dense = [p for p in placements if p.group == "dense"]
        dense_total = sum(p.bytes for p in dense)
        specs = jax.tree.leaves(self.state_specs(abstract_state), is_leaf=lambda x: isinstance(x, P))
        leaves = jax.tree.leaves(abstract_state)
        state_per_device = sum(int(np.prod(leaf.shape, dtype=np.int64)) * _itemsize(leaf.dtype) // shards(spec, self.mesh_sizes)
                               for leaf, spec in zip(leaves, specs, strict=True))
        return {
            "layout": self.rules.name,
            "mesh": dict(self.mesh_sizes),
            "embedding": self.embedding,
            "param_bytes": total,
            "param_bytes_per_device": sum(p.bytes_per_device for p in placements),
            "replicated_param_share": sum(p.bytes for p in placements if p.replicated) / total if total else 0.0,
            "dense_replicated_share": (sum(p.bytes for p in dense if p.replicated) / dense_total) if dense_total else 0.0,
            "state_bytes_per_device": state_per_device,
            "fallbacks": {p.path: list(p.fallbacks) for p in placements if p.fallbacks},
        }


@functools.lru_cache(maxsize=64)
def _local_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
    indices = sharding.addressable_devices_indices_map((global_batch,))
    rows = np.unique(np.concatenate([np.arange(global_batch)[index[0]] for index in indices.values()]))
    rows.setflags(write=False)
    return rows


def _mirror(spec: P, param_shape: tuple[int, ...], shape: tuple[int, ...]) -> P:
    """The spec of an optimizer leaf of `shape` mirroring a parameter of `param_shape`: the
    parameter's spec where the two agree dimension by dimension (row-wise Adagrad's [rows, 1] keeps
    the rows' split); replicated where they differ, and wholly when the ranks differ."""
    if len(param_shape) != len(shape):
        return P()
    return P(*[e if a == b else None for e, a, b in zip(spec, param_shape, shape)])
