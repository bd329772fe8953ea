"""User-item interaction logs from the formats recommendation research uses, as per-user timelines.

    log = load_interactions("Beauty.txt")            # format detected from the file
    log.num_users, log.num_items, log.history(0)     # item ids 1..num_items (0 is padding)

Formats:
- `lines`: the Amazon / SASRec line format, `user item1 item2 ...` in time order, integer ids
  (no timestamps: the position in the line stands in for time);
- `movielens`: GroupLens `ratings.dat` (`user::item::rating::timestamp`), `u.data`
  (tab-separated, same columns) or `ratings.csv` (ML-20M and later: comma-separated, a header);
- `recbole`: RecBole atomic `.inter` files, a typed header (`user_id:token  item_id:token
  rating:float  timestamp:float`) then tab-separated rows.

Each user's events are sorted by timestamp (stably: ties keep file order). Users and items are
renumbered densely in order of first appearance, items from 1. A malformed line stops the load
with one line naming the file, the line number and what was expected (`ConfigError`, exit 2 from
the CLI).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np

from scaling.config_schema import ConfigError

Format = Literal["auto", "lines", "movielens", "recbole"]


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Timelines in CSR form: user u's events are rows offsets[u]:offsets[u+1], in time order.

    items int32 [N] (1..num_items), timestamps int64 [N], ratings float32 [N] (NaN if the format
    has none); user_ids / item_ids: the original ids (item_ids[0] is the padding placeholder '');
    actions: optional int8 [N] action type per event (synthetic logs: 0 view, 1 click, 2 purchase),
    None for formats that have none. timed: False when the format has no clock (the line format's
    timestamps are positions in each user's line).
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    source: str
    actions: np.ndarray | None = None
    timed: bool = True

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_interactions(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def history(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def item_popularity(self) -> np.ndarray:
        """float64 [num_items + 1]: interactions per item (index 0, padding, is 0)."""
        return np.bincount(self.items, minlength=self.num_items + 1).astype(np.float64)


def _error(path: str, line: int, message: str) -> ConfigError:
    return ConfigError("", f"{path}:{line}: {message}")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line.rstrip("\n")


def _rows_lines(path: str):
    for number, line in _lines(path):
        tokens = line.split()
        if len(tokens) < 2:
            raise _error(path, number, f"expected `user item1 item2 ...`, got {line[:60]!r}")
        for tok in tokens:
            if not tok.isdigit():
                raise _error(path, number, f"expected integer ids in the `user item1 item2 ...` format, got {tok[:30]!r}")
        for position, item in enumerate(tokens[1:]):
            yield tokens[0], item, float("nan"), position


_ML_HEADER = "userid,movieid,rating,timestamp"  # ML-20M/25M/latest ratings.csv


def _split_movielens(line: str) -> list[str]:
    if "::" in line:
        return line.split("::")
    return line.split("\t") if "\t" in line else line.split(",")


def _rows_movielens(path: str):
    for number, line in _lines(path):
        if number == 1 and line.strip().lower().replace(" ", "") == _ML_HEADER:
            continue
        parts = _split_movielens(line)
        if len(parts) < 4:
            raise _error(path, number, f"expected `user::item::rating::timestamp` or 4 tab-separated columns, got {line[:60]!r}")
        user, item, rating, stamp = (p.strip() for p in parts[:4])
        try:
            yield user, item, float(rating), int(float(stamp))
        except ValueError:
            raise _error(path, number, f"expected a numeric rating and timestamp, got {rating[:20]!r}, {stamp[:20]!r}") from None


def _rows_recbole(path: str):
    rows = _lines(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise _error(path, 1, "empty file; expected a RecBole header such as `user_id:token\\titem_id:token`") from None
    names = [h.split(":")[0].strip() for h in header.split("\t")]
    if "user_id" not in names or "item_id" not in names:
        raise _error(path, 1, f"expected a RecBole header with user_id and item_id columns, got {header[:80]!r}")
    col = {name: i for i, name in enumerate(names)}
    for number, line in rows:
        parts = line.split("\t")
        if len(parts) != len(names):
            raise _error(path, number, f"expected {len(names)} tab-separated columns ({', '.join(names)}), got {len(parts)}")
        try:
            rating = float(parts[col["rating"]]) if "rating" in col else float("nan")
            stamp = int(float(parts[col["timestamp"]])) if "timestamp" in col else number
        except ValueError:
            raise _error(path, number, "expected numeric rating and timestamp columns") from None
        yield parts[col["user_id"]], parts[col["item_id"]], rating, stamp


def detect_format(path: str) -> Format:
    if path.endswith(".inter"):
        return "recbole"
    for _, line in _lines(path):
        if "::" in line or line.strip().lower().replace(" ", "") == _ML_HEADER:
            return "movielens"
        parts = _split_movielens(line)
        if len(parts) >= 4 and all(p.strip().lstrip("-").replace(".", "", 1).isdigit() for p in parts[:4]):
            return "movielens"
        return "lines"
    raise _error(path, 1, "empty file")


def load_interactions(path: str, fmt: Format = "auto") -> Interactions:
    """Read a log in any of the module's formats into per-user timelines."""
    if not os.path.exists(path):
        raise ConfigError("data.path", f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    reader = {"lines": _rows_lines, "movielens": _rows_movielens, "recbole": _rows_recbole}[fmt]
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    u_col, i_col, r_col, t_col = [], [], [], []
    for user, item, rating, stamp in reader(path):
        u_col.append(users.setdefault(user, len(users)))
        i_col.append(items.setdefault(item, len(items) + 1))
        r_col.append(rating)
        t_col.append(stamp)
    if not u_col:
        raise _error(path, 1, "no interactions")
    u, it = np.asarray(u_col, np.int64), np.asarray(i_col, np.int32)
    t, r = np.asarray(t_col, np.int64), np.asarray(r_col, np.float32)
    order = np.lexsort((np.arange(len(u)), t, u))  # by user, then time, then file order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=len(users)))]).astype(np.int64)
    return Interactions(
        offsets=offsets, items=it[order], timestamps=t[order], ratings=r[order],
        user_ids=tuple(users), item_ids=("",) + tuple(items), source=path, timed=fmt != "lines",
    )
