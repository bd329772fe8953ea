"""How every benchmark hands back its result: JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json
import os


def emit(report: dict, out: str = "", indent: int = 2) -> None:
    """Print `report` as JSON; also write it to `out` (its folder created) when given."""
    print(json.dumps(report, indent=indent))
    if out:
        write_json(report, out, indent)


def write_json(report: dict, out: str, indent: int = 2) -> None:
    """Write `report` to `out` (its folder created) whole or not at all: through a temporary file
    renamed over it, so that a process killed mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write(json.dumps(report, indent=indent) + "\n")
    os.replace(out + ".tmp", out)
