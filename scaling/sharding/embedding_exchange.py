"""The shard_map bodies of the row_wise and table_wise lookups (layouts: `scaling.sharding.embedding`).

Everything here runs on S = data x fsdp devices (the tensor axis, if any, repeats the work). Ids
arrive sharded with the batch (their leading dim split over ("data", "fsdp"), a multiple of S);
the stored table arrives as its P(("data", "fsdp"), None) shards. `all_to_all` is linear, so
autodiff gives the reverse exchange plus a scatter-add into each device's rows: no custom VJP.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from scaling.sharding.embedding import TableLayout, _table_plan, mean_pool
from scaling.sharding.mesh import BATCH_AXES

AX = BATCH_AXES


def row_capacity(local_ids: int, shards: int, factor: float) -> int:
    """C: unique ids one device may send one peer, ceil(factor * local_ids / S), at least 1."""
    return max(1, math.ceil(factor * local_ids / shards))


def row_wise_lookup(table: jax.Array, ids: jax.Array, valid: jax.Array, layout: TableLayout,
                    mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """table [S * Vl, D] (MOD layout), ids int32 [N], valid bool [N] (N a multiple of S) ->
    (vectors [N, D], dropped int32 scalar: valid positions zeroed for capacity, over all devices)."""
    s = layout.shards
    capacity = row_capacity(ids.shape[0] // s, s, layout.capacity)
    body = functools.partial(_row_wise_body, shards=s, capacity=capacity)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(AX, None), P(AX), P(AX)), out_specs=(P(AX, None), P()),
                         check_vma=True)(table, ids, valid)


def _row_wise_body(table, ids, valid, *, shards, capacity):
    """table [Vl, D]: my rows (natural r = local * S + me); ids, valid [n]: my positions."""
    n = ids.shape[0]
    # Dedup: each unique id takes one slot (-1 marks "nothing to send": invalid and fill entries).
    unique, inverse = jnp.unique(jnp.where(valid, ids, -1), size=n, fill_value=-1, return_inverse=True)
    inverse = inverse.reshape(n)
    present = unique >= 0
    owner = jnp.where(present, unique % shards, 0)
    # Slot of each unique id in its owner's buffer: its rank among my unique ids for that owner.
    mine = (owner[:, None] == jnp.arange(shards)[None, :]) & present[:, None]  # [n, S]
    slot = jnp.take_along_axis(jnp.cumsum(mine, axis=0, dtype=jnp.int32), owner[:, None], axis=1)[:, 0] - 1
    sent = present & (slot < capacity)
    # Unsent ids write to row S, which mode="drop" discards.
    send = jnp.full((shards, capacity), -1, jnp.int32).at[jnp.where(sent, owner, shards), jnp.where(sent, slot, 0)].set(
        unique // shards, mode="drop")
    asked = jax.lax.all_to_all(send, AX, 0, 0, tiled=True)  # [S, C]: my local rows each peer wants
    rows = jnp.where((asked >= 0)[..., None], table[jnp.maximum(asked, 0)], 0.0)  # [S, C, D]
    answers = jax.lax.all_to_all(rows, AX, 0, 0, tiled=True)  # [S, C, D]: by owner, my slots
    vectors = jnp.where(sent[:, None], answers[owner, jnp.clip(slot, 0, capacity - 1)], 0.0)  # [n, D]
    dropped = jnp.sum((present & ~sent)[inverse], dtype=jnp.int32)
    return vectors[inverse], jax.lax.psum(dropped, AX)


def _slot_columns(slots: np.ndarray, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """slots [S, k] (table index or -1) of one group whose tables are numbered first..first+count
    -> (source column per slot [S k], dummy mask [S k], slot column of each table [count])."""
    flat = slots.reshape(-1)
    source = np.where(flat >= 0, flat - first, 0)
    where = np.zeros(count, np.int64)
    where[flat[flat >= 0] - first] = np.flatnonzero(flat >= 0)
    return source, flat < 0, where


def _local_starts(slots: np.ndarray, start: np.ndarray, local_rows: int) -> np.ndarray:
    """[S, k]: the first local row of the table in each slot (0 for a dummy)."""
    owner_base = np.arange(slots.shape[0])[:, None] * local_rows
    return np.where(slots >= 0, start[np.maximum(slots, 0)] - owner_base, 0).astype(np.int32)


def table_wise_fields(table: jax.Array, sparse: jax.Array, layout: TableLayout, mesh: Mesh) -> jax.Array:
    """table [S * R, D] (packed tables), sparse int32 [N, F] per-field ids (N a multiple of S)
    -> [N, F, D]. Ids go to the device of their field, vectors come back: two all_to_alls."""
    plan = _table_plan(layout.blocks, layout.singles, layout.shards)
    slots = plan.single_slots  # [S, Fl]
    if slots.shape[1] == 0:
        return jnp.zeros((*sparse.shape, table.shape[-1]), table.dtype)
    source, dummy, where = _slot_columns(slots, 0, sparse.shape[1])
    by_slot = jnp.where(jnp.asarray(dummy)[None], -1, sparse[:, source])  # [N, S Fl]
    body = functools.partial(_fields_body, local_start=_local_starts(slots, plan.start, plan.local_rows))
    out = jax.shard_map(body, mesh=mesh, in_specs=(P(AX, None), P(AX, None)), out_specs=P(AX, None, None),
                        check_vma=True)(table, by_slot)
    return out[:, where]


def _fields_body(table, ids, *, local_start):
    """table [R, D]: my tables; ids [n, S Fl]: my examples' ids, grouped by the device owning them."""
    asked = jax.lax.all_to_all(ids, AX, split_axis=1, concat_axis=0, tiled=True)  # [S n, Fl]
    ok = asked >= 0
    start = jnp.asarray(local_start)[jax.lax.axis_index(AX)]  # [Fl]
    rows = jnp.where(ok[..., None], table[jnp.where(ok, asked + start, 0)], 0.0)  # [S n, Fl, D]
    return jax.lax.all_to_all(rows, AX, split_axis=0, concat_axis=1, tiled=True)  # [n, S Fl, D]


