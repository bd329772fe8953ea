"""A CTR data set held as encoded arrays on disk: shuffled grain batches, valid/test arrays, statistics.

`EncodedCTR` is what the training loop uses for the Kaggle-format data sets (`kaggle_ctr.prepare`
writes its arrays). It has the synthetic CTR data set's duck type (`spec`, `train_iterator`,
`eval_arrays`, `reference_metrics`) plus:

    eval_splits()   {'valid': rows, 'test': rows} of eval_arrays(): separate files, not halves
    SEEDED_ORDER    the train order follows the run's seed (CTRTask passes it)
    SELECTION       ('valid_logloss', 'min'): the valid file picks the best evaluation

Train order. The train rows are visited in a fresh seeded permutation every epoch, and batch j is
train examples [jB, (j+1)B) of that endless shuffled stream (a batch may straddle two epochs), so
batch j is a pure function of (seed, j): the grain iterator's state is one integer
(`{'next_index': j}`) and resuming is exact. The permutations are numpy's (one int32 per row,
two epochs cached): grain's lazy `MapDataset.shuffle` costs ~12 us per example in Python, a
bottleneck at the tens of thousands of examples per second a GPU step takes. The train arrays are
memmaps: a batch reads its B rows only, gathered in ascending row order so reads stay sequential;
a process of a multi-host run reads only its share of them (`rows`), so the processes read
disjoint rows of every batch.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from scaling.data.kaggle_ctr import SPLITS
from scaling.data.pipeline import batch_iterator, batch_rows
from scaling.data.spec import CTRFeatureSpec
from scaling.train.metrics import base_rate_entropy

__all__ = ["EncodedCTR"]


def _load(directory: str, split: str, rows: int, num_dense: int) -> dict[str, np.ndarray]:
    """{'sparse' int32 [N, F], 'dense' float32 [N, D], 'label' float32 [N]} as read-only memmaps."""
    arrays = {k: np.load(os.path.join(directory, f"{split}.{k}.npy"), mmap_mode="r")[:rows]
              for k in ("sparse", "label")}
    if num_dense:
        arrays["dense"] = np.load(os.path.join(directory, f"{split}.dense.npy"), mmap_mode="r")[:rows]
    else:
        arrays["dense"] = np.zeros((rows, 0), np.float32)
    return arrays


class EncodedCTR:
    """Train/valid/test CTR arrays (see the module docstring)."""

    SEEDED_ORDER = True
    SELECTION = ("valid_logloss", "min")

    def __init__(self, spec: CTRFeatureSpec, splits: dict[str, dict[str, np.ndarray]], meta: dict | None = None):
        self.spec = spec
        self.train = splits["train"]
        self.valid, self.test = splits["valid"], splits["test"]
        self.meta = meta or {}
        self.num_train = len(self.train["label"])
        self._lock = threading.Lock()  # grain's prefetch threads share the permutation cache

    @classmethod
    def open(cls, meta: dict) -> EncodedCTR:
        """The data set of a `kaggle_ctr.prepare` result (its cache directory and meta.json)."""
        num_dense = len(meta["dense"])
        splits = {s: _load(meta["directory"], s, meta["splits"][s]["rows"], num_dense) for s in SPLITS}
        spec = CTRFeatureSpec(cardinalities=tuple(meta["cardinalities"]), num_dense=num_dense)
        return cls(spec, splits, meta)

    # -- training --------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=2)
    def _permutation_unlocked(self, seed: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch, 0xC7])
        dtype = np.int32 if self.num_train < 2**31 else np.int64
        return rng.permutation(np.arange(self.num_train, dtype=dtype))

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        with self._lock:
            return self._permutation_unlocked(seed, epoch)

    def train_rows(self, j: int, batch_size: int, seed: int = 0) -> np.ndarray:
        """int64 [B]: the train rows of batch j (examples [jB, (j+1)B) of the shuffled stream)."""
        if j < 0 or batch_size < 1:
            raise ValueError(f"need j >= 0 and batch_size >= 1, got j={j}, batch_size={batch_size}")
        k = np.arange(j * batch_size, (j + 1) * batch_size, dtype=np.int64)
        epoch, position = np.divmod(k, self.num_train)
        rows = np.empty(batch_size, np.int64)
        for e in np.unique(epoch):
            mask = epoch == e
            rows[mask] = self._permutation(seed, int(e))[position[mask]]
        return rows

    def batch(self, j: int, batch_size: int, seed: int = 0, rows=None) -> dict[str, np.ndarray]:
        """Train batch j: {'sparse' int32 [B, F], 'dense' float32 [B, D], 'label' float32 [B]}; with
        `rows`, only those positions of it (one process's share: only its rows are read)."""
        train_rows = np.sort(self.train_rows(j, batch_size, seed))  # sequential reads; the order in a batch is immaterial
        if rows is not None:
            train_rows = train_rows[batch_rows(batch_size, rows)]
        return {k: np.ascontiguousarray(v[train_rows]) for k, v in self.train.items()}

    def train_iterator(self, batch_size: int, seed: int = 0, *, prefetch: int = 2, num_threads: int = 1,
                       start_batch: int = 0, rows=None):
        """Infinite, checkpointable grain iterator of `batch(j, batch_size, seed, rows)`, j = start_batch, ...

        `get_state()` / `set_state()` save and restore the position ({'next_index': j - start_batch}).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = None if rows is None else batch_rows(batch_size, rows)
        return batch_iterator(functools.partial(self.batch, batch_size=int(batch_size), seed=int(seed), rows=rows),
                              start=start_batch, prefetch=prefetch, num_threads=num_threads)

    # -- evaluation ------------------------------------------------------------------------------
    @functools.cached_property
    def _eval(self) -> dict[str, np.ndarray]:
        arrays = {k: np.concatenate([np.asarray(self.valid[k]), np.asarray(self.test[k])]) for k in self.valid}
        for a in arrays.values():
            a.setflags(write=False)
        return arrays

    def eval_arrays(self) -> dict[str, np.ndarray]:
        """The valid rows then the test rows: {'sparse', 'dense', 'label'} (in memory)."""
        return dict(self._eval)

    def eval_splits(self) -> dict[str, slice]:
        """Rows of `eval_arrays()` per held-out file: valid (selection) and test (reported)."""
        n_valid = len(self.valid["label"])
        return {"valid": slice(0, n_valid), "test": slice(n_valid, n_valid + len(self.test["label"]))}

    def reference_metrics(self) -> dict[str, float]:
        """What the run record keeps about the data (`data_reference`):

        {split}_rows_read / _rows_rejected / _rows (kept), {split}_click_rate, {split}_oov_fraction
        (share of categorical values mapped to OOV), valid/test_constant_logloss (logloss of
        predicting the train click rate), valid/test_entropy (the entropy of the split's own click
        rate: NE's denominator), vocab_total and vocab_<field> (ids per field),
        vocab_distinct_total (distinct non-empty train values before min_count), num_fields, num_dense.
        """
        out: dict[str, float] = {}
        splits = self.meta.get("splits", {})
        train_rate = float(np.mean(self.train["label"])) if self.num_train else float("nan")
        for split in SPLITS:
            s = splits.get(split)
            if s is None:
                continue
            out[f"{split}_rows_read"] = float(s["rows_read"])
            out[f"{split}_rows_rejected"] = float(s["rows_rejected"])
            out[f"{split}_rows"] = float(s["rows"])
            out[f"{split}_click_rate"] = s["clicks"] / max(s["rows"], 1)
            out[f"{split}_oov_fraction"] = s["oov_values"] / max(s["rows"] * self.spec.num_sparse, 1)
        for split, arrays in (("valid", self.valid), ("test", self.test)):
            y = np.asarray(arrays["label"], np.float64)
            p = min(max(train_rate, 1e-12), 1 - 1e-12)
            out[f"{split}_constant_logloss"] = float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())
            out[f"{split}_entropy"] = base_rate_entropy(float(y.mean()))
        fields = self.meta.get("fields") or [f"f{i}" for i in range(self.spec.num_sparse)]
        for name, card in zip(fields, self.spec.cardinalities):
            out[f"vocab_{name}"] = float(card)
        out["vocab_total"] = float(self.spec.total_vocab)
        if self.meta.get("distinct"):
            out["vocab_distinct_total"] = float(sum(self.meta["distinct"]))
        out["num_fields"] = float(self.spec.num_sparse)
        out["num_dense"] = float(self.spec.num_dense)
        return out
