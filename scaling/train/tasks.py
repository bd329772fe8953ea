"""What a run optimizes and how it is evaluated, per kind of data set: click prediction or next item.

The training loop is the same for every family; a task supplies the parts that differ:

    task.loss(model, batch) -> scalar            the training objective (traced in the jitted step)
    task.eval_outputs(model, batch) -> array     what evaluation reads (traced in the eval step)
    task.train_iterator(batch_size, seed, rows)  grain iterator of fixed-shape train batches (rows:
                                                 this process's positions in each global batch)
    task.abstract_batch(batch_size, sharding)    shapes of a train batch (to compile the step)
    task.evaluate(eval_fn) -> metrics            the held-out metrics (valid_* select, test_* report)
    task.selection                               (metric, 'min' | 'max') that picks the best eval

`CTRTask`: logits [B], sigmoid cross-entropy; logloss, NE, AUC on the fixed held-out set.
`NextItemTask`: the model's `training_loss` (sampled softmax of its queries [B, L, D] against the
item table by default) and `catalogue_scores`; evaluation ranks the full catalogue for each eval
user's validation and test item.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling.config import RunConfig
from scaling.train import metrics as M

EvalFn = Callable[[dict[str, np.ndarray]], Any]  # host batch -> device outputs


def _pad_rows(chunk: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """Pad a short last chunk to the compiled batch size by repeating its last row."""
    pad = size - len(next(iter(chunk.values())))
    if pad:
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
    return chunk, pad


@dataclasses.dataclass
class CTRTask:
    """Click prediction on a CTR data set (synthetic or real).

    A data set with its own valid and test files (`eval_splits`, e.g. Criteo) adds their AUC and NE
    (valid_*, test_*), reports the test file's numbers as logloss/ne/auc, and picks evaluations
    by its `SELECTION` (valid_logloss) instead of the whole held-out set's logloss.
    """

    dataset: Any
    eval_batch_size: int
    reference_logloss: float | None
    selection: tuple[str, str] = ("logloss", "min")
    keys: tuple[str, ...] = ("sparse", "dense")

    @functools.cached_property
    def _reference(self) -> dict[str, float]:
        return self.dataset.reference_metrics()

    def loss(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
        logits = model(batch).astype(jnp.float32)
        return optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()

    def eval_outputs(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
        return model(batch).astype(jnp.float32)

    def train_iterator(self, batch_size: int, seed: int, rows=None):
        # Data read from files is shuffled by the run's seed; the synthetic stream has one order.
        if getattr(self.dataset, "SEEDED_ORDER", False):
            return self.dataset.train_iterator(batch_size, seed=seed, rows=rows)
        return self.dataset.train_iterator(batch_size, rows=rows)

    def abstract_batch(self, batch_size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
        arrays = self.dataset.eval_arrays()
        return {k: jax.ShapeDtypeStruct((batch_size,) + arrays[k].shape[1:], arrays[k].dtype, sharding=sharding)
                for k in (*self.keys, "label") if k in arrays}

    def evaluate(self, eval_fn: EvalFn) -> dict[str, float]:
        arrays = self.dataset.eval_arrays()
        reference = self._reference
        keys = [k for k in self.keys if k in arrays]
        n = len(arrays["label"])
        logits = []
        for start in range(0, n, self.eval_batch_size):
            chunk, pad = _pad_rows({k: arrays[k][start : start + self.eval_batch_size] for k in keys}, self.eval_batch_size)
            logits.append(np.asarray(eval_fn(chunk))[: self.eval_batch_size - pad])
        scores = np.concatenate(logits)
        labels, probs = arrays["label"], arrays.get("prob")
        result = M.ctr_metrics(labels, scores, base_rate=reference.get("base_rate"))
        if "bayes_logloss" in reference:
            result["excess_logloss"] = result["logloss"] - reference["bayes_logloss"]
        if probs is not None:
            result["teacher_logloss"] = M.teacher_logloss_from_logits(probs, scores)
        # Selection (e.g. the best lr of a sweep) reads valid_*, the scaling curve test_*: the eval
        # set's halves, or the data set's own valid and test files (`eval_splits`, real data).
        files = self.dataset.eval_splits() if hasattr(self.dataset, "eval_splits") else None
        for half, rows in (files or M.split_halves(n)).items():
            result[f"{half}_logloss"] = M.logloss_from_logits(labels[rows], scores[rows])
            if probs is not None:
                result[f"{half}_teacher_logloss"] = M.teacher_logloss_from_logits(probs[rows], scores[rows])
            if files is not None:
                result.update({f"{half}_{k}": v for k, v in M.ctr_metrics(labels[rows], scores[rows]).items()})
        if files is not None:  # the reported numbers are the test file's, not the valid + test mix
            result.update({k: result[f"test_{k}"] for k in ("logloss", "ne", "auc")})
        if self.reference_logloss is not None:
            result["relative_logloss_pct"] = M.relative_logloss(result["logloss"], self.reference_logloss)
        return result


@dataclasses.dataclass
class NextItemTask:
    """Next-item prediction on a timeline data set (HSTU, SASRec, ...)."""

    dataset: Any
    max_len: int
    temperature: float
    eval_batch_size: int
    targets: str = "next"
    selection: tuple[str, str] = ("valid_ndcg@10", "max")
    keys: tuple[str, ...] = ("items", "timestamps", "next_timestamps", "lengths", "users")

    def loss(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
        return model.training_loss(batch, self.temperature)

    def eval_outputs(self, model, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Scores [B, num_items + 1] of every item for each eval user (the model's `catalogue_scores`)."""
        return model.catalogue_scores(batch, self.temperature)

    def train_iterator(self, batch_size: int, seed: int, rows=None):
        return self.dataset.train_iterator(batch_size, self.max_len, seed, targets=self.targets, rows=rows)

    def abstract_batch(self, batch_size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
        example = self.dataset.batches(self.max_len, targets=self.targets).train_batch(0, 1)
        return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sharding)
                for k, v in example.items()}

    def evaluate(self, eval_fn: EvalFn) -> dict[str, float]:
        def score(batch: dict[str, np.ndarray]) -> np.ndarray:
            chunk, pad = _pad_rows({k: batch[k] for k in self.keys}, self.eval_batch_size)
            return np.asarray(eval_fn(chunk))[: self.eval_batch_size - pad]

        result: dict[str, float] = {}
        for stage in ("valid", "test"):
            metrics = self.dataset.evaluate(score, stage, self.max_len, self.eval_batch_size)
            result.update({f"{stage}_{k}": v for k, v in metrics.items()})
        result.update({k[len("test_"):]: v for k, v in result.items() if k.startswith("test_")})
        return result


def make_task(config: RunConfig, dataset, reference_logloss: float | None):
    """The task of a run, from its data set's kind (`RunConfig.check` matched it to the model's)."""
    if getattr(dataset, "TASK", "ctr") == "next_item":
        return NextItemTask(dataset, max_len=config.model.max_len, temperature=getattr(config.model, "temperature", 1.0),
                            eval_batch_size=config.train.eval_batch_size, targets=type(config.model).TARGETS)
    return CTRTask(dataset, eval_batch_size=config.train.eval_batch_size, reference_logloss=reference_logloss,
                   keys=getattr(dataset, "BATCH_KEYS", CTRTask.keys),
                   selection=getattr(dataset, "SELECTION", CTRTask.selection))
