"""Data sets by name: `data.name` in YAML picks the config class, whose `build()` makes the data set."""

from __future__ import annotations

import importlib

_DATA: dict[str, type] = {}
# Modules that register data sets on import.
_DATA_MODULES = ("scaling.data.synthetic_ctr", "scaling.data.sequence_dataset", "scaling.data.synthetic_sequences",
                 "scaling.data.synthetic_ranking", "scaling.data.criteo", "scaling.data.avazu")


def register_data(name: str):
    """Class decorator: register a DataConfig subclass under `name` (its `name` field's value)."""

    def wrap(cls: type) -> type:
        _DATA[name] = cls
        return cls

    return wrap


def data_config_classes() -> dict[str, type]:
    for module in _DATA_MODULES:
        importlib.import_module(module)
    return dict(_DATA)
