"""Sharded embedding lookups: where a table's rows live and how ids reach them.

Strategies (`sharding.embedding`), over the S = data x fsdp devices that split the batch:

    replicated  every device holds the natural table [V, D]; a lookup is jnp.take.
    gspmd       the natural table padded to S * ceil(V / S) rows, sharded P(("data", "fsdp"), None);
                a lookup is jnp.take and the compiler (GSPMD) picks the collectives (on CPU: a
                masked local gather + an all-reduce of [global ids, D]). The baseline.
    row_wise    MOD layout: natural row r lives on device r mod S, at local row r // S. The stored
                array is [S * Vl, D], Vl = ceil(V / S), block k = the rows r with r mod S = k
                (zero rows pad the last ones), so the plain P(("data", "fsdp"), None) puts the
                right rows on each device. A lookup (in `jax.shard_map`) dedups each device's ids,
                sends every unique id to its owner with an all_to_all of a static [S, C] buffer,
                the owners gather their rows, and a second all_to_all returns [S, C, D]. MOD
                spreads consecutive ids (e.g. a popular id range) over every device.
    table_wise  FieldEmbedding (many fields): whole field tables per device. Tables are PACKED,
                not padded to the largest: device k holds its tables' rows back to back in a block
                of R = max over devices of their rows, stored [S * R, D] with the same spec. Padding
                every table to the largest cardinality would cost T x V_max rows, which for Criteo-
                like fields (10^7 rows next to 3) is many times the table. Fields are dealt to
                devices largest first onto the least-loaded device that still has a free slot, so
                each device gets ceil(F / S) single-hot and ceil(B / S) bag slots (a slot without a
                table is a dummy that gives 0): the exchange is structured (every example sends one
                id per single-hot table, L per bag), so it needs no capacity and never drops;
                multi-hot bags are mean-pooled by the owner, which returns [.., D] per bag, not
                [.., L, D]. A single-table embedding (an item table) has nothing to deal out, so
                under table_wise it is laid out and looked up row_wise.

Capacity and overflow (row_wise). A device with n local ids sends each peer at most
C = ceil(embedding_capacity * n / S) unique ids (the even share is n / S). Unique ids past C (in
ascending id order, per owner) get zero vectors; every lookup position that got such a zero is
counted, summed over devices, and appended to the collector opened by `collect_overflow()`; the
train step returns the total as the metric `embedding_overflow` (0 for the other strategies), the
eval step returns its own beside its outputs. Ids are deduplicated per device before sending
(jnp.unique with a static size), so a repeated id (the padding item of a sequence, a hot item)
costs one slot; invalid positions (`valid` False: bag padding) are not sent.

How models reach a strategy. Model init and step tracing both run inside
`embedding_placement(EmbeddingPlacement(strategy, mesh, capacity))`. At init, `place_table` turns
the natural table (drawn from the same random values under every strategy) into the stored layout
and returns a `TableLayout`, which the EmbeddingTable carries in its metadata (key
`embedding_layout`); `table_partition_spec(variable)` gives the stored array's PartitionSpec (also
right for its optimizer state: row-wise Adagrad's [rows, 1] and Adam's moments share the leading
dimension). Models call `lookup`, `lookup_fields`, `lookup_bags` instead of jnp.take, and
`natural_table` where they need the whole table in natural order (output-side scoring against
every item: not a lookup; it is a static un-permutation for row_wise and left to GSPMD). With no
placement active a lookup is a jnp.take at the stored positions, so a model computes the same
function on one device whatever layout it was built with.

Checkpoints hold stored arrays and record each table's layout; a restore under another strategy
or device count re-lays them out (a static permutation of rows, on the host: scaling.sharding.relayout).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from scaling.sharding.mesh import BATCH_AXES

STRATEGIES = ("replicated", "row_wise", "table_wise", "gspmd")
LAYOUT_KEY = "embedding_layout"
OVERFLOW_METRIC = "embedding_overflow"


# ----------------------------------------------------------------------------------------------
# Placement context and overflow collector


@dataclasses.dataclass(frozen=True)
class EmbeddingPlacement:
    """A strategy on a mesh. capacity: row_wise ids per peer as a multiple of the even share."""

    strategy: str = "replicated"
    mesh: Mesh | None = None
    capacity: float = 2.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown embedding strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.strategy != "replicated" and self.mesh is None:
            raise ValueError(f"embedding strategy {self.strategy!r} needs a mesh")
        if self.capacity <= 0:
            raise ValueError(f"embedding capacity must be > 0, got {self.capacity}")

    @property
    def shards(self) -> int:
        """S: devices over the batch axes (1 when replicated)."""
        if self.strategy == "replicated":
            return 1
        return int(math.prod(self.mesh.shape[a] for a in BATCH_AXES))

    @classmethod
    def from_config(cls, sharding_config, mesh: Mesh) -> EmbeddingPlacement:
        """From `RunConfig.sharding` (a ShardingConfig) and the run's mesh."""
        return cls(sharding_config.embedding, mesh, sharding_config.embedding_capacity)


