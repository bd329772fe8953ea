"""Logical-axis rules, named layouts, and the activation constraint `constrain`.

A layout is data: `scaling/sharding/layouts/<name>.yaml` maps every logical axis name a parameter
may carry (`scaling.sharding.annotate.LOGICAL_AXES`) to an ordered list of mesh axes:

    rules:
      batch: [data, fsdp]     # activations' batch dimension: split over data, then fsdp
      embed: [fsdp]
      mlp: [tensor]
      kv: []                  # always whole (replicated)

How a spec is made from the rules (`resolve`), for one array of shape [d_0, ..., d_n] whose
dimensions carry logical names (None = never split):
  - a dimension takes, in its rule's order, each mesh axis of size > 1 that no other dimension of
    this array took and that keeps the split dividing the dimension (axes of size 1 are skipped; a
    mesh axis is used at most once per spec);
  - parameters: dimensions choose largest first, so under `fsdp` (every name -> fsdp) the largest
    dimension the fsdp axis divides is the one split (big_vision's fsdp tactic; MaxText gets the
    same effect from its rule order);
  - activations (`constrain`): dimensions choose in position order, so the batch dimension claims
    the data/fsdp axes before any other;
  - a mesh axis that some dimension asked for but none could take (no divisible dimension) is
    recorded as a fallback: the array stays replicated over it, and `scaling shard-plan` says so;
  - a logical name without a rule is an error naming the array (its parameter path).

A config may add or replace rules: `sharding.rules: ["mlp=tensor+fsdp", "rank="]`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import yaml
from jax.sharding import PartitionSpec as P

from scaling.config_schema import ConfigError, _did_you_mean

LAYOUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layouts")
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")  # scaling.sharding.mesh.MESH_AXES (no jax import cycle)


@dataclasses.dataclass(frozen=True)
class Rules:
    """A named rule set: logical axis name -> ordered mesh axes (empty: replicated)."""

    name: str
    table: tuple[tuple[str, tuple[str, ...]], ...]
    description: str = ""

    def axes_for(self, logical: str) -> tuple[str, ...] | None:
        """The mesh axes of `logical`, or None when the layout has no rule for it."""
        return dict(self.table).get(logical)

    def with_overrides(self, extra: Sequence[str]) -> Rules:
        """These rules plus `name=axis+axis` entries (replacing a name's rule; `name=` replicates)."""
        if not extra:
            return self
        table = dict(self.table)
        for i, text in enumerate(extra):
            name, axes = parse_rule(text, f"sharding.rules[{i}]")
            table[name] = axes
        return Rules(f"{self.name}+{len(extra)} rules", tuple(table.items()), self.description)

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.table}


def parse_rule(text: str, where: str) -> tuple[str, tuple[str, ...]]:
    """'mlp=tensor+fsdp' -> ('mlp', ('tensor', 'fsdp')); 'rank=' -> ('rank', ())."""
    if "=" not in text:
        raise ConfigError(where, f"expected LOGICAL=AXIS+AXIS (e.g. mlp=tensor+fsdp, or rank= to replicate), got {text!r}")
    name, _, rhs = text.partition("=")
    axes = tuple(a.strip() for a in rhs.replace(",", "+").split("+") if a.strip())
    return name.strip(), _check_axes(name.strip(), axes, where)


def _check_axes(name: str, axes: Sequence[str], where: str) -> tuple[str, ...]:
    for axis in axes:
        if axis not in MESH_AXIS_NAMES:
            raise ConfigError(where, f"rule {name!r}: unknown mesh axis {axis!r}{_did_you_mean(str(axis), list(MESH_AXIS_NAMES))}; "
                                     f"expected {', '.join(MESH_AXIS_NAMES)}")
    if len(set(axes)) != len(axes):
        raise ConfigError(where, f"rule {name!r} names a mesh axis twice: {list(axes)}")
    return tuple(axes)


