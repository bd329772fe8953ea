"""Avazu CTR challenge (Kaggle) files: id, click, hour (YYMMDDHH) and 21 categorical columns.

    data:
      name: avazu
      path: data/avazu           # train.csv, valid.csv, test.csv; or one file, split by line hash
      min_count: 2               # BARS' Avazu_x4 threshold

A row is 24 comma-separated fields; a file may start with the header
`id,click,hour,C1,banner_pos,site_id,...,C21` (Kaggle's train.csv does; a header without `click`,
like Kaggle's test.csv, is refused: it has no labels). `id` is dropped (unique per impression, it
carries no signal), `click` is the label, and `hour` becomes two categorical fields, hour of day
(00..23) and weekday (0 = Monday), as BARS and most Avazu baselines derive them. With the 21
columns that makes F = 23 categorical fields and no dense features (D = 0). Every value, the
numeric-looking C14..C21 included, is a category: an empty value is its field's id 1, a rare or
unseen one id 0 (`scaling/data/kaggle_ctr.py`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from typing import Literal

from scaling.config_schema import knob
from scaling.data.kaggle_ctr import BadRow, KaggleCTRConfig, RowFormat
from scaling.data.registry import register_data

__all__ = ["AvazuFormat", "AvazuConfig", "COLUMNS", "hour_fields"]

COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
           "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
_HEADER = ",".join(COLUMNS)


@functools.lru_cache(maxsize=65536)  # a file spans a few hundred distinct hours
def hour_fields(hour: str) -> tuple[str, str]:
    """'YYMMDDHH' -> (hour of day '00'..'23', weekday '0'..'6', 0 = Monday), or raise BadRow."""
    if len(hour) != 8 or not (hour.isascii() and hour.isdigit()):
        raise BadRow(f"expected hour as YYMMDDHH (8 digits), got {hour[:20]!r}")
    try:
        day = datetime.date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]))
    except ValueError:
        raise BadRow(f"expected hour as YYMMDDHH with a valid date, got {hour!r}") from None
    if int(hour[6:]) > 23:
        raise BadRow(f"expected hour as YYMMDDHH with HH in 00..23, got {hour!r}")
    return hour[6:], str(day.weekday())


class AvazuFormat(RowFormat):
    name = "avazu"
    extensions = (".csv", "")
    sparse_names = ("hour_of_day", "weekday") + COLUMNS[3:]
    dense_names = ()

    def is_header(self, line: str) -> bool:
        if not line.startswith("id,"):
            return False
        if line.replace(" ", "") != _HEADER:
            hint = " (a header without click, like Kaggle's test.csv, has no labels)" if ",click," not in line else ""
            raise BadRow(f"expected the header {_HEADER[:40]}...,C21, got {line[:60]!r}{hint}")
        return True

    def parse(self, line: str) -> tuple[float, list[float], list[str]]:
        parts = line.split(",")
        if len(parts) != len(COLUMNS):
            raise BadRow(f"expected {len(COLUMNS)} comma-separated fields (id, click, hour, C1, ..., C21), got {len(parts)}")
        click = parts[1]
        if click != "0" and click != "1":
            raise BadRow(f"expected click 0 or 1 in field 2, got {click[:20]!r}")
        return float(click == "1"), [], [*hour_fields(parts[2]), *parts[3:]]


@register_data("avazu")
@dataclasses.dataclass(frozen=True)
class AvazuConfig(KaggleCTRConfig):
    """Avazu Kaggle files (see the module docstring; shared knobs in `scaling/data/kaggle_ctr.py`)."""

    name: Literal["avazu"] = knob("avazu", help="data set")
    min_count: int = knob(2, ge=1, help="values seen fewer times in the train rows map to the field's OOV id "
                                        "(2: BARS' Avazu_x4)")

    def row_format(self) -> AvazuFormat:
        return AvazuFormat()
