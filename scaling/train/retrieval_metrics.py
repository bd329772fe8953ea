"""Next-item retrieval metrics over the full catalogue: HR@K, NDCG@K, MRR, coverage@K, novelty.

Scores are [B, num_items + 1] with column 0 the padding id (never ranked). The target's rank is
1 + the number of ranked items scoring strictly higher (ties go the target's way, as in a stable
top-k that lists the target first). With `seen` given, a user's history items are removed from
the ranking, except the target itself (a repeat purchase can be the next item).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _masked(scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray] | None) -> np.ndarray:
    scores = np.array(scores, dtype=np.float64, copy=True)
    scores[:, 0] = -np.inf
    if seen is not None:
        for row, (items, target) in enumerate(zip(seen, targets)):
            items = np.asarray(items)
            scores[row, items[items != target]] = -np.inf
    return scores


def target_ranks(scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """int64 [B]: 1-based rank of each target among the catalogue (padding and seen items excluded)."""
    targets = np.asarray(targets)
    masked = _masked(scores, targets, seen)
    target_scores = masked[np.arange(len(targets)), targets]
    return 1 + (masked > target_scores[:, None]).sum(axis=1)


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 200)) -> dict[str, float]:
    """hr@k (target in the top k), ndcg@k (1/log2(rank + 1) inside the top k), mrr (mean 1/rank)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def top_k(scores: np.ndarray, k: int, seen: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """int64 [B, k]: the k best items per row, best first (padding and seen items excluded)."""
    masked = _masked(scores, np.zeros(len(scores), dtype=np.int64), seen)
    k = min(k, masked.shape[1] - 1)  # never more than the catalogue
    part = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(masked, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def coverage(recommended: np.ndarray, num_items: int) -> float:
    """Share of the catalogue (ids 1..num_items) that appears in anyone's top-k list."""
    return float(np.unique(recommended[recommended > 0]).size / num_items)


def novelty(recommended: np.ndarray, popularity: np.ndarray, num_users: int) -> float:
    """Mean self-information -log2(p_i) of recommended items, p_i = users who had item i / users."""
    p = np.clip(popularity[recommended] / max(num_users, 1), 1e-12, 1.0)
    return float(np.mean(-np.log2(p)))
