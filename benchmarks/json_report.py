"""How every benchmark hands back its result: JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json
import os


def emit(report: dict, out: str = "", indent: int = 2) -> None:
    """Print `report` as JSON; also write it to `out` (its folder created) when given."""
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