_PLACEMENT: contextvars.ContextVar[EmbeddingPlacement | None] = contextvars.ContextVar("embedding_placement",
                                                                                        default=None)
_OVERFLOW: contextvars.ContextVar[list | None] = contextvars.ContextVar("embedding_overflow", default=None)


@contextlib.contextmanager
def embedding_placement(placement: EmbeddingPlacement | None) -> Iterator[EmbeddingPlacement | None]:
    """Enter around model init (layouts) and step tracing (exchanges). None: no placement."""
    token = _PLACEMENT.set(placement)
    try:
        yield placement
    finally:
        _PLACEMENT.reset(token)


def current_placement() -> EmbeddingPlacement | None:
    return _PLACEMENT.get()


def tables_permuted() -> bool:
    """Whether the active placement stores tables out of natural order (row_wise, table_wise): then
    `natural_table` moves the whole table between devices, and a few rows are better looked up."""
    placement = current_placement()
    return placement is not None and placement.strategy in ("row_wise", "table_wise")


@contextlib.contextmanager
def collect_overflow() -> Iterator[list]:
    """Collects the overflow counts (int32 scalars, summed over devices) of the lookups traced
    inside; `overflow_total(counts)` adds them up. Open it in the same trace as the lookups (not
    around a jax.checkpoint/scan that contains them, whose tracers must not escape)."""
    counts: list = []
    token = _OVERFLOW.set(counts)
    try:
        yield counts
    finally:
        _OVERFLOW.reset(token)


def overflow_total(counts: Sequence[jax.Array]) -> jax.Array:
    """int32 scalar: ids dropped for capacity (0 when there were none or nothing was row_wise)."""
    return sum((jnp.asarray(c, jnp.int32) for c in counts), jnp.zeros((), jnp.int32))


def _report_overflow(count: jax.Array) -> None:
    counts = _OVERFLOW.get()
    if counts is not None:
        counts.append(count)


