"""Grain plumbing shared by data sets whose batch j is a pure function of j.

A data set that can generate (or read) batch j directly, in any order, plugs in here:

    it = batch_iterator(lambda j: make_batch(j))   # infinite, prefetched, checkpointable
    batch = next(it)
    state = it.get_state()                          # {'next_index': j}; JSON-able
    it.set_state(state)                             # resume: the next batch is batch j again

The iterator is `grain.MapDataset.range(start, stop).map(make_batch).to_iter_dataset(...)`: a
random-access map over batch indices, read ahead by a thread pool. Because a batch is a function
of its index alone, the iterator state is just the next index, restoring it is exact, and batches
do not depend on prefetch depth, thread count or timing.

Several processes (multi-host training) each read their own rows of every global batch: a data
set's `train_iterator(..., rows=...)` makes batch j hold rows `rows` of global batch j only (the
rows the process's devices hold, `Partitioner.local_rows`). Every process walks the same batch
indices, so the global batch the devices assemble is the single-process batch j, row for row,
and the iterator state (the next batch index) means the same on every process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

__all__ = ["batch_iterator", "batch_dataset", "batch_rows", "INFINITE"]

INFINITE = sys.maxsize  # the length grain reports for an unbounded MapDataset


def batch_rows(batch_size: int, rows=None) -> np.ndarray:
    """int64 positions within a global batch of `batch_size` that a reader builds: all of them
    (rows None) or the given ones (e.g. one process's share), checked to lie in the batch."""
    if rows is None:
        return np.arange(batch_size, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= batch_size)):
        raise ValueError(f"rows must be a 1-D array of positions in a batch of {batch_size}")
    return rows


class _BatchAt:
    """Picklable `j -> make_batch(j)` (grain may copy transforms into worker processes)."""

    def __init__(self, make_batch: Callable[[int], Any]):
        self.make_batch = make_batch

    def __call__(self, j: int) -> Any:
        return self.make_batch(int(j))


def batch_dataset(make_batch: Callable[[int], Any], *, start: int = 0, stop: int | None = None) -> grain.MapDataset:
    """A `grain.MapDataset` whose element k is `make_batch(start + k)`; unbounded when stop is None."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    end = INFINITE if stop is None else int(stop)
    return grain.MapDataset.range(int(start), end).map(_BatchAt(make_batch))


def batch_iterator(
    make_batch: Callable[[int], Any],
    *,
    start: int = 0,
    stop: int | None = None,
    prefetch: int = 2,
    num_threads: int = 1,
) -> grain.DatasetIterator:
    """A prefetching, checkpointable grain iterator over batches `make_batch(start), make_batch(start + 1), ...`.

    prefetch: batches read ahead (0: generate in the caller's thread, on demand).
    num_threads: generator threads when prefetching (numpy releases the GIL for its large ops).
    `get_state()` / `set_state()` save and restore the position (`{'next_index': k}` counts batches
    returned since `start`).
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    threads = max(1, int(num_threads)) if prefetch > 0 else 0
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=int(prefetch))
    return iter(batch_dataset(make_batch, start=start, stop=stop).to_iter_dataset(options))
