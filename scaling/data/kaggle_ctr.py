"""Kaggle-format CTR files (Criteo, Avazu) -> a vocabulary and encoded arrays, streamed and cached.

    data:
      name: criteo                      # or avazu (scaling/data/criteo.py, scaling/data/avazu.py)
      path: ../shared/data/criteo       # a directory with train/valid/test files, or one file
      min_count: 10                     # rarer values share their field's OOV id
      on_bad_row: error                 # or skip (counted in the run record)

Files. `path` is either a directory holding `train`, `valid` and `test` files (`.txt`/`.tsv` for
Criteo, `.csv` for Avazu, optionally `.gz`), or one file. With one file (or a directory with only a
train file) the rows are split by a hash of their line number: `valid_fraction` and
`test_fraction` of them are held out, the same rows on every machine and every run.
`valid_path` / `test_path` name explicit held-out files beside a train file given as `path`.

Ids. Field f's id 0 is its out-of-vocabulary bucket (values seen fewer than `min_count` times in
the train rows, and values first seen in valid/test), id 1 is its empty (missing) value, and ids
2.. are the kept values by descending train count (ties by value). With `hashing: true` there is no
vocabulary: a value's id is 2 + crc32(field, value) mod (hash_buckets - 2), so every field has
`hash_buckets` ids (0 unused, 1 still the missing value).

Streaming. Files are read line by line, never whole. The vocabulary takes ONE pass over the train
rows; it is cached as JSON keyed by the train file's size and mtime and the knobs that change it.
A second pass per file encodes the rows into `.npy` arrays (sparse int32 [N, F], dense float32
[N, D], label float32 [N]), preallocated from a line count and opened later as memmaps, so the
batches read only the rows they need (`scaling/data/ctr_arrays.py`). Both caches go to
`cache_dir`, by default `<data dir>/.scaling_cache` when that directory is writable (its mode bits
say so: a read-only data folder stays untouched even for root), else
`$XDG_CACHE_HOME/scaling/kaggle_ctr` (`~/.cache/...`). Files are written under temporary names and
renamed into place, so concurrent sweep workers never read a half-written cache.

Bad rows (wrong field count, non-numeric integer field, label not 0/1, bad date): by default the
load stops with one line naming `file:line` and what was expected (`ConfigError`, exit 2 from the
CLI); with `on_bad_row: skip` they are counted per split and skipped. The counts, click rates and
vocabulary sizes reach the run record through the data set's `reference_metrics()`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from typing import IO, ClassVar, Literal

import numpy as np

from scaling.config import DataConfig
from scaling.config_schema import ConfigError, knob
from scaling.data.spec import CTRFeatureSpec

__all__ = ["BadRow", "RowFormat", "KaggleCTRConfig", "SPLITS", "OOV_ID", "MISSING_ID", "prepare", "vocabulary_summary"]

SPLITS = ("train", "valid", "test")
OOV_ID = 0  # a field's out-of-vocabulary bucket
MISSING_ID = 1  # a field's empty value
_FIRST_VALUE_ID = 2
CACHE_VERSION = 1  # bump when the encoding changes: old caches are then ignored
_CHUNK = 65536  # rows encoded per numpy write (bounds temporary memory)
_SPLIT_SALT = 0x5CA1AB1E  # the hashed split's fixed salt: the same rows on every machine


class BadRow(ValueError):
    """A data row that does not fit its format; the message says what was expected."""


class RowFormat:
    """How one file format's rows become (label, dense features, categorical values).

    Subclasses set the names and implement `parse`; `is_header` recognizes an optional header line.
    """

    name: ClassVar[str] = ""
    extensions: ClassVar[tuple[str, ...]] = ()  # file name endings looked for in a data directory
    sparse_names: tuple[str, ...] = ()  # F categorical fields, in batch order
    dense_names: tuple[str, ...] = ()  # D dense features, in batch order
    lone_file_hint: ClassVar[str] = ""  # added to the error for a directory with valid or test alone

    def cache_id(self) -> str:
        """What, beyond the name, changes the encoded arrays (e.g. extra dense columns)."""
        return self.name

    def is_header(self, line: str) -> bool:
        """True if `line` (a file's first line) is a header to skip; raise BadRow for a wrong one."""
        return False

    def parse(self, line: str) -> tuple[float, list[float], list[str]]:
        """(label 0/1, D dense floats, F categorical strings; '' = missing) or raise BadRow."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class KaggleCTRConfig(DataConfig):
    """Knobs shared by the Kaggle-format CTR data sets (see the module docstring)."""

    name: str = knob("", help="data set")
    path: str = knob("", help="a directory with train/valid/test files, or one file (split by line hash)")
    valid_path: str = knob("", help="explicit validation file (with `path` = the train file)")
    test_path: str = knob("", help="explicit test file (with `path` = the train file)")
    valid_fraction: float = knob(0.1, gt=0.0, lt=1.0, help="hashed split of one file: share of rows for validation")
    test_fraction: float = knob(0.1, gt=0.0, lt=1.0, help="hashed split of one file: share of rows for test")
    min_count: int = knob(1, ge=1, help="values seen fewer times in the train rows map to the field's OOV id")
    hashing: bool = knob(False, help="hash values into hash_buckets ids per field instead of a vocabulary")
    hash_buckets: int = knob(1_000_000, ge=3, help="ids per field when hashing (0: OOV, unused; 1: missing)")
    on_bad_row: Literal["error", "skip"] = knob("error", help="a malformed row stops the load, or is counted and skipped")
    cache_dir: str = knob("", help="vocabulary and encoded-array cache; '' = beside the data if writable, "
                                   "else ~/.cache/scaling/kaggle_ctr")

    def row_format(self) -> RowFormat:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self) -> None:
        if not self.path:
            raise ConfigError("path", f"expected a directory with train/valid/test files or a {self.name} file")
        self.files()  # names the missing file, if any
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ConfigError("valid_fraction", f"valid_fraction + test_fraction must be < 1, got "
                                                f"{self.valid_fraction} + {self.test_fraction}")

    def files(self) -> dict[str, str]:
        """{'train': path, and 'valid'/'test' when given as files}; neither = a hashed split of train."""
        fmt = self.row_format()
        if os.path.isdir(self.path):
            if self.valid_path or self.test_path:
                raise ConfigError("valid_path", "give valid_path/test_path with `path` = the train file, not a directory")
            found = {split: _find(self.path, split, fmt.extensions) for split in SPLITS}
            if found["train"] is None:
                names = ", ".join(f"train{e}" for e in fmt.extensions)
                raise ConfigError("path", f"{self.path}: no train file ({names})")
        elif os.path.isfile(self.path):
            found = {"train": self.path, "valid": self.valid_path or None, "test": self.test_path or None}
            for split in ("valid", "test"):
                if found[split] and not os.path.isfile(found[split]):
                    raise ConfigError(f"{split}_path", f"{found[split]}: no such file")
        else:
            raise ConfigError("path", f"{self.path}: no such file or directory")
        if (found["valid"] is None) != (found["test"] is None):
            have, lack = ("valid", "test") if found["valid"] else ("test", "valid")
            raise ConfigError("path", f"found a {have} file ({found[have]}) but no {lack} file: give both, or "
                                      f"neither for a hashed split of the train file{fmt.lone_file_hint}")
        given = {split: p for split, p in found.items() if p is not None}
        if len({os.path.realpath(p) for p in given.values()}) < len(given):
            raise ConfigError("path", f"the train, valid and test files must differ, got {sorted(given.values())}")
        return given

    def cache_root(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        beside = os.path.dirname(os.path.abspath(self.files()["train"]))
        if _writable(beside):
            return os.path.join(beside, ".scaling_cache")
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "scaling", "kaggle_ctr")

    def feature_spec(self) -> CTRFeatureSpec:
        """The batch spec from the vocabulary (built once and cached; no pass at all when hashing)."""
        summary = vocabulary_summary(self)
        return CTRFeatureSpec(cardinalities=tuple(summary["cardinalities"]),
                              num_dense=len(self.row_format().dense_names))

    def build(self):
        from scaling.data.ctr_arrays import EncodedCTR

        return EncodedCTR.open(prepare(self))


def _find(directory: str, split: str, extensions: tuple[str, ...]) -> str | None:
    for ext in extensions:
        for name in (f"{split}{ext}", f"{split}{ext}.gz"):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def _writable(directory: str) -> bool:
    """Writable by permission AND by its mode bits: root passes os.access on a folder marked read-only."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return os.access(directory, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# -- reading ---------------------------------------------------------------------------------------


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def count_lines(path: str) -> int:
    """Lines in a file (a last line without a newline counts), read in 1 MiB blocks."""
    opener = gzip.open if path.endswith(".gz") else open
    lines, last = 0, b"\n"
    with opener(path, "rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


@dataclasses.dataclass
class SplitCounts:
    """Rows of one split: read (data lines, header excluded), rejected (malformed, skip mode)."""

    rows_read: int = 0
    rows_rejected: int = 0
    first_rejected: str = ""  # `file:line: what was wrong` of the first rejected row

    @property
    def rows(self) -> int:
        return self.rows_read - self.rows_rejected


def read_rows(path: str, fmt: RowFormat, on_bad_row: str, split_of: Callable[[int], str | None],
              counts: dict[str, SplitCounts]) -> Iterator[tuple[str, float, list[float], list[str]]]:
    """Yield (split, label, dense, values) for each good row of `path`, streaming.

    split_of(line number) names the split a line belongs to, or None to pass over it. Blank lines
    are not rows. A malformed row raises ConfigError naming file:line (on_bad_row='error') or is
    counted in counts[split] and skipped ('skip').
    """
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            if number == 1:
                try:
                    if fmt.is_header(line):
                        continue
                except BadRow as bad:  # a wrong header is the file's problem, not one row's
                    raise ConfigError("", f"{path}:1: {bad}") from None
            split = split_of(number)
            if split is None:
                continue
            count = counts[split]
            count.rows_read += 1
            try:
                label, dense, values = fmt.parse(line)
            except BadRow as bad:
                where = f"{path}:{number}: {bad}"
                if on_bad_row == "error":
                    raise ConfigError("", f"{where} (data.on_bad_row=skip counts and skips such rows)") from None
                count.rows_rejected += 1
                count.first_rejected = count.first_rejected or where
                continue
            yield split, label, dense, values


def hashed_split(numbers: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """uint8 [N]: 0 train, 1 valid, 2 test for each line number, from a splitmix64 hash of it."""
    with np.errstate(over="ignore"):
        z = np.asarray(numbers, np.uint64) + np.uint64(_SPLIT_SALT) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < valid_fraction, 1, np.where(u < valid_fraction + test_fraction, 2, 0)).astype(np.uint8)


def _router(config: KaggleCTRConfig, files: dict[str, str], path: str, only: str | None = None):
    """split_of(line number) for `path`: its own split, or the hashed split of a lone train file."""
    if len(files) == 3:
        split = next(s for s, p in files.items() if p == path)
        return (lambda number: split) if only in (None, split) else (lambda number: None), None
    assign = hashed_split(np.arange(1, count_lines(path) + 1), config.valid_fraction, config.test_fraction)
    names = [s if only in (None, s) else None for s in SPLITS]
    return (lambda number: names[assign[number - 1]]), assign


# -- caching ---------------------------------------------------------------------------------------


def _identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _vocab_material(config: KaggleCTRConfig, files: dict[str, str]) -> dict:
    return {"version": CACHE_VERSION, "format": config.row_format().name, "train": _identity(files["train"]),
            "split": None if len(files) == 3 else [config.valid_fraction, config.test_fraction],
            "min_count": config.min_count, "on_bad_row": config.on_bad_row}


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or unreadable: rebuild
        return None


# -- the vocabulary --------------------------------------------------------------------------------


def _count_values(config: KaggleCTRConfig, files: dict[str, str]) -> tuple[list[dict[str, int]], SplitCounts]:
    """One pass over the train rows: per field, how often each non-empty value occurs."""
    fmt = config.row_format()
    counters: list[dict[str, int]] = [{} for _ in fmt.sparse_names]
    counts = {s: SplitCounts() for s in SPLITS}
    split_of, _ = _router(config, files, files["train"], only="train")
    for _, _, _, values in read_rows(files["train"], fmt, config.on_bad_row, split_of, counts):
        for counter, value in zip(counters, values):
            if value:  # the empty value has its own id (MISSING_ID), never a vocabulary entry
                counter[value] = counter.get(value, 0) + 1
    return counters, counts["train"]


def vocabulary_summary(config: KaggleCTRConfig) -> dict:
    """{'cardinalities': [F], 'distinct': [F], 'train': counts} of the vocabulary (hashing: fixed sizes)."""
    fmt = config.row_format()
    if config.hashing:
        return {"fields": list(fmt.sparse_names), "cardinalities": [config.hash_buckets] * len(fmt.sparse_names)}
    return _vocabulary(config)[0]


def _vocabulary(config: KaggleCTRConfig, *, with_values: bool = False) -> tuple[dict, list[list[str]] | None]:
    """The cached vocabulary (built in one pass over the train rows if absent or stale).

    Two files: `<fmt>-vocab-<key>.json` (small: sizes and counts, all `feature_spec` needs) and
    `<fmt>-vocab-<key>.values.json` (each field's kept values, most frequent first).
    """
    files = config.files()
    fmt = config.row_format()
    stem = os.path.join(config.cache_root(), f"{fmt.name}-vocab-{_key(_vocab_material(config, files))}")
    summary = _read_json(stem + ".json")
    values = _read_json(stem + ".values.json") if summary is not None and with_values else None
    if summary is not None and (values is not None or not with_values):
        return summary, (values or {}).get("values")
    counters, train = _count_values(config, files)
    kept = [sorted((v for v, c in counter.items() if c >= config.min_count), key=lambda v: (-counter[v], v))
            for counter in counters]
    summary = {"fields": list(fmt.sparse_names), "cardinalities": [_FIRST_VALUE_ID + len(k) for k in kept],
               "distinct": [len(c) for c in counters], "train": dataclasses.asdict(train)}
    _write_json(stem + ".values.json", {"values": kept})  # first: the summary marks a complete vocabulary
    _write_json(stem + ".json", summary)
    return summary, kept


def _encoder(config: KaggleCTRConfig, kept: list[list[str]] | None) -> Callable[[list[str]], list[int]]:
    """values (F strings) -> F ids, by the vocabulary or by hashing."""
    if config.hashing:
        buckets = config.hash_buckets - _FIRST_VALUE_ID
        salts = [f"{f}\x1f".encode() for f in range(len(config.row_format().sparse_names))]
        return lambda values: [zlib.crc32(salt + v.encode()) % buckets + _FIRST_VALUE_ID if v else MISSING_ID
                               for salt, v in zip(salts, values)]
    lookups = [{v: i + _FIRST_VALUE_ID for i, v in enumerate(k)} for k in kept]
    return lambda values: [lookup.get(v, OOV_ID) if v else MISSING_ID for lookup, v in zip(lookups, values)]


# -- encoding --------------------------------------------------------------------------------------


class _SplitWriter:
    """One split's encoded rows, streamed into `.npy` files preallocated for `capacity` rows."""

    def __init__(self, directory: str, split: str, capacity: int, num_sparse: int, num_dense: int):
        self.paths = {k: os.path.join(directory, f"{split}.{k}.npy") for k in ("sparse", "dense", "label")}
        self.tmp = {k: f"{p}.tmp-{os.getpid()}" for k, p in self.paths.items()}
        rows = max(capacity, 1)
        self.arrays = {
            "sparse": np.lib.format.open_memmap(self.tmp["sparse"], "w+", np.int32, (rows, num_sparse)),
            "label": np.lib.format.open_memmap(self.tmp["label"], "w+", np.float32, (rows,)),
        }
        if num_dense:  # numpy cannot map an empty file; a dense-free data set stores no dense array
            self.arrays["dense"] = np.lib.format.open_memmap(self.tmp["dense"], "w+", np.float32, (rows, num_dense))
        self.num_dense = num_dense
        self.n = 0
        self.buffer: tuple[list, list, list] = ([], [], [])
        self.clicks = 0.0
        self.oov = 0
        self.missing = 0

    def add(self, label: float, dense: list[float], ids: list[int]) -> None:
        self.buffer[0].append(ids)
        self.buffer[1].append(dense)
        self.buffer[2].append(label)
        if len(self.buffer[0]) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.buffer[0]:
            return
        ids = np.asarray(self.buffer[0], np.int32)
        labels = np.asarray(self.buffer[2], np.float32)
        end = self.n + len(ids)
        self.arrays["sparse"][self.n:end] = ids
        self.arrays["label"][self.n:end] = labels
        if self.num_dense:
            self.arrays["dense"][self.n:end] = np.asarray(self.buffer[1], np.float32)
        self.clicks += float(labels.sum())
        self.oov += int((ids == OOV_ID).sum())
        self.missing += int((ids == MISSING_ID).sum())
        self.n = end
        self.buffer = ([], [], [])

    def close(self) -> dict[str, float]:
        """Flush, move the files into place; the split's row count and value statistics."""
        self.flush()
        for key, array in self.arrays.items():
            array.flush()
            del array
            os.replace(self.tmp[key], self.paths[key])
        self.arrays = {}
        return {"rows": self.n, "clicks": self.clicks, "oov_values": self.oov, "missing_values": self.missing}


def prepare(config: KaggleCTRConfig) -> dict:
    """Vocabulary + encoded arrays of every split, from the cache or built now.

    Returns the cache's `meta.json` contents plus 'directory': per split {'rows', 'rows_read',
    'rows_rejected', 'first_rejected', 'clicks', 'oov_values', 'missing_values'}, the fields, their
    cardinalities, the vocabulary's distinct-value counts and num_dense.
    """
    files = config.files()
    fmt = config.row_format()
    summary, kept = (vocabulary_summary(config), None) if config.hashing else _vocabulary(config, with_values=True)
    material = {"version": CACHE_VERSION, "format": fmt.cache_id(), "files": {s: _identity(p) for s, p in files.items()},
                "split": None if len(files) == 3 else [config.valid_fraction, config.test_fraction],
                "min_count": None if config.hashing else config.min_count, "on_bad_row": config.on_bad_row,
                "hash_buckets": config.hash_buckets if config.hashing else 0}
    directory = os.path.join(config.cache_root(), f"{fmt.name}-{_key(material)}")
    meta = _read_json(os.path.join(directory, "meta.json"))
    if meta is None or meta.get("material") != material:
        meta = _encode(config, files, summary, kept, directory, material)
    return {**meta, "directory": directory}


def _encode(config: KaggleCTRConfig, files: dict[str, str], summary: dict, kept: list[list[str]] | None,
            directory: str, material: dict) -> dict:
    fmt = config.row_format()
    os.makedirs(directory, exist_ok=True)
    encode = _encoder(config, kept)
    counts = {s: SplitCounts() for s in SPLITS}
    stats: dict[str, dict] = {}
    for path in dict.fromkeys(files.values()):  # one pass per distinct file
        split_of, assign = _router(config, files, path)
        if assign is None:
            capacity = {split_of(1): count_lines(path)}
        else:
            capacity = {s: int((assign == i).sum()) for i, s in enumerate(SPLITS)}
        writers = {s: _SplitWriter(directory, s, c, len(fmt.sparse_names), len(fmt.dense_names))
                   for s, c in capacity.items()}
        for split, label, dense, values in read_rows(path, fmt, config.on_bad_row, split_of, counts):
            writers[split].add(label, dense, encode(values))
        for split, writer in writers.items():
            stats[split] = {**writer.close(), **dataclasses.asdict(counts[split])}
    for split in SPLITS:
        if stats[split]["rows"] == 0:
            raise ConfigError("", f"{files.get(split, files['train'])}: no usable {split} rows"
                                  f"{' (all rejected)' if stats[split]['rows_read'] else ''}")
    meta = {"material": material, "fields": list(fmt.sparse_names), "dense": list(fmt.dense_names),
            "cardinalities": summary["cardinalities"], "distinct": summary.get("distinct"), "splits": stats}
    _write_json(os.path.join(directory, "meta.json"), meta)  # last: marks a complete cache
    return meta