# ----------------------------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """How a table's stored array holds its natural rows (static, hashable: variable metadata).

    strategy: the layout (table_wise only for field tables; single tables get row_wise)
    rows:     V, natural rows;  shards: S;  capacity: row_wise's per-peer capacity factor
    blocks:   a field table's per-field rows (single-hot fields first, then bags), () otherwise
    singles:  how many of `blocks` are single-hot fields
    """

    strategy: str = "replicated"
    rows: int = 0
    shards: int = 1
    capacity: float = 2.0
    blocks: tuple[int, ...] = ()
    singles: int = 0

    @property
    def offsets(self) -> np.ndarray:
        """Natural first row of each block."""
        return np.concatenate([[0], np.cumsum(self.blocks)[:-1]]).astype(np.int64) if self.blocks else np.zeros(0, np.int64)

    @property
    def local_rows(self) -> int:
        """Rows of the stored array per device."""
        if self.strategy == "table_wise":
            return _table_plan(self.blocks, self.singles, self.shards).local_rows
        return -(-self.rows // self.shards)

    @property
    def stored_rows(self) -> int:
        return self.rows if self.strategy == "replicated" else self.shards * self.local_rows

    @property
    def spec(self) -> P:
        """PartitionSpec of the stored array and of optimizer state with the same leading dim."""
        return strategy_partition_spec(self.strategy)


def strategy_partition_spec(strategy: str) -> P:
    """The stored tables' PartitionSpec under a strategy (the same for every table, so a caller
    with only the strategy name can place them): replicated P(), otherwise rows over the batch
    axes, P(("data", "fsdp")) (a prefix: trailing dims, [rows, D] or [rows, 1], replicated)."""
    return P() if strategy == "replicated" else P(BATCH_AXES)


@dataclasses.dataclass(frozen=True)
class _TablePlan:
    """table_wise: which field table sits in which device slot, and where its rows start.

    single_slots [S, Fl], bag_slots [S, Bl]: table index per (device, slot), -1 for a dummy
    start [T]: stored row of each table's first row;  local_rows: R
    """

    single_slots: np.ndarray
    bag_slots: np.ndarray
    start: np.ndarray
    local_rows: int


@functools.lru_cache(maxsize=256)
def _table_plan(blocks: tuple[int, ...], singles: int, shards: int) -> _TablePlan:
    load = np.zeros(shards, np.int64)
    groups = []
    for first, count in ((0, singles), (singles, len(blocks) - singles)):
        per_device = -(-count // shards)
        slots = np.full((shards, per_device), -1, np.int64)
        used = np.zeros(shards, np.int64)
        # Largest first onto the least-loaded device with a free slot (ties: lowest index): every
        # device gets the same slot count, and rows come out close to balanced.
        for t in sorted(range(first, first + count), key=lambda t: (-blocks[t], t)):
            free = np.flatnonzero(used < per_device)
            k = free[np.argmin(load[free])]
            slots[k, used[k]] = t
            used[k] += 1
            load[k] += blocks[t]
        groups.append(slots)
    local_rows = max(int(load.max()), 1)
    start = np.zeros(len(blocks), np.int64)
    for k in range(shards):
        at = k * local_rows
        for t in np.concatenate([groups[0][k], groups[1][k]]):
            if t >= 0:
                start[t] = at
                at += blocks[t]
    return _TablePlan(groups[0], groups[1], start, local_rows)


def new_layout(rows: int, *, blocks: Sequence[int] = (), singles: int | None = None,
               placement: EmbeddingPlacement | None = None) -> TableLayout:
    """The layout the active placement (or `placement`) gives a table of `rows` rows; `blocks`:
    a field table's per-field rows (its first `singles` are single-hot; default all)."""
    placement = placement or current_placement() or EmbeddingPlacement()
    blocks = tuple(int(b) for b in blocks)
    if blocks and sum(blocks) != rows:
        raise ValueError(f"blocks {blocks} do not add up to {rows} rows")
    strategy = placement.strategy
    if strategy == "table_wise" and not blocks:
        strategy = "row_wise"  # one table: nothing to deal out (module docstring)
    return TableLayout(strategy, int(rows), 1 if strategy == "replicated" else placement.shards, placement.capacity,
                       blocks, len(blocks) if singles is None else int(singles))


def place_table(natural: jax.Array, *, blocks: Sequence[int] = (), singles: int | None = None,
                placement: EmbeddingPlacement | None = None) -> tuple[jax.Array, TableLayout]:
    """natural [V, D] -> (stored [stored_rows, D], its layout) under the active placement."""
    layout = new_layout(natural.shape[0], blocks=blocks, singles=singles, placement=placement)
    return to_stored(natural, layout), layout


def to_stored(natural: jax.Array, layout: TableLayout) -> jax.Array:
    """natural [V, D] -> stored [stored_rows, D] (zeros in the padding rows)."""
    s, vl, d = layout.shards, layout.local_rows, natural.shape[-1]
    if layout.strategy == "replicated":
        return natural
    if layout.strategy == "gspmd":
        return jnp.pad(natural, ((0, s * vl - layout.rows), (0, 0)))
    if layout.strategy == "row_wise":
        padded = jnp.pad(natural, ((0, s * vl - layout.rows), (0, 0)))
        return padded.reshape(vl, s, d).transpose(1, 0, 2).reshape(s * vl, d)
    plan, offsets = _table_plan(layout.blocks, layout.singles, s), layout.offsets
    order = np.argsort(plan.start, kind="stable")
    pieces, at = [], 0
    for t in order:  # tables in stored order, zero rows where a device's block is not full
        if plan.start[t] > at:
            pieces.append(jnp.zeros((int(plan.start[t]) - at, d), natural.dtype))
        pieces.append(natural[offsets[t]: offsets[t] + layout.blocks[t]])
        at = int(plan.start[t]) + layout.blocks[t]
    pieces.append(jnp.zeros((s * vl - at, d), natural.dtype))
    return jnp.concatenate(pieces, axis=0)


