"""Criteo Display Advertising Challenge (Kaggle) files: label, 13 integer features, 26 categoricals.

    data:
      name: criteo
      path: data/criteo          # train.txt, valid.txt, test.txt; or one file, split by line hash
      min_count: 10              # BARS' Criteo_x4 threshold (the FuxiCTR / BARS benchmark)

A row is 40 tab-separated fields, no header: the click (0/1), I1..I13 (integers, possibly
negative), C1..C26 (32-bit hashes in hex); any field but the label may be empty. Kaggle's own
test.txt has no label column (39 fields) and cannot be evaluated: split train.txt instead.

Integer features follow DLRM's reference preprocessing (facebookresearch/dlrm, data_utils.py):
an empty value becomes 0, negative values are clamped to 0 (only I2 has them: -1, -2, -3), and
the feature is log(1 + x). So dense = log1p(max(x, 0)), with 0 for missing. `missing_indicators`
adds one 0/1 dense column per integer feature marking it empty (D = 26), for models that should
tell a missing value from a zero. Categorical values go through the shared vocabulary machinery
(`scaling/data/kaggle_ctr.py`): an empty value is its field's id 1, a rare or unseen one id 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from scaling.config_schema import knob
from scaling.data.kaggle_ctr import BadRow, KaggleCTRConfig, RowFormat
from scaling.data.registry import register_data

__all__ = ["CriteoFormat", "CriteoConfig", "dense_transform"]

NUM_INTEGER = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_INTEGER + NUM_CATEGORICAL


def dense_transform(x: int) -> float:
    """DLRM's integer-feature transform: log(1 + max(x, 0))."""
    return math.log1p(x) if x > 0 else 0.0


def _is_integer(s: str) -> bool:
    # Stricter than int(): no spaces, '+', '_' separators or non-ASCII digits in a data file.
    return s.isascii() and (s.isdigit() or (s[0] == "-" and s[1:].isdigit()))


class CriteoFormat(RowFormat):
    name = "criteo"
    extensions = (".txt", ".tsv", "")
    lone_file_hint = " (Kaggle's own test.txt has no labels: point data.path at train.txt to split it by hash)"

    def __init__(self, missing_indicators: bool = False):
        self.missing_indicators = bool(missing_indicators)
        self.sparse_names = tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))
        integer = tuple(f"I{i}" for i in range(1, NUM_INTEGER + 1))
        self.dense_names = integer + (tuple(f"{n}_missing" for n in integer) if self.missing_indicators else ())

    def cache_id(self) -> str:
        return f"criteo-missing{int(self.missing_indicators)}"

    def parse(self, line: str) -> tuple[float, list[float], list[str]]:
        parts = line.split("\t")
        if len(parts) != NUM_FIELDS:
            hint = " (Kaggle's test.txt has no label column)" if len(parts) == NUM_FIELDS - 1 else ""
            raise BadRow(f"expected {NUM_FIELDS} tab-separated fields (label, I1-I13, C1-C26), got {len(parts)}{hint}")
        label = parts[0]
        if label != "0" and label != "1":
            raise BadRow(f"expected the label 0 or 1 in field 1, got {label[:20]!r}")
        dense, missing = [], []
        for i in range(1, NUM_INTEGER + 1):
            s = parts[i]
            if not s:
                dense.append(0.0)
                missing.append(1.0)
                continue
            if not _is_integer(s):
                raise BadRow(f"expected an integer or nothing in I{i} (field {i + 1}), got {s[:20]!r}")
            dense.append(dense_transform(int(s)))
            missing.append(0.0)
        if self.missing_indicators:
            dense += missing
        return float(label == "1"), dense, parts[1 + NUM_INTEGER:]


@register_data("criteo")
@dataclasses.dataclass(frozen=True)
class CriteoConfig(KaggleCTRConfig):
    """Criteo Kaggle files (see the module docstring; shared knobs in `scaling/data/kaggle_ctr.py`)."""

    name: Literal["criteo"] = knob("criteo", help="data set")
    min_count: int = knob(10, ge=1, help="values seen fewer times in the train rows map to the field's OOV id "
                                         "(10: BARS' Criteo_x4)")
    missing_indicators: bool = knob(False, help="add a 0/1 dense column per integer feature marking it empty (D = 26)")

    def row_format(self) -> CriteoFormat:
        return CriteoFormat(self.missing_indicators)
