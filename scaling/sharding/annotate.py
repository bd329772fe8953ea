"""The one place that attaches logical-axis annotations to NNX variables.

Flax has renamed the sharding metadata key across releases (`sharding`, `sharding_names`,
`out_sharding`); model code calls `logical_param` and never touches the key itself. Eager sharding
is off: variables are created unsharded and the partitioner places them from the layout's rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

# Logical axis vocabulary shared by every model; a layout maps these to mesh axes.
LOGICAL_AXES = ("batch", "embed", "mlp", "heads", "kv", "vocab", "table", "seq", "fields", "rank", "layers")

_METADATA_KEY = "out_sharding"


def logical_param(
    value: jax.Array,
    axes: Sequence[str | None],
    variable_type: type[nnx.Variable] = nnx.Param,
    metadata: Mapping[str, Any] | None = None,
) -> nnx.Variable:
    """Wrap `value` in `variable_type` carrying logical axis names (one per dimension) and any
    further static `metadata` (e.g. an embedding table's stored layout)."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a value of shape {value.shape}")
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; expected names from {LOGICAL_AXES}")
    return variable_type(value, eager_sharding=False, **dict(metadata or {}), **{_METADATA_KEY: axes})


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axes a variable was annotated with, or None."""
    return variable.get_metadata().get(_METADATA_KEY)