def to_natural(stored: jax.Array, layout: TableLayout) -> jax.Array:
    """stored [stored_rows, D] -> natural [V, D] (the inverse of `to_stored`)."""
    s, vl, d = layout.shards, layout.local_rows, stored.shape[-1]
    if layout.strategy in ("replicated", "gspmd"):
        return stored[: layout.rows]
    if layout.strategy == "row_wise":
        return stored.reshape(s, vl, d).transpose(1, 0, 2).reshape(s * vl, d)[: layout.rows]
    start = _table_plan(layout.blocks, layout.singles, s).start
    return jnp.concatenate([stored[start[t]: start[t] + b] for t, b in enumerate(layout.blocks)], axis=0)


def convert_table(stored: jax.Array, old: TableLayout, new: TableLayout) -> jax.Array:
    """Re-lay a stored table out (e.g. a checkpoint written under another strategy)."""
    return to_stored(to_natural(stored, old), new)


def stored_positions(rows: jax.Array | np.ndarray, layout: TableLayout) -> jax.Array | np.ndarray:
    """Natural rows (int, any shape) -> their rows in the stored array (numpy in, numpy out: the
    host-side re-layout of a restored checkpoint uses it)."""
    xp = np if isinstance(rows, np.ndarray) else jnp
    if layout.strategy in ("replicated", "gspmd"):
        return rows
    if layout.strategy == "row_wise":
        return (rows % layout.shards) * layout.local_rows + rows // layout.shards
    offsets = layout.offsets
    table = xp.searchsorted(xp.asarray(offsets[1:]), rows, side="right")
    start = _table_plan(layout.blocks, layout.singles, layout.shards).start
    return xp.asarray(start)[table] + rows - xp.asarray(offsets)[table]


def table_layout(table) -> TableLayout | None:
    """The layout an EmbeddingTable variable carries (None for a plain array or no metadata)."""
    get = getattr(table, "get_metadata", None)
    return get().get(LAYOUT_KEY) if get is not None else None


def table_partition_spec(table) -> P | None:
    """PartitionSpec of a table variable's stored array (or of a TableLayout); None when the table
    has no placement metadata (then the layout's logical-axis rules apply)."""
    layout = table if isinstance(table, TableLayout) else table_layout(table)
    return None if layout is None else layout.spec


def natural_size(table) -> int:
    """Parameters of a table variable in its natural layout (padding rows excluded)."""
    layout = table_layout(table)
    shape = table.shape
    return int(np.prod(shape)) if layout is None else int(layout.rows * np.prod(shape[1:]))


# ----------------------------------------------------------------------------------------------
# Lookups


def _unwrap(table, layout: TableLayout | None) -> tuple[jax.Array, TableLayout | None]:
    """(the stored array, its layout: given, from the variable's metadata, or None: natural)."""
    layout = layout or table_layout(table)
    return (table[...] if hasattr(table, "get_metadata") else table), layout


def _active(layout: TableLayout) -> EmbeddingPlacement | None:
    """The placement whose mesh runs this table's exchange, or None (plain take at the stored
    positions). A table built under another placement than the one being traced is an error:
    the benchmark and the step would otherwise silently measure the wrong thing."""
    placement = current_placement()
    if placement is None:
        return None
    expected = new_layout(layout.rows, blocks=layout.blocks, singles=layout.singles, placement=placement)
    if (expected.strategy, expected.shards) != (layout.strategy, layout.shards):
        raise ValueError(
            f"an embedding table laid out {layout.strategy} over {layout.shards} devices is traced under "
            f"{placement.strategy} over {placement.shards}: build the model inside the same embedding_placement")
    return placement if layout.strategy in ("row_wise", "table_wise") else None


def _pad_leading(x: jax.Array, multiple: int, value: int) -> jax.Array:
    extra = -x.shape[0] % multiple
    if not extra:
        return x
    return jnp.concatenate([x, jnp.full((extra, *x.shape[1:]), value, x.dtype)], axis=0)


def mean_pool(vectors: jax.Array, valid: jax.Array) -> jax.Array:
    """vectors [..., L, D], valid bool [..., L] -> mean of the valid rows [..., D] (0 if none)."""
    count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(vectors.dtype)
    return jnp.where(valid[..., None], vectors, 0.0).sum(-2) / count


