"""Sweep YAML -> the list of trials, each a fully resolved `RunConfig` with a stable id.

A sweep YAML is a run config (the base) plus a `sweep:` section of axes:

    sweep:
      scale:                      # which families and sizes (a family's named ladder) ...
        wukong: [xxs, xs, s, m]
        dlrm: {gflops: [1.0e-4, 1.0e-3], set: {optimizer.dense.learning_rate: 1.0e-3}}
        item_knn: {set: {model.neighbours: 200}}   # no sizes: one trial (families without a ladder)
        popularity:                                # the same, with the family's defaults
      grid:                       # cartesian product; a value may depend on family / size
        optimizer.dense.learning_rate: {default: [2.0e-3, 4.0e-3], wukong.m: [1.0e-3, 2.0e-3]}
      zip:                        # lockstep: the i-th values go together
        train.steps: [500, 1000]
        train.batch_size: [1024, 512]
      seeds: {default: [0], wukong.xxs: [0, 1, 2]}    # or a list, or a count
      tune: [optimizer.dense.learning_rate]           # chosen per size on the validation metric
      metric: logloss                                 # what `tune` and the fits read

Scoped values: any axis value can be a plain list (every trial) or a mapping whose keys are
`default`, a family (`wukong`) or a family and size (`wukong.m`); the most specific key wins, and
a family/size with no matching key keeps the base config's value. `scale.<family>.gflops` lists
target forward GFLOP/example; each resolves to the family's preset nearest in log FLOPs (the
ratio is kept on the trial and shown by `--dry-run`).

Every trial config is built and validated before anything runs; a bad key, an unknown family or
size, zip lists of unequal length, or two trials with the same resolved config raise ConfigError.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from scaling.atomic_json import write_json
from scaling.config import RunConfig, load_run_config, load_yaml, run_id, set_path
from scaling.config_schema import ConfigError, _did_you_mean

SWEEP_KEYS = ("scale", "grid", "zip", "seeds", "tune", "metric")
# Keys an axis may not sweep: they decide where trials live, or have their own axis.
_RESERVED = {"name": "the sweep's name is fixed", "train.output_dir": "all trials share one directory",
             "seed": "use sweep.seeds", "model.name": "use sweep.scale", "model.size": "use sweep.scale"}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One resolved run of a sweep. `axes` holds the swept keys and values (grid and zip)."""

    index: int
    trial_id: str
    config: RunConfig
    family: str
    size: str
    seed: int
    axes: tuple[tuple[str, Any], ...]
    target_gflops: float | None = None

    @property
    def run_dir(self) -> str:
        return os.path.join(self.config.train.output_dir, self.config.name, self.trial_id)

    def feature_spec(self):
        """The data's batch spec; loaded from the data (users, training graph) for a model whose
        tables or FLOPs depend on them (user embeddings, graph propagation), else from the config."""
        data = self.config.data
        if getattr(type(self.config.model), "NEEDS_LOADED_DATA", False):
            return data.feature_spec(with_training_graph=True)
        return data.feature_spec()

    @property
    def gflops_per_example(self) -> float:
        return self.config.model.flops_per_example(self.feature_spec()) / 1e9

    @property
    def train_flops(self) -> float:
        """Estimated training compute: 3 x forward FLOPs x examples."""
        return 3e9 * self.gflops_per_example * self.config.train.steps * self.config.train.batch_size

    def axes_text(self, skip: tuple[str, ...] = ()) -> str:
        """The swept values as `leaf=value` pairs, e.g. `learning_rate=0.002 steps=500`."""
        return " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in self.axes if k not in skip)

    @property
    def label(self) -> str:
        """Short human label, e.g. `wukong:m seed 1 learning_rate=0.002`."""
        return " ".join(p for p in (f"{self.family}:{self.size}", f"seed {self.seed}", self.axes_text()) if p)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """All trials of a sweep YAML and what the analysis needs to know about them."""

    path: str
    name: str
    directory: str
    trials: tuple[Trial, ...]
    tune: tuple[str, ...]
    metric: str

    def manifest(self) -> dict[str, Any]:
        """What `sweep.json` holds: enough for analysis to group trials without the YAML."""
        return {
            "name": self.name,
            "sweep_file": self.path,
            "tune": list(self.tune),
            "metric": self.metric,
            "trials": [
                {"trial_id": t.trial_id, "family": t.family, "size": t.size, "seed": t.seed,
                 "axes": {k: v for k, v in t.axes}, "target_gflops": t.target_gflops}
                for t in self.trials
            ],
        }

    def write_manifest(self) -> str:
        return write_json(os.path.join(self.directory, "sweep.json"), self.manifest(), indent=2, default=str)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _families() -> dict[str, type]:
    from scaling.models.registry import model_config_classes

    return model_config_classes()


def _check_family(name: Any, path: str) -> str:
    families = _families()
    if name not in families:
        raise ConfigError(path, f"unknown model family {name!r}{_did_you_mean(str(name), sorted(families))}; "
                                f"expected one of {', '.join(sorted(families))}")
    return str(name)


