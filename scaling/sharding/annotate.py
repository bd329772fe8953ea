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
_NATURAL_LENGTH_KEY = "natural_length"
# Small 1-D parameters are stored zero-padded to a multiple of this many entries, so that a layout
# can split them over any power-of-two device count up to it (an odd length divides none).
PAD_MULTIPLE = 128


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


def padded_vector(value: jax.Array, axis: str, multiple: int = PAD_MULTIPLE) -> nnx.Param:
    """A 1-D parameter stored with zeros appended up to a multiple of `multiple` entries, under the
    logical axis `axis`. The model reads `natural(variable)` (the first len(value) entries), so the
    padding gets zero gradients and stays zero under the usual optimizers (Adam-family updates
    and weight decay of a zero are zero): training is exactly that of the unpadded vector.
    Parameter counts exclude the padding (`natural_length` metadata)."""
    if value.ndim != 1:
        raise ValueError(f"padded_vector takes a 1-D value, got shape {value.shape}")
    length = value.shape[0]
    stored = -(-length // multiple) * multiple
    padded = jax.numpy.pad(value, (0, stored - length))
    return logical_param(padded, (axis,), metadata={_NATURAL_LENGTH_KEY: length})


def natural(variable: nnx.Variable) -> jax.Array:
    """The value of a variable without its storage padding (see `padded_vector`)."""
    length = variable.get_metadata().get(_NATURAL_LENGTH_KEY)
    value = variable[...]
    return value if length is None else value[:length]


def natural_count(variable: nnx.Variable) -> int:
    """Parameters a variable holds, its storage padding excluded."""
    length = variable.get_metadata().get(_NATURAL_LENGTH_KEY)
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size if length is None else int(length)