def table_wise_bags(table: jax.Array, history: jax.Array, layout: TableLayout, mesh: Mesh) -> jax.Array:
    """table [S * R, D], history int32 [N, B, L] per-bag ids (0 = padding; N a multiple of S)
    -> mean-pooled [N, B, D]. The owner pools, so [.., D] per bag comes back, not [.., L, D]."""
    plan = _table_plan(layout.blocks, layout.singles, layout.shards)
    slots = plan.bag_slots  # [S, Bl]
    if slots.shape[1] == 0:
        return jnp.zeros((*history.shape[:2], table.shape[-1]), table.dtype)
    source, dummy, where = _slot_columns(slots, layout.singles, history.shape[1])
    by_slot = jnp.where(jnp.asarray(dummy)[None, :, None], -1, history[:, source])  # [N, S Bl, L]
    body = functools.partial(_bags_body, local_start=_local_starts(slots, plan.start, plan.local_rows))
    out = jax.shard_map(body, mesh=mesh, in_specs=(P(AX, None), P(AX, None, None)), out_specs=P(AX, None, None),
                        check_vma=True)(table, by_slot)
    return out[:, where]


def _bags_body(table, ids, *, local_start):
    """table [R, D]; ids [n, S Bl, L] (-1 in dummy slots, 0 = padding)."""
    asked = jax.lax.all_to_all(ids, AX, split_axis=1, concat_axis=0, tiled=True)  # [S n, Bl, L]
    valid = asked > 0
    start = jnp.asarray(local_start)[jax.lax.axis_index(AX)][None, :, None]
    pooled = mean_pool(table[jnp.where(valid, asked + start, 0)], valid)  # [S n, Bl, D]
    return jax.lax.all_to_all(pooled, AX, split_axis=0, concat_axis=1, tiled=True)  # [n, S Bl, D]
