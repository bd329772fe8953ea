"""Checkpointed embedding tables restored under another placement or device count.

A stored table is a permutation of its natural rows that depends on the placement strategy and on
S, the devices over the batch axes (scaling.sharding.embedding): under row_wise, natural row r
sits at stored row (r % S) * ceil(V / S) + r // S. The optimizer leaves that mirror a table row
for row (row-wise Adagrad's [rows, 1], Adam's moments) are laid out the same way. So a checkpoint
written on 8 devices and resumed on 4 holds arrays of the right shape in the wrong order (472 rows
are 8 x 59 and 4 x 118 alike), and without care would resume with every row in another place.

A checkpoint therefore records each table's `TableLayout` (`layouts_json`). On restore,
`RestorePlan` compares them with this run's: an unchanged table is read straight into its shards;
a changed one (and its optimizer mirrors) is read in the saved shape into host memory (each
process reads it whole: the saved row count need not divide this run's devices, and no device
ever holds more than its shard), and each device's shard is gathered from it, every natural row
taken to where this run's layout wants it (no second whole copy on the host). A checkpoint without the record
(written before it existed) is restored as it is, which is right only when the layout did not
change.

    plan = RestorePlan.make(partitioner, abstract, saved_layouts)
    state = plan.finish(checkpointer.restore(step, plan.target)[0])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from scaling.sharding.embedding import TableLayout, stored_positions
from scaling.sharding.partitioner import OPTIMIZER_GROUPS, leaf_path

def layout_to_json(layout: TableLayout) -> dict:
    return dataclasses.asdict(layout)


def layout_from_json(d: dict) -> TableLayout:
    return TableLayout(**{**d, "blocks": tuple(d.get("blocks", ()))})


def same_storage(a: TableLayout, b: TableLayout) -> bool:
    """Whether two layouts put every natural row at the same stored row (capacity only sizes the
    lookup exchange)."""
    return dataclasses.replace(a, capacity=b.capacity) == b


def layouts_json(partitioner, abstract_state) -> dict[str, dict]:
    """{'embed/...' table path: its TableLayout as JSON}: what a checkpoint records."""
    return {path: layout_to_json(layout) for path, layout in partitioner.table_layouts(abstract_state).items()}


def _describe(layout: TableLayout) -> str:
    return layout.strategy if layout.strategy == "replicated" else f"{layout.strategy} over {layout.shards} devices"


@dataclasses.dataclass(frozen=True)
class _Move:
    old: TableLayout
    new: TableLayout
    sharding: NamedSharding  # this run's sharding of the leaf


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    """target: the abstract state to restore into (changed leaves in their saved shape);
    moves: {leaf path: how to re-lay it out}; notes: one line per re-laid-out table."""

    target: Any
    moves: dict[tuple[str, ...], _Move]
    notes: tuple[str, ...]

    @classmethod
    def make(cls, partitioner, abstract_state, saved: dict[str, dict] | None) -> RestorePlan:
        """`saved`: the checkpoint's layouts record (None when it has none)."""
        sharded = partitioner.sharded_abstract(abstract_state)
        if not saved:
            return cls(sharded, {}, ())
        now = partitioner.table_layouts(abstract_state)
        changed = {}
        for path, layout in now.items():
            if path in saved and not same_storage(old := layout_from_json(saved[path]), layout):
                changed[tuple(path.split("/"))] = (old, layout)
        if not changed:
            return cls(sharded, {}, ())
        moves: dict[tuple[str, ...], _Move] = {}

        def retarget(keypath, leaf):
            parts = leaf_path(keypath)
            found = mirrored_table(parts, changed, leaf.shape)
            if found is None:
                return leaf
            old, new = found
            moves[parts] = _Move(old, new, leaf.sharding)
            return np.zeros((old.stored_rows, *leaf.shape[1:]), leaf.dtype)  # orbax restores it as numpy

        target = jax.tree_util.tree_map_with_path(retarget, sharded)
        notes = tuple(f"checkpoint table {'/'.join(p)}: re-laid out from {_describe(o)} to {_describe(n)}"
                      for p, (o, n) in changed.items())
        return cls(target, moves, notes)

    def finish(self, restored: Any) -> Any:
        """The restored state with every changed leaf re-laid out into this run's layout and sharding."""
        if not self.moves:
            return restored

        def relayout(keypath, leaf):
            move = self.moves.get(leaf_path(keypath))
            if move is None:
                return leaf
            saved, source = np.asarray(leaf), _source_rows(move)
            shape = (move.new.stored_rows, *saved.shape[1:])
            return jax.make_array_from_callback(shape, move.sharding, lambda index: _shard(saved, source, index))

        return jax.tree_util.tree_map_with_path(relayout, restored)


def _source_rows(move: _Move) -> np.ndarray:
    """int64 [new stored rows]: the saved stored row each new stored row takes (-1: padding)."""
    natural = np.arange(move.old.rows)
    source = np.full(move.new.stored_rows, -1, np.int64)
    source[stored_positions(natural, move.new)] = stored_positions(natural, move.old)
    return source


def _shard(saved: np.ndarray, source: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """One device's shard of the re-laid-out leaf, gathered straight from the saved rows (so the
    host never holds a second whole copy of the table): `index` is the shard's slice of the new
    [stored rows, ...] array; padding rows are zero."""
    rows = source[index[0]]
    out = saved[np.maximum(rows, 0)][(slice(None), *index[1:])]
    out[rows < 0] = 0
    return out


def mirrored_table(parts: tuple[str, ...], changed: dict, shape: tuple[int, ...]):
    """(old, new) layouts when the leaf at `parts` is a changed table or an optimizer leaf that
    mirrors one row for row (the longest suffix of its path below the optimizer group that is a
    table path, with the table's stored rows as its leading dimension); else None."""
    if parts in changed:
        return changed[parts]
    if not parts or parts[0] not in OPTIMIZER_GROUPS or not shape:
        return None
    group, rest = OPTIMIZER_GROUPS[parts[0]], parts[1:]
    for start in range(len(rest)):
        key = (group, *rest[start:])
        if key in changed:
            old, new = changed[key]
            return (old, new) if shape[0] == new.stored_rows else None
    return None
