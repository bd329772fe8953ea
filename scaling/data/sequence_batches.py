"""Fixed-shape batches of user timelines for next-item models (HSTU, SASRec), through grain.

Training (every position predicts the next item), for each user's leave-one-out training events
e_1..e_n truncated to the most recent max_len + 1:

    items       int32 [B, L]     e_1..e_{n-1}, left-aligned, 0-padded
    timestamps  int32 [B, L]     their timestamps (seconds; int32 holds unix time until 2038)
    targets     int32 [B, L]     e_2..e_n (the next item at each position; 0 where padded)
    next_timestamps int32 [B, L] the targets' timestamps (HSTU's time bias looks at the next event)
    lengths     int32 [B]        valid positions
    actions     int32 [B, L]     the input events' action types (0 where the log has none)
    users       int32 [B]        the users (models with a user embedding read them)
    negatives   int32 [B, L, M]  per position (M = num_negatives): `uniform` over 1..num_items (the
                                 research code's sampler), or `in_batch`: drawn uniformly from the
                                 batch's valid targets (popularity-shaped, no logQ correction);
                                 [B, 1, M] when shared_negatives: one draw per sequence, used at
                                 every position (50x less gathering at L = 50; the scores become
                                 one [L, D] x [D, M] matmul per sequence)

With targets="all" (user-item models such as BPR-MF, and BERT4Rec's Cloze objective) a row holds
the user's most recent L training events e_{n-L+1}..e_n and `targets` equals `items`: every
training event is a positive for its user, none is an input only.

Batch j is a pure function of j (epoch j // batches_per_epoch, a seeded permutation of the users
per epoch; the last batch of an epoch wraps to the permutation's start), so the grain iterator's
state is one integer and resuming is exact. Evaluation batches hold each eval user's history for
the validation or test target, plus the untruncated history for excluding seen items.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from scaling.data.leave_one_out import LeaveOneOut, Stage
from scaling.data.pipeline import batch_iterator, batch_rows


@dataclasses.dataclass(frozen=True)
class SequenceBatches:
    split: LeaveOneOut
    max_len: int
    num_negatives: int = 0
    seed: int = 0
    negatives: str = "uniform"
    shared_negatives: bool = False
    targets: str = "next"

    def __post_init__(self):
        if self.max_len < 1 or self.num_negatives < 0:
            raise ValueError(f"need max_len >= 1 and num_negatives >= 0, got {self.max_len}, {self.num_negatives}")
        if self.negatives not in ("uniform", "in_batch"):
            raise ValueError(f"negatives must be 'uniform' or 'in_batch', got {self.negatives!r}")
        if self.targets not in ("next", "all"):
            raise ValueError(f"targets must be 'next' or 'all', got {self.targets!r}")

    @property
    def train_users(self) -> np.ndarray:
        """Users with at least two training events (one input, one target); one with targets="all"."""
        log = self.split.log
        return np.flatnonzero(self.split.train_end - log.offsets[:-1] >= (2 if self.targets == "next" else 1))

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train_users) / batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.train_users)

    def train_batch(self, j: int, batch_size: int, rows=None) -> dict[str, np.ndarray]:
        """Train batch j of `batch_size` users; with `rows`, only those positions of it (one
        process's share of the global batch: only its users' timelines are read). Negatives are
        drawn for the whole batch and cut to `rows`, so the shares add up to the whole batch."""
        per_epoch = self.batches_per_epoch(batch_size)
        order = self._epoch_order(j // per_epoch)
        start = (j % per_epoch) * batch_size
        users = np.take(order, np.arange(start, start + batch_size), mode="wrap")
        mine = users if rows is None else users[batch_rows(batch_size, rows)]
        out = self._timelines(mine)
        if self.num_negatives:
            rng = np.random.default_rng((self.seed, 1, j))
            shape = (batch_size, 1 if self.shared_negatives else self.max_len, self.num_negatives)
            if self.negatives == "uniform":
                negatives = rng.integers(1, self.split.log.num_items + 1, size=shape, dtype=np.int32)
            else:  # the pool is the whole batch's targets, whichever share this is
                targets = out["targets"] if rows is None else self._timelines(users)["targets"]
                negatives = rng.choice(targets[targets > 0], size=shape).astype(np.int32)
            out["negatives"] = negatives if rows is None else negatives[batch_rows(batch_size, rows)]
        return out

    def _timelines(self, users: np.ndarray) -> dict[str, np.ndarray]:
        """The train rows (items, timestamps, targets, next_timestamps, lengths, actions, users) of `users`."""
        log, L, B = self.split.log, self.max_len, len(users)
        out = {
            "items": np.zeros((B, L), np.int32),
            "timestamps": np.zeros((B, L), np.int32),
            "targets": np.zeros((B, L), np.int32),
            "next_timestamps": np.zeros((B, L), np.int32),
            "lengths": np.zeros(B, np.int32),
            "actions": np.zeros((B, L), np.int32),
            "users": users.astype(np.int32),
        }
        actions = log.actions
        shift = 1 if self.targets == "next" else 0  # "all": the targets are the inputs themselves
        for b, u in enumerate(users):
            hi = int(self.split.train_end[u])
            lo = max(int(log.offsets[u]), hi - (L + shift))
            hi -= shift
            n = hi - lo
            out["items"][b, :n] = log.items[lo:hi]
            out["timestamps"][b, :n] = log.timestamps[lo:hi]
            out["targets"][b, :n] = log.items[lo + shift : hi + shift]
            out["next_timestamps"][b, :n] = log.timestamps[lo + shift : hi + shift]
            out["lengths"][b] = n
            if actions is not None:
                out["actions"][b, :n] = actions[lo:hi]
        return out

    def train_iterator(self, batch_size: int, *, start: int = 0, prefetch: int = 2, rows=None):
        """Infinite, prefetched, checkpointable iterator over train batches `start`, `start + 1`, ...
        (rows: only those positions of each)."""
        rows = None if rows is None else batch_rows(batch_size, rows)
        return batch_iterator(lambda j: self.train_batch(j, batch_size, rows), start=start, prefetch=prefetch)

    def eval_batch(self, users: np.ndarray, stage: Stage) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """(batch, seen): the history before each user's `stage` target, truncated to max_len, the
        target, its timestamp, the user ids; and each user's untruncated history (items to exclude
        from ranking). `next_timestamps` is the shifted timestamps with the target's time (the
        request time) at the last valid position, the train batches' convention."""
        log, L, B = self.split.log, self.max_len, len(users)
        out = {
            "items": np.zeros((B, L), np.int32),
            "timestamps": np.zeros((B, L), np.int32),
            "next_timestamps": np.zeros((B, L), np.int32),
            "lengths": np.zeros(B, np.int32),
            "actions": np.zeros((B, L), np.int32),
            "target": np.zeros(B, np.int32),
            "target_timestamp": np.zeros(B, np.int32),
            "users": np.asarray(users, np.int32),
        }
        seen = []
        for b, u in enumerate(users):
            history, target = self.split.case(int(u), stage)
            end = int(log.offsets[u]) + len(history)
            lo = max(int(log.offsets[u]), end - L)
            n = end - lo
            out["items"][b, :n] = log.items[lo:end]
            out["timestamps"][b, :n] = log.timestamps[lo:end]
            out["next_timestamps"][b, :n] = log.timestamps[lo + 1 : end + 1]
            out["lengths"][b] = n
            if log.actions is not None:
                out["actions"][b, :n] = log.actions[lo:end]
            out["target"][b] = target
            out["target_timestamp"][b] = log.timestamps[end]
            seen.append(history)
        return out, seen
