"""What a CTR batch holds: the contract between data pipelines and models."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CTRFeatureSpec:
    """Shapes of a CTR batch.

    A batch is a dict of arrays with static shapes:
      sparse: int32 [B, F], the id of each categorical field, in [0, cardinalities[f])
      dense:  float32 [B, D]
      label:  float32 [B], 0 or 1
    """

    cardinalities: tuple[int, ...]
    num_dense: int

    @property
    def num_fields(self) -> int:
        return len(self.cardinalities)

    @property
    def total_vocab(self) -> int:
        return int(sum(self.cardinalities))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingEvents:
    """The distinct (user, item) pairs of the training events, for models that read the whole
    interaction graph (LightGCN) or item frequencies (a two-tower's logQ correction).

    users int32 [E], items int32 [E] (1..num_items); counts int32 [E] (events per pair).
    Compared and hashed by identity: a spec holding it stays cheap to compare."""

    users: np.ndarray
    items: np.ndarray
    counts: np.ndarray

    def item_frequency(self, num_items: int) -> np.ndarray:
        """float64 [num_items + 1]: each item's share of the training events (0 for padding)."""
        freq = np.bincount(self.items, weights=self.counts, minlength=num_items + 1).astype(np.float64)
        return freq / max(freq.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """Shapes of a next-item batch (HSTU, SASRec, ...), L = the model's `max_len`.

    Train batch (every position predicts the next item; 0 = padding, items are 1..num_items):
      items, targets            int32 [B, L]
      timestamps, next_timestamps int32 [B, L]  (seconds; next_timestamps = the target's time)
      lengths                   int32 [B]
      users                     int32 [B]
      actions                   int32 [B, L]  (action type of each input event; 0 if unknown)
      negatives                 int32 [B, L, num_negatives]  ([B, 1, M] when shared per sequence)
    Eval batch: items, timestamps, next_timestamps, lengths, actions (the last valid position's
    next_timestamp is the target's time, i.e. the request time), target int32 [B].
    """

    num_items: int
    num_negatives: int
    shared_negatives: bool = False  # one negative draw per sequence ([B, 1, M]) instead of per position
    num_users: int = 0  # user ids 0..num_users-1 (`users` [B]); 0 where unknown (FLOP counts need none)
    # The training graph; None where unknown (a spec built from a data config alone, for FLOPs).
    training_events: TrainingEvents | None = dataclasses.field(default=None, compare=False, repr=False)
