"""Evaluate any next-item scorer on a leave-one-out split: full-catalogue ranking of each eval user's
validation or test target, in batches, with the metrics of `retrieval_metrics` (every model and
classical baseline of the sequential track goes through this one function)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from scaling.data.sequence_batches import SequenceBatches
from scaling.train.retrieval_metrics import coverage, novelty, ranking_metrics, target_ranks, top_k

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]  # eval batch -> scores [B, num_items + 1]


def evaluate_retrieval(data: SequenceBatches, score: Scorer, stage: str = "test", *, batch_size: int = 512,
                       ks: Sequence[int] = (1, 5, 10, 50, 200), exclude_seen: bool = True,
                       coverage_k: int = 10, users: np.ndarray | None = None) -> dict[str, float]:
    """hr@k, ndcg@k, mrr over the eval users (default: all of the split's), plus coverage@coverage_k
    and novelty of the top lists."""
    split = data.split
    users = split.eval_users if users is None else np.asarray(users)
    ranks, tops = [], []
    for start in range(0, len(users), batch_size):
        batch, seen = data.eval_batch(users[start : start + batch_size], stage)
        scores = np.asarray(score(batch), dtype=np.float64)
        mask = seen if exclude_seen else None
        ranks.append(target_ranks(scores, batch["target"], mask))
        tops.append(top_k(scores, coverage_k, mask))
    result = ranking_metrics(np.concatenate(ranks), ks)
    recommended = np.concatenate(tops)
    result[f"coverage@{coverage_k}"] = coverage(recommended, split.log.num_items)
    result["novelty"] = novelty(recommended, split.log.item_popularity(), split.log.num_users)
    result["users"] = float(len(users))
    return result
