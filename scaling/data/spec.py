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
    and, when the data has multi-hot fields (`bag_cardinalities`, e.g. behaviour histories):
      history: int32 [B, S, bag_length], ids of bag s in 1..bag_cardinalities[s]-1, 0 = padding

    A model sees F + S fields (`num_fields`): the F single-hot ones, then one mean-pooled vector
    per bag (`scaling.models.embedding.FieldEmbedding`).
    """

    cardinalities: tuple[int, ...]
    num_dense: int
    bag_cardinalities: tuple[int, ...] = ()
    bag_length: int = 0

    @property
    def num_sparse(self) -> int:
        """F: single-hot categorical fields (the width of `sparse`)."""
        return len(self.cardinalities)

    @property
    def num_fields(self) -> int:
        """F + S: every field a model embeds (single-hot, then multi-hot)."""
        return len(self.cardinalities) + len(self.bag_cardinalities)

    @property
    def total_vocab(self) -> int:
        return int(sum(self.cardinalities) + sum(self.bag_cardinalities))


@dataclasses.dataclass(frozen=True)
class RankingSpec(CTRFeatureSpec):
    """Shapes of a ranking batch: a CTR batch whose last single-hot field is the candidate item
    and whose bags are the user's S behaviour sequences, with their events' actions and times.

      sparse          int32 [B, F]        NS features; sparse[:, -1] = candidate item (1..num_items)
      dense           float32 [B, D]
      history         int32 [B, S, L]     items, RIGHT-aligned (padding 0 first, most recent last)
      history_actions int32 [B, S, L]     action of each event (0..num_actions-1; 0 on padding)
      history_times   int32 [B, S, L]     event times in seconds (0 on padding)
      request_time    int32 [B]           the impression's time
      label           float32 [B]

    CTR families read sparse, dense and history (pooled as multi-hot fields); ranking families
    (OneTrans, DIN, HSTU as a ranker) read the sequences event by event.
    """

    num_items: int = 0
    num_actions: int = 3

    @property
    def num_sequences(self) -> int:
        return len(self.bag_cardinalities)

    @property
    def seq_len(self) -> int:
        return self.bag_length


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
