"""Next-item data sets for the sequential track: a timeline log, its leave-one-out split, batches.

    data:
      name: interactions            # a file: Amazon/SASRec lines, GroupLens MovieLens, RecBole .inter
      path: data/Beauty.txt
      num_negatives: 128            # sampled negatives per position (0: none)
      negatives: uniform            # or in_batch
      exclude_seen: true            # rank the full catalogue without the user's history

`SequenceDataset` is what the training loop uses for every next-item family: train batches for a
model's `max_len` (`SequenceBatches`, grain), the eval users, full-catalogue evaluation of the
validation or test item through `evaluate_retrieval`, and reference numbers (popularity, and an
oracle ceiling when the data come from a known process).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np

from scaling.config import DataConfig
from scaling.config_schema import ConfigError, knob
from scaling.data.interactions import Format, Interactions, load_interactions
from scaling.data.leave_one_out import Stage, leave_one_out
from scaling.data.registry import register_data
from scaling.data.sequence_batches import SequenceBatches
from scaling.data.spec import SequenceSpec, TrainingEvents
from scaling.train.retrieval_eval import Scorer, evaluate_retrieval

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SequenceDataConfig(DataConfig):
    """Knobs shared by next-item data sets (each registered subclass names itself and its source)."""

    TASK: ClassVar[str] = "next_item"

    name: str = knob("", help="data set")
    num_negatives: int = knob(128, ge=0, help="sampled negatives per position (the research code's 128)")
    negatives: Literal["uniform", "in_batch"] = knob(
        "uniform", help="uniform over the catalogue, or drawn from the batch's own targets"
    )
    shared_negatives: bool = knob(False, help="one negative draw per sequence, used at every position")
    exclude_seen: bool = knob(True, help="evaluation ranks the catalogue without the user's history")
    eval_users: int = knob(0, ge=0, help="evaluate a fixed random subset of this many users; 0 = all")

    def load(self) -> tuple[Interactions, dict[str, float], Callable[[Stage], Scorer] | None]:
        """(log, reference numbers of the source, oracle scorer per stage or None)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def build(self) -> SequenceDataset:
        log, reference, oracle = self.load()
        return SequenceDataset(self, log, reference, oracle)

    def catalogue_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_spec(self, *, with_training_graph: bool = False) -> SequenceSpec:
        """The batch spec without building batches (FLOPs and sweep plans need the catalogue size).

        with_training_graph: load the data and split it, so the spec carries the training graph
        (what a graph model's FLOPs depend on); cached per data config."""
        if with_training_graph:
            return _spec_with_training_graph(self)
        return SequenceSpec(num_items=self.catalogue_size(), num_negatives=self.num_negatives,
                            shared_negatives=self.shared_negatives)


@register_data("interactions")
@dataclasses.dataclass(frozen=True)
class InteractionsConfig(SequenceDataConfig):
    """User-item timelines read from a file (see `scaling.data.interactions` for the formats)."""

    name: Literal["interactions"] = knob("interactions", help="data set")
    path: str = knob("", help="the interactions file (Amazon/SASRec lines, ratings.dat, u.data, .inter)")
    format: Format = knob("auto", help="file format; auto detects it from the name and first line")

    def check(self) -> None:
        if not self.path:
            raise ConfigError("path", "expected the path of an interactions file")
        if not os.path.isfile(self.path):
            raise ConfigError("path", f"{self.path}: no such file")

    def load(self):
        return _load_file(self.path, self.format), {}, None

    def catalogue_size(self) -> int:
        return _load_file(self.path, self.format).num_items


@functools.lru_cache(maxsize=2)
def _load_file(path: str, fmt: Format) -> Interactions:
    return load_interactions(path, fmt)