def _as_list(value: Any, path: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(path, "empty list; give at least one value")
        return list(value)
    raise ConfigError(path, f"expected a list (or a mapping of default/family/family.size to lists), got {value!r}")


def _scoped(value: Any, path: str) -> dict[str, list[Any]]:
    """A plain list -> {'default': list}; a mapping is validated key by key."""
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(path, "empty mapping")
        families = _families()
        out = {}
        for scope, values in value.items():
            scope = str(scope)
            family, _, size = scope.partition(".")
            if scope != "default":
                _check_family(family, f"{path}.{scope}")
                sizes = families[family].SIZES
                if size and size not in sizes:
                    raise ConfigError(f"{path}.{scope}", f"unknown size {size!r} of {family}"
                                                         f"{_did_you_mean(size, list(sizes))}; expected one of {', '.join(sizes)}")
            out[scope] = _as_list(values, f"{path}.{scope}")
        return out
    return {"default": _as_list(value, path)}


def _pick(scoped: Mapping[str, list[Any]], family: str, size: str) -> list[Any] | None:
    for scope in (f"{family}.{size}", family, "default"):
        if scope in scoped:
            return scoped[scope]
    return None


def _seeds(value: Any, base_seed: int) -> dict[str, list[Any]]:
    if value is None:
        return {"default": [base_seed]}
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError("sweep.seeds", f"a count must be >= 1, got {value}")
        return {"default": list(range(value))}
    scoped = _scoped(value, "sweep.seeds")
    for scope, seeds in scoped.items():
        for s in seeds:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise ConfigError(f"sweep.seeds.{scope}", f"seeds must be integers >= 0, got {s!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep.seeds.{scope}", f"repeated seed in {seeds}")
    return scoped


def _axis_keys(section: Any, name: str) -> dict[str, dict[str, list[Any]]]:
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"sweep.{name}", "expected a mapping of config keys (a.b.c) to lists of values")
    axes = {}
    for key, value in section.items():
        key = str(key)
        if key in _RESERVED:
            raise ConfigError(f"sweep.{name}.{key}", f"cannot be swept: {_RESERVED[key]}")
        axes[key] = _scoped(value, f"sweep.{name}.{key}")
    return axes


@dataclasses.dataclass(frozen=True)
class _ScaleEntry:
    family: str
    size: str
    target_gflops: float | None
    overrides: tuple[tuple[str, Any], ...]


def _family_model_section(base: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The base `model:` section applies to its own family; another family starts from its defaults."""
    model = dict(base.get("model") or {})
    if model.get("name") == family:
        model.pop("size", None)
        return model
    return {"name": family}


def _resolve_gflops(base: dict[str, Any], family: str, targets: list[Any], overrides, path: str) -> list[_ScaleEntry]:
    """Each target GFLOP/example -> the family's preset nearest in log FLOPs."""
    sizes = list(_families()[family].SIZES)
    if not sizes:
        raise ConfigError(path, f"{family} has no size ladder to resolve GFLOP targets against")
    ladder = []
    for size in sizes:
        config = _trial_config(base, family, size, overrides, (), base.get("seed", 0), path)
        ladder.append((size, config.model.flops_per_example(config.data.feature_spec()) / 1e9))
    entries, taken = [], {}
    for target in targets:
        if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
            raise ConfigError(path, f"GFLOP/example targets must be positive numbers, got {target!r}")
        size, _ = min(ladder, key=lambda item: abs(math.log(item[1] / target)))
        if size in taken:
            raise ConfigError(path, f"targets {taken[size]:g} and {target:g} both resolve to size {size!r}; "
                                    f"drop one or list sizes instead")
        taken[size] = float(target)
        entries.append(_ScaleEntry(family, size, float(target), overrides))
    return entries


def _scale_entries(base: dict[str, Any], scale: Any) -> list[_ScaleEntry]:
    if scale is None:
        model = base.get("model") or {}
        family = _check_family(model.get("name"), "model.name")
        return [_ScaleEntry(family, str(model.get("size", "custom")), None, ())]
    if not isinstance(scale, Mapping) or not scale:
        raise ConfigError("sweep.scale", "expected a mapping of family -> list of sizes (or {sizes, gflops, set})")
    entries: list[_ScaleEntry] = []
    for family, spec in scale.items():
        path = f"sweep.scale.{family}"
        family = _check_family(family, path)
        sizes_cls = _families()[family].SIZES
        if spec is None:  # `popularity:` alone: one trial with the family's defaults
            spec = {}
        if isinstance(spec, (list, tuple)):
            spec = {"sizes": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(path, "expected a list of sizes or a mapping {sizes: [...], gflops: [...], set: {...}}")
        unknown = [k for k in spec if k not in ("sizes", "gflops", "set")]
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}", f"unknown key{_did_you_mean(str(unknown[0]), ['sizes', 'gflops', 'set'])}; "
                                                      "expected sizes, gflops or set")
        sets = spec.get("set") or {}
        if not isinstance(sets, Mapping):
            raise ConfigError(f"{path}.set", "expected a mapping of config keys (a.b.c) to values")
        for key in sets:
            if key in _RESERVED:
                raise ConfigError(f"{path}.set.{key}", f"cannot be set per family: {_RESERVED[key]}")
        overrides = tuple((str(k), v) for k, v in sets.items())
        if "sizes" not in spec and "gflops" not in spec:  # one trial, no preset (families without a ladder)
            entries.append(_ScaleEntry(family, "custom", None, overrides))
            continue
        for size in _as_list(spec["sizes"], f"{path}.sizes") if "sizes" in spec else []:
            if size not in sizes_cls:
                raise ConfigError(f"{path}.sizes", f"unknown size {size!r} of {family}"
                                                   f"{_did_you_mean(str(size), list(sizes_cls))}; expected one of {', '.join(sizes_cls)}")
            entries.append(_ScaleEntry(family, str(size), None, overrides))
        if "gflops" in spec:
            entries += _resolve_gflops(base, family, _as_list(spec["gflops"], f"{path}.gflops"), overrides, f"{path}.gflops")
    return entries


