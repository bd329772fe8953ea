"""The contract of classical baselines that are fitted in closed form or by their own solver rather
than trained by the gradient loop: popularity, neighbourhood methods, implicit ALS, Funk MF.

A fitted family is a frozen config class registered with `register_fitted(name)`:

    @register_fitted("item_knn")
    @dataclasses.dataclass(frozen=True)
    class ItemKNNConfig(FittedModelConfig):
        name: Literal["item_knn"] = knob("item_knn")
        neighbours: int = knob(100, ge=1)
        def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted: ...

`fit` sees only the split's training events (each user's events before the validation item;
`training_matrix(split)`). The returned `Fitted.score` is a scorer for `evaluate_retrieval`: an
evaluation batch (`SequenceBatches.eval_batch`: items [B, L] left-aligned 0-padded, lengths [B],
users [B], timestamps, target_timestamp) -> float scores [B, num_items + 1], column 0 the padding
id (never ranked). The history in the batch is the user's whole history before the target (the
runner evaluates fitted baselines with L = the longest history), so a neighbourhood method or an
ALS fold-in reads the validation item when it ranks the test item, as the sequence models do.

`scaling train` runs a fitted family through `scaling.train.fit_run`: fit, evaluate valid and test
with the same code as HSTU and SASRec, write the same run record (fit time and memory included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from scaling.config import ModelConfig
from scaling.data.leave_one_out import LeaveOneOut
from scaling.data.spec import SequenceSpec

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a fit produced.

    score:      eval batch -> float [B, num_items + 1] (column 0 ignored)
    parameters: learned numbers kept for scoring (factors, biases, stored similarities)
    scoring_flops: FLOPs to score one user against the whole catalogue (2 per multiply-add)
    details:    solver facts worth recording (iterations, final loss, density, ...)
    """

    score: Scorer
    parameters: int
    scoring_flops: float
    details: dict[str, float] = dataclasses.field(default_factory=dict)


class FittedModelConfig(ModelConfig):
    """Base of fitted baseline configs (next-item data only)."""

    TASK: ClassVar[str] = "next_item"
    FITTED: ClassVar[bool] = True

    def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted:  # pragma: no cover - abstract
        raise NotImplementedError

    # The training loop's model contract, for records and sweep plans: a fitted baseline has no
    # training forward pass; it is placed on plots by its scoring cost.
    def flops_per_example(self, spec: SequenceSpec) -> float:
        return 0.0

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        return 0.0


def training_matrix(split: LeaveOneOut, *, binary: bool = True, values: np.ndarray | None = None) -> sp.csr_matrix:
    """The users x (num_items + 1) sparse matrix of training events (column 0, padding, empty).

    binary: 1 where the user had the item (repeats count once); otherwise the event counts, or the
    sum of `values` [num_interactions] (e.g. ratings) over repeats."""
    log = split.log
    starts = log.offsets[:-1]
    counts = split.train_end - starts
    rows = np.repeat(np.arange(log.num_users), counts)
    keep = np.concatenate([np.arange(s, e) for s, e in zip(starts, split.train_end)]) if len(rows) else np.zeros(0, np.int64)
    cols = log.items[keep].astype(np.int64)
    data = np.ones(len(keep)) if values is None else np.asarray(values, np.float64)[keep]
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(log.num_users, log.num_items + 1))
    matrix.sum_duplicates()
    if binary:
        matrix.data[:] = 1.0
    return matrix


def history_matrix(batch: dict[str, np.ndarray], num_items: int) -> sp.csr_matrix:
    """Binary B x (num_items + 1) sparse matrix of each evaluation row's history items."""
    items, lengths = batch["items"], batch["lengths"]
    rows = np.repeat(np.arange(len(items)), lengths)
    cols = np.concatenate([items[b, :n] for b, n in enumerate(lengths)]).astype(np.int64) if rows.size else np.zeros(0, np.int64)
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(items), num_items + 1))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix
