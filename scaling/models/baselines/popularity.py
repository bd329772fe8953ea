"""Most-popular, the sanity floor of every retrieval table, as a fitted family "popularity".

    model: {name: popularity}                     # global: training interactions per item
    model: {name: popularity, window_days: 7}     # recent: interactions in the 7 days before each request

Global popularity counts every training event (validation and test events excluded). The recent
window counts, for each request, the training events of all users in [t - window, t), t the
request's time (its target's timestamp), so a user evaluated in March sees March's hits, not the
year's; it needs a log with a clock (not the line format, whose "timestamps" are positions).
Ties (items never seen in the window) fall back to global popularity, scaled below one event.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from scaling.config_schema import ConfigError, knob
from scaling.data.leave_one_out import LeaveOneOut
from scaling.models.baselines.fitted import Fitted, FittedModelConfig
from scaling.models.registry import register_fitted


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


def recent_popularity_scorer(split: LeaveOneOut, window_seconds: float):
    """A scorer: per request, training events of everyone in [t - window, t), global counts as tie-break."""
    log = split.log
    keep = np.concatenate([np.arange(log.offsets[u], split.train_end[u]) for u in range(log.num_users)])
    order = np.argsort(log.timestamps[keep], kind="stable")
    times, items = log.timestamps[keep][order], log.items[keep][order]
    tiebreak = popularity_scores(split)
    tiebreak = tiebreak / (tiebreak.max() + 1.0)  # < 1: never outranks one event in the window
    size = log.num_items + 1

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        now = batch["target_timestamp"].astype(np.int64)
        lo = np.searchsorted(times, now - window_seconds, side="left")
        hi = np.searchsorted(times, now, side="left")
        return np.stack([np.bincount(items[a:b], minlength=size) + tiebreak for a, b in zip(lo, hi)])

    return score


@register_fitted("popularity")
@dataclasses.dataclass(frozen=True)
class PopularityConfig(FittedModelConfig):
    """Most-popular items, globally or in a window before each request."""

    name: Literal["popularity"] = knob("popularity")
    window_days: float = knob(0.0, ge=0.0, help="count only the events this many days before the request; 0 = all training events")

    def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted:
        size = split.log.num_items + 1
        if self.window_days == 0:
            return Fitted(popularity_scorer(split), parameters=size, scoring_flops=0.0)
        if not split.log.timed:
            raise ConfigError("model.window_days", f"{split.log.source} has no timestamps (line format); "
                              "use window_days: 0 (global popularity)")
        return Fitted(recent_popularity_scorer(split, self.window_days * 86400.0), parameters=0, scoring_flops=0.0,
                      details={"window_days": self.window_days})
