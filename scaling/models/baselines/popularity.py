"""Most-popular: every user gets the items most interacted with in training (a sanity floor)."""

from __future__ import annotations

import numpy as np

from scaling.data.leave_one_out import LeaveOneOut


def popularity_scores(split: LeaveOneOut) -> np.ndarray:
    """float64 [num_items + 1]: training interactions per item (validation and test events excluded)."""
    log = split.log
    keep = np.zeros(log.num_interactions, dtype=bool)
    for u in range(log.num_users):  # each user's training prefix
        keep[log.offsets[u] : split.train_end[u]] = True
    return np.bincount(log.items[keep], minlength=log.num_items + 1).astype(np.float64)


def popularity_scorer(split: LeaveOneOut):
    """A scorer for `evaluate_retrieval`: the same popularity scores for every user."""
    scores = popularity_scores(split)
    return lambda batch: np.broadcast_to(scores, (len(batch["target"]), scores.size))
