"""JSON files written whole or not at all: a reader (or a process killed mid-write) never sees half
a file, because the text goes to PATH.tmp first and is renamed over PATH."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
    """Write obj to path as JSON (json.dump's keyword arguments, e.g. indent, default), its folder
    created; returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")
    os.replace(tmp, path)
    return path