class SequenceDataset:
    """A timeline log split leave-one-out, as the training loop and the baselines use it."""

    TASK = "next_item"

    def __init__(self, config: SequenceDataConfig, log: Interactions, source_reference: dict[str, float],
                 oracle: Callable[[Stage], Scorer] | None = None):
        self.config = config
        self.log = _int32_times(log)
        self.split = leave_one_out(self.log)
        self.spec = SequenceSpec(num_items=self.log.num_items, num_negatives=config.num_negatives,
                                 shared_negatives=config.shared_negatives, num_users=self.log.num_users,
                                 training_events=training_events(self.split))
        self.source_reference = dict(source_reference)
        self.oracle = oracle
        users = self.split.eval_users
        if config.eval_users and config.eval_users < len(users):  # a fixed subset, the same every run
            users = np.sort(np.random.default_rng(0).choice(users, config.eval_users, replace=False))
        self.eval_users = users

    def batches(self, max_len: int, seed: int = 0, targets: str = "next") -> SequenceBatches:
        return SequenceBatches(self.split, max_len=max_len, num_negatives=self.config.num_negatives, seed=seed,
                               negatives=self.config.negatives, shared_negatives=self.config.shared_negatives,
                               targets=targets)

    def train_iterator(self, batch_size: int, max_len: int, seed: int = 0, *, targets: str = "next", prefetch: int = 2,
                       rows=None):
        """Infinite, checkpointable grain iterator of train batches (`SequenceBatches.train_batch`;
        rows: only those positions of each batch)."""
        return self.batches(max_len, seed, targets).train_iterator(batch_size, prefetch=prefetch, rows=rows)

    def evaluate(self, score: Scorer, stage: Stage, max_len: int, batch_size: int) -> dict[str, float]:
        """Full-catalogue ranking metrics of `score` on the eval users' `stage` targets."""
        return evaluate_retrieval(self.batches(max_len), score, stage, batch_size=batch_size,
                                  exclude_seen=self.config.exclude_seen, users=self.eval_users)

    @functools.cached_property
    def _reference(self) -> dict[str, float]:
        from scaling.models.baselines.popularity import popularity_scorer

        log = self.log
        out = {
            "users": float(log.num_users),
            "items": float(log.num_items),
            "interactions": float(log.num_interactions),
            "mean_length": float(log.lengths.mean()),
            "eval_users": float(len(self.eval_users)),
            **self.source_reference,
        }
        scorers = {"popularity": lambda stage: popularity_scorer(self.split)}
        if self.oracle is not None:
            scorers["oracle"] = self.oracle
        for name, make in scorers.items():
            for stage in ("valid", "test"):
                metrics = self.evaluate(make(stage), stage, max_len=1, batch_size=1024)
                for key in ("hr@10", "ndcg@10", "mrr"):
                    out[f"{stage}_{name}_{key}"] = metrics[key]
        return out

    def reference_metrics(self) -> dict[str, float]:
        """Sizes of the data, and popularity's (and the oracle's, when known) valid/test metrics."""
        return dict(self._reference)


def training_events(split) -> TrainingEvents:
    """The distinct (user, item) pairs of the split's training events, with their counts."""
    log = split.log
    lengths = split.train_end - log.offsets[:-1]
    users = np.repeat(np.arange(log.num_users, dtype=np.int64), lengths)
    items = np.concatenate([log.items[a:b] for a, b in zip(log.offsets[:-1], split.train_end)]).astype(np.int64)
    pairs, counts = np.unique(users * (log.num_items + 1) + items, return_counts=True)
    return TrainingEvents(users=(pairs // (log.num_items + 1)).astype(np.int32),
                          items=(pairs % (log.num_items + 1)).astype(np.int32), counts=counts.astype(np.int32))


def _int32_times(log: Interactions) -> Interactions:
    """Timestamps that fit int32 (the model's dtype): shifted to start at 0 when they do not."""
    if log.num_interactions == 0 or (log.timestamps.min() >= 0 and log.timestamps.max() <= _INT32_MAX):
        return log
    shifted = log.timestamps - log.timestamps.min()
    if shifted.max() > _INT32_MAX:
        raise ConfigError("data.path", f"{log.source}: timestamps span more than 2^31 units; expected seconds")
    return dataclasses.replace(log, timestamps=shifted)


@functools.lru_cache(maxsize=4)
def _spec_with_training_graph(config: SequenceDataConfig) -> SequenceSpec:
    return config.build().spec
