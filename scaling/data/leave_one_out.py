"""Leave-one-out splits of interaction timelines (the protocol of SASRec, HSTU and most sequential papers).

For a user with n >= 3 events: the last item is the test target (its history: the n - 1 before
it), the second-to-last the validation target (history: the n - 2 before it), and training sees
the first n - 2. Users with fewer than 3 events only train. Model selection (the best epoch) reads
the validation targets; reported numbers are on the test targets.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from scaling.data.interactions import Interactions

Stage = Literal["valid", "test"]


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """log: the full timelines; train_end [U]: absolute end (exclusive) of each user's training
    events; eval_users [E]: users that have a validation and a test target."""

    log: Interactions
    train_end: np.ndarray
    eval_users: np.ndarray

    def train_sequence(self, user: int) -> np.ndarray:
        return self.log.items[self.log.offsets[user] : self.train_end[user]]

    def case(self, user: int, stage: Stage) -> tuple[np.ndarray, int]:
        """(history items, target item) of `user` for the validation or test stage."""
        end = int(self.log.offsets[user + 1]) - (2 if stage == "valid" else 1)
        return self.log.items[self.log.offsets[user] : end], int(self.log.items[end])

    def targets(self, stage: Stage) -> np.ndarray:
        """int32 [E]: the target item of each eval user."""
        shift = 2 if stage == "valid" else 1
        return self.log.items[self.log.offsets[self.eval_users + 1] - shift]


def leave_one_out(log: Interactions) -> LeaveOneOut:
    lengths = log.lengths
    has_eval = lengths >= 3
    train_end = np.where(has_eval, log.offsets[1:] - 2, log.offsets[1:]).astype(np.int64)
    return LeaveOneOut(log=log, train_end=train_end, eval_users=np.flatnonzero(has_eval))