def lookup(table, ids: jax.Array, *, valid: jax.Array | None = None, layout: TableLayout | None = None) -> jax.Array:
    """Rows of a table by natural row id: ids int [...] -> [..., D].

    table: an EmbeddingTable variable (its metadata gives the layout) or an array (`layout`, or
    natural). valid bool [...]: False positions give 0 and, row_wise, are not sent.
    """
    array, layout = _unwrap(table, layout)
    placement = None if layout is None else _active(layout)
    if placement is None:  # a table without a layout is natural and replicated: a plain take
        out = jnp.take(array, ids if layout is None else stored_positions(ids, layout), axis=0)
    else:  # (imported here: the exchange module builds on this one's layouts)
        from scaling.sharding.embedding_exchange import row_wise_lookup

        if layout.strategy == "table_wise":
            raise ValueError("a table_wise field table is read with lookup_fields / lookup_bags, not lookup")
        flat = ids.reshape(-1).astype(jnp.int32)
        ok = jnp.ones(flat.shape, bool) if valid is None else valid.reshape(-1)
        n = flat.shape[0]
        # Pad to a multiple of S so the flat ids split evenly (padding is not valid: never sent).
        flat, ok = _pad_leading(flat, layout.shards, 0), _pad_leading(ok, layout.shards, False)
        out, dropped = row_wise_lookup(array, flat, ok, layout, placement.mesh)
        _report_overflow(dropped)
        out = out[:n].reshape(*ids.shape, array.shape[-1])
    if valid is not None:
        out = jnp.where(valid[..., None], out, 0.0)
    return out


def lookup_fields(table, sparse: jax.Array, *, layout: TableLayout | None = None) -> jax.Array:
    """A field table's single-hot fields: sparse int [..., F] (per-field ids) -> [..., F, D]."""
    array, layout = _unwrap(table, layout)
    if layout is None or not layout.blocks:
        raise ValueError("lookup_fields needs a field table (a layout with blocks)")
    f = sparse.shape[-1]
    if f != layout.singles:
        raise ValueError(f"{f} single-hot ids per example for a table of {layout.singles} single-hot fields")
    offsets = jnp.asarray(layout.offsets[:f], jnp.int32)
    placement = _active(layout)
    if placement is None or layout.strategy != "table_wise":
        return lookup(array, sparse + offsets, layout=layout)
    from scaling.sharding.embedding_exchange import table_wise_fields

    lead = sparse.shape[:-1]
    flat = sparse.reshape(-1, f).astype(jnp.int32)
    n = flat.shape[0]
    out = table_wise_fields(array, _pad_leading(flat, layout.shards, 0), layout, placement.mesh)
    return out[:n].reshape(*lead, f, array.shape[-1])


def lookup_bags(table, history: jax.Array, *, layout: TableLayout | None = None) -> jax.Array:
    """A field table's multi-hot bags, mean-pooled: history int [..., B, L] (per-bag ids, 0 =
    padding) -> [..., B, D] (an empty bag gives 0)."""
    array, layout = _unwrap(table, layout)
    if layout is None or not layout.blocks:
        raise ValueError("lookup_bags needs a field table (a layout with blocks)")
    bags = len(layout.blocks) - layout.singles
    if history.shape[-2] != bags:
        raise ValueError(f"{history.shape[-2]} bags per example for a table of {bags} bag fields")
    valid = history > 0
    placement = _active(layout)
    if placement is None or layout.strategy != "table_wise":
        offsets = jnp.asarray(layout.offsets[layout.singles:], jnp.int32)[:, None]
        return mean_pool(lookup(array, history + offsets, valid=valid, layout=layout), valid)
    from scaling.sharding.embedding_exchange import table_wise_bags

    lead = history.shape[:-2]
    flat = history.reshape(-1, *history.shape[-2:]).astype(jnp.int32)
    n = flat.shape[0]
    out = table_wise_bags(array, _pad_leading(flat, layout.shards, 0), layout, placement.mesh)
    return out[:n].reshape(*lead, bags, array.shape[-1])


def natural_table(table, *, layout: TableLayout | None = None) -> jax.Array:
    """The whole table in natural order [V, D], for output-side use (scores against every item).
    Replicated: the array itself; otherwise a static un-permutation that GSPMD shards."""
    array, layout = _unwrap(table, layout)
    return array if layout is None else to_natural(array, layout)
