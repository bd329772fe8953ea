"""How every benchmark hands back its result: JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json

from scaling.atomic_json import write_json


def emit(report: dict, out: str = "", indent: int = 2) -> None:
    """Print `report` as JSON; also write it to `out` (its folder created, whole or not at all:
    scaling/atomic_json.py) when given."""
    print(json.dumps(report, indent=indent))
    if out:
        write_json(out, report, indent=indent)