def available_layouts() -> list[str]:
    """Names of the layouts shipped in scaling/sharding/layouts/."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(LAYOUT_DIR) if f.endswith(".yaml"))


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Rules:
    names = available_layouts()
    if name not in names:
        raise ConfigError("sharding.layout", f"unknown layout {name!r}{_did_you_mean(name, names)}; "
                                             f"expected one of {', '.join(names)}")
    path = os.path.join(LAYOUT_DIR, f"{name}.yaml")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    rules = data.get("rules")
    if not isinstance(rules, Mapping):
        raise ConfigError("sharding.layout", f"{path}: expected a `rules:` mapping of logical name -> mesh axes")
    table = tuple((str(k), _check_axes(str(k), list(v or []), f"{path}: rules.{k}")) for k, v in rules.items())
    return Rules(name, table, str(data.get("description", "")))


def load_layout(name: str, extra: Sequence[str] = ()) -> Rules:
    """The named layout's rules, plus any `sharding.rules` entries of the config."""
    return _load(name).with_overrides(tuple(extra))


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One array's placement: its PartitionSpec and the mesh axes it could not be split over."""

    spec: P
    fallbacks: tuple[str, ...] = ()  # e.g. "fsdp(8) divides none of fields=17, rank=2"

    @property
    def replicated(self) -> bool:
        return all(entry is None for entry in self.spec)


def resolve(shape: Sequence[int], logical: Sequence[str | None], rules: Rules, mesh_sizes: Mapping[str, int], *,
            largest_first: bool = True, what: str = "array") -> Resolved:
    """The PartitionSpec of an array of `shape` whose dims carry `logical` names (module docstring).

    mesh_sizes: {mesh axis: size}. what: the array's name in errors (a parameter path).
    """
    shape, logical = tuple(int(s) for s in shape), tuple(logical)
    if len(shape) != len(logical):
        raise ValueError(f"{what}: logical axes {logical} do not match shape {shape}")
    order = sorted(range(len(shape)), key=lambda i: -shape[i]) if largest_first else range(len(shape))
    assigned: list[list[str]] = [[] for _ in shape]
    used: set[str] = set()
    wanted: dict[str, list[str]] = {}  # mesh axis -> dims that asked for it and could not divide
    for i in order:
        name = logical[i]
        if name is None:
            continue
        axes = rules.axes_for(name)
        if axes is None:
            known = [k for k, _ in rules.table]
            raise ConfigError("sharding.layout", f"layout {rules.name!r} has no rule for logical axis {name!r} of "
                                                 f"{what} (shape {shape}){_did_you_mean(name, known)}; add one with "
                                                 f"sharding.rules=[\"{name}=...\"]")
        split = 1
        for axis in axes:
            size = int(mesh_sizes.get(axis, 1))
            if size == 1 or axis in used:
                continue
            if shape[i] % (split * size):
                wanted.setdefault(axis, []).append(f"{name}={shape[i]}")
                continue
            assigned[i].append(axis)
            used.add(axis)
            split *= size
    fallbacks = tuple(f"{axis}({mesh_sizes[axis]}) divides none of {', '.join(dims)}"
                      for axis, dims in wanted.items() if axis not in used)
    # Within a dimension, axes in mesh order whatever the rule's preference order: a parameter split
    # over (data, fsdp) is then tiled like the batch, and its gradient's reduce-scatter needs no
    # transposition of devices.
    assigned = [sorted(a, key=MESH_AXIS_NAMES.index) for a in assigned]
    spec = P(*[None if not a else a[0] if len(a) == 1 else tuple(a) for a in assigned])
    return Resolved(spec, fallbacks)


def spec_to_json(spec: P) -> list:
    """PartitionSpec -> JSON list: None, 'axis' or ['axis', 'axis'] per dimension."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def shards(spec: P, mesh_sizes: Mapping[str, int]) -> int:
    """How many pieces a spec cuts an array into (its bytes per device = bytes / shards)."""
    count = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                count *= int(mesh_sizes[axis])
    return count


# -- activations ---------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("scaling_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules | None) -> Iterator[None]:
    """Make `rules` the ones `constrain` reads while tracing inside this block."""
    token = _ACTIVE.set(rules)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> Rules | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the active layout: e.g. constrain(h, ("batch",)) for h [B, n, d]
    (missing trailing names are None) keeps the batch split over data x fsdp at a block boundary, so XLA's propagation
    cannot drift into a layout that all-gathers the batch. No-op outside a mesh or without rules
    (single-device runs, FLOP counting, tests), and for a dim a mesh axis does not divide."""
    rules = _ACTIVE.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    logical_axes = tuple(logical_axes) + (None,) * (x.ndim - len(logical_axes))
    resolved = resolve(x.shape, logical_axes, rules, dict(mesh.shape), largest_first=False, what="activation")
    if resolved.replicated:  # nothing to split: leave the choice to XLA rather than force replication
        return x
    return jax.lax.with_sharding_constraint(x, resolved.spec)