def _trial_config(base: Mapping[str, Any], family: str, size: str, family_sets, axes, seed: int, where: str) -> RunConfig:
    raw = json.loads(json.dumps(base))  # deep copy of plain data
    raw["model"] = {**_family_model_section(base, family), "name": family}
    if size != "custom":  # families without a ladder have no `size` knob
        raw["model"]["size"] = size
    raw["seed"] = seed
    try:
        for key, value in (*family_sets, *axes):
            set_path(raw, key, value)
        return load_run_config(None, data=raw)
    except ConfigError as err:
        raise ConfigError(err.path, f"{err.message} (in {where})") from None


def load_sweep(path: str, overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep YAML (or a plain run YAML: one trial) and expand it into validated trials."""
    from scaling.config import apply_overrides

    raw = load_yaml(path)
    section = raw.pop("sweep", None) or {}
    if not isinstance(section, Mapping):
        raise ConfigError("sweep", "expected a mapping with keys " + ", ".join(SWEEP_KEYS))
    unknown = [k for k in section if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}", f"unknown key{_did_you_mean(str(unknown[0]), list(SWEEP_KEYS))}; "
                                                 f"expected one of {', '.join(SWEEP_KEYS)}")
    base = apply_overrides(raw, overrides)
    base_config = load_run_config(None, data=base)  # the base alone must be valid
    grid = _axis_keys(section.get("grid"), "grid")
    zipped = _axis_keys(section.get("zip"), "zip")
    both = set(grid) & set(zipped)
    if both:
        raise ConfigError(f"sweep.zip.{sorted(both)[0]}", "is also a grid axis; sweep a key on one axis only")
    seeds = _seeds(section.get("seeds"), base_config.seed)
    tune = tuple(str(k) for k in (section.get("tune") or ()))
    for key in tune:
        if key not in grid:
            raise ConfigError("sweep.tune", f"{key!r} is not a grid axis; tune picks the best value among a grid's values")
    metric = str(section.get("metric", "logloss"))

    trials: list[Trial] = []
    seen: dict[str, str] = {}
    for entry in _scale_entries(base, section.get("scale")):
        fam, size = entry.family, entry.size
        grid_axes = [(k, v) for k, scoped in grid.items() if (v := _pick(scoped, fam, size)) is not None]
        zip_axes = [(k, v) for k, scoped in zipped.items() if (v := _pick(scoped, fam, size)) is not None]
        lengths = {k: len(v) for k, v in zip_axes}
        if len(set(lengths.values())) > 1:
            raise ConfigError("sweep.zip", f"lists must have equal lengths for {fam}:{size}, got "
                                           + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        zip_rows = [tuple((k, v[i]) for k, v in zip_axes) for i in range(next(iter(lengths.values()), 1))]
        grid_rows = itertools.product(*[[(k, value) for value in values] for k, values in grid_axes])
        for grid_row, zip_row in itertools.product(list(grid_rows), zip_rows):
            axes = tuple(grid_row) + tuple(zip_row)
            for seed in _pick(seeds, fam, size) or [base_config.seed]:
                where = f"trial {fam}:{size} seed {seed}" + "".join(f" {k}={_fmt(v)}" for k, v in axes)
                config = _trial_config(base, fam, size, entry.overrides, axes, seed, where)
                tid = run_id(config)
                if tid in seen:
                    raise ConfigError("sweep", f"{seen[tid]} and {where} resolve to the same config ({tid}); "
                                               "remove the duplicate axis value")
                seen[tid] = where
                trials.append(Trial(len(trials), tid, config, fam, size, seed, axes, entry.target_gflops))
    return Sweep(
        path=path,
        name=base_config.name,
        directory=os.path.join(base_config.train.output_dir, base_config.name),
        trials=tuple(trials),
        tune=tune,
        metric=metric,
    )
