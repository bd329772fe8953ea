"""The run configuration: one frozen dataclass tree, YAML key for key, with `a.b=c` overrides.

    RunConfig
      name, seed
      data:       DataConfig (by `name`; e.g. synthetic_ctr)
      model:      ModelConfig (by `name`; e.g. wukong, dlrm; optional `size` preset)
      optimizer:  dense (AdamW ...), embedding (row-wise Adagrad ...), schedule
      train:      steps, batch size, eval/log/checkpoint cadence, dtype, output dir
      sharding:   mesh shape and layout name
      logging:    progress bar, W&B

A sweep YAML is a run config plus a `sweep:` section (axes); `load_run_config` ignores the axes
(`scaling sweep` expands them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import yaml

from scaling.config_schema import Choice, ConfigError, _did_you_mean, build, knob, to_dict

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "DenseOptimizerConfig",
    "EmbeddingOptimizerConfig",
    "ScheduleConfig",
    "OptimizerConfig",
    "TrainConfig",
    "MeshConfig",
    "ShardingConfig",
    "WandbConfig",
    "LoggingConfig",
    "RunConfig",
    "load_yaml",
    "load_run_config",
    "apply_overrides",
    "run_id",
    "dump_yaml",
]


class DataConfig(Choice):
    """Base of data set configs; concrete classes register in `scaling.data.registry`."""

    KIND: ClassVar[str] = "data set"
    DEFAULT: ClassVar[str | None] = "synthetic_ctr"

    @classmethod
    def registry(cls) -> dict[str, type]:
        from scaling.data.registry import data_config_classes

        return data_config_classes()


class ModelConfig(Choice):
    """Base of model family configs; concrete classes register in `scaling.models.registry`."""

    KIND: ClassVar[str] = "model"

    @classmethod
    def registry(cls) -> dict[str, type]:
        from scaling.models.registry import model_config_classes

        return model_config_classes()


@dataclasses.dataclass(frozen=True)
class DenseOptimizerConfig:
    name: Literal["adamw", "adam", "sgd", "rmsprop"] = knob("adamw", help="optimizer of the dense parameters")
    learning_rate: float = knob(2e-3, gt=0.0, help="peak learning rate")
    b1: float = knob(0.9, ge=0.0, lt=1.0)
    b2: float = knob(0.999, ge=0.0, le=1.0)
    eps: float = knob(1e-8, gt=0.0)
    weight_decay: float = knob(0.0, ge=0.0, help="decoupled weight decay (adamw)")
    grad_clip_norm: float = knob(1.0, ge=0.0, help="global-norm clip of dense gradients; 0 disables")


@dataclasses.dataclass(frozen=True)
class EmbeddingOptimizerConfig:
    name: Literal["rowwise_adagrad", "adagrad", "adam", "sgd", "dense"] = knob(
        "rowwise_adagrad", help="optimizer of the embedding tables (row-wise Adagrad is the recsys norm; "
        "dense = the dense optimizer and its settings)"
    )
    learning_rate: float = knob(0.05, gt=0.0)
    eps: float = knob(1e-8, gt=0.0)
    initial_accumulator: float = knob(0.0, ge=0.0, help="starting Adagrad accumulator")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "constant"] = knob("cosine", help="learning-rate shape after warmup")
    warmup_fraction: float = knob(0.05, ge=0.0, lt=1.0, help="linear warmup, as a fraction of train.steps")
    final_fraction: float = knob(0.1, ge=0.0, le=1.0, help="cosine floor, as a fraction of the peak")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    dense: DenseOptimizerConfig = knob(default_factory=DenseOptimizerConfig)
    embedding: EmbeddingOptimizerConfig = knob(default_factory=EmbeddingOptimizerConfig)
    schedule: ScheduleConfig = knob(default_factory=ScheduleConfig)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = knob(2000, ge=1, help="optimizer steps")
    batch_size: int = knob(512, ge=1, help="global batch size")
    eval_every: int = knob(500, ge=0, help="steps between evaluations (0: only at the end)")
    eval_batch_size: int = knob(4096, ge=1)
    log_every: int = knob(50, ge=1, help="steps between metrics.jsonl lines")
    checkpoint_every: int = knob(500, ge=0, help="steps between orbax checkpoints (0: only at the end)")
    keep_checkpoints: int = knob(2, ge=1, help="checkpoints kept (keep-last-N)")
    compute_dtype: Literal["float32", "bfloat16"] = knob("float32", help="activation dtype; params stay float32")
    output_dir: str = knob("runs", help="run directories go to <output_dir>/<name>/<run_id>/")
    reference_run: str = knob("", help="result.json (or run dir) whose eval logloss is the relative-logloss baseline")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = knob(-1, help="data-parallel devices; -1 = all remaining devices")
    fsdp: int = knob(1, help="fully-sharded devices; -1 = all remaining devices")
    tensor: int = knob(1, help="tensor-parallel devices; -1 = all remaining devices")

    def check(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(key, f"expected a positive device count or -1, got {size}")
        if sum(1 for s in sizes.values() if s == -1) > 1:
            raise ConfigError("data", "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    mesh: MeshConfig = knob(default_factory=MeshConfig)
    layout: str = knob("dp", help="named layout: a logical-axis rule set (dp, fsdp, fsdp_tp, ...)")
    embedding: Literal["replicated", "row_wise", "table_wise", "gspmd"] = knob(
        "replicated", help="how embedding tables are placed and looked up across the data/fsdp devices")
    embedding_capacity: float = knob(
        2.0, gt=0, help="row_wise/table_wise: ids one device may send one peer per lookup, as a multiple of the even share")
    rules: tuple[str, ...] = knob((), help="extra logical-axis rules over the layout's, e.g. [mlp=tensor+fsdp, rank=]")

    def check(self) -> None:
        from scaling.sharding.rules import available_layouts, parse_rule

        names = available_layouts()
        if self.layout not in names:
            raise ConfigError("layout", f"unknown layout {self.layout!r}{_did_you_mean(self.layout, names)}; "
                                        f"expected one of {', '.join(names)}")
        for i, text in enumerate(self.rules):
            parse_rule(text, f"rules[{i}]")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = knob("offline", help="offline by default; never required")
    project: str = knob("recsys-scaling")
    entity: str = knob("")
    group: str = knob("", help="defaults to the run name (the sweep)")
    tags: tuple[str, ...] = knob(())
    dir: str = knob("", help="where wandb/ goes; defaults to the run directory")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    progress: bool = knob(True, help="live progress bar")
    wandb: WandbConfig = knob(default_factory=WandbConfig)


def _default_data() -> DataConfig:
    from scaling.data.registry import data_config_classes

    return data_config_classes()["synthetic_ctr"]()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    name: str = knob("run", help="run group; the run directory is <output_dir>/<name>/<run_id>")
    seed: int = knob(0, ge=0, help="model init and data-order seed")
    data: DataConfig = knob(default_factory=_default_data)
    optimizer: OptimizerConfig = knob(default_factory=OptimizerConfig)
    train: TrainConfig = knob(default_factory=TrainConfig)
    sharding: ShardingConfig = knob(default_factory=ShardingConfig)
    logging: LoggingConfig = knob(default_factory=LoggingConfig)

    def check(self) -> None:
        """The model family and the data set must be of the same kind (click, ranking or next item);
        a ranking data set also serves click models, which read its histories as multi-hot fields."""
        model_task = getattr(type(self.model), "TASK", "ctr")
        data_task = getattr(type(self.data), "TASK", "ctr")
        if model_task != data_task and (model_task, data_task) != ("ctr", "ranking"):
            raise ConfigError("model.name", f"'{self.model.name}' is a {model_task} model but data.name "
                              f"'{self.data.name}' is a {data_task} data set")
        if data_task == "next_item" and self.data.num_negatives < 1:
            raise ConfigError("data.num_negatives", "next-item training needs at least 1 negative")


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`; errors name the file and line."""
    if not os.path.exists(path):
        raise ConfigError("", f"{path}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("", f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to nested YAML data (values parsed by yaml.safe_load)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "expected an override of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_path(data, key.strip(), value)
    return data


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested YAML data in place, creating sections as needed."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section; cannot set a key inside it")
        node = child
    node[parts[-1]] = value


def load_run_config(path: str | None, overrides: Sequence[str] = (), data: Mapping[str, Any] | None = None) -> RunConfig:
    """YAML file (or data) + overrides -> validated RunConfig. The `sweep:` section is ignored."""
    raw = dict(data) if data is not None else (load_yaml(path) if path else {})
    raw.pop("sweep", None)
    raw = apply_overrides(raw, overrides)
    return build(RunConfig, raw)


# Keys that do not change what is computed; they stay out of the run id.
_NON_SEMANTIC = {("logging",), ("train", "output_dir"), ("name",), ("train", "log_every")}
# Keys added after run directories existed: hashed only when set off their default (read from
# ShardingConfig), so a run made before they existed keeps its id (a relaunched sweep finds its
# finished trials).
_HASHED_WHEN_SET = {("sharding", key): value for key, value in to_dict(ShardingConfig()).items()
                    if key in ("embedding", "embedding_capacity", "rules")}


def _semantic(d: Any, prefix: tuple[str, ...] = ()) -> Any:
    if isinstance(d, dict):
        return {k: _semantic(v, prefix + (k,)) for k, v in d.items() if prefix + (k,) not in _NON_SEMANTIC
                and _HASHED_WHEN_SET.get(prefix + (k,), object()) != v}
    return d


def run_id(config: RunConfig) -> str:
    """Stable id from the resolved config: `<model>-<size>-<hash8>`; reruns find their directory."""
    payload = json.dumps(_semantic(to_dict(config)), sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    size = getattr(config.model, "size", "") or "custom"
    return f"{config.model.name}-{size}-{digest}"


def dump_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (round-trips through `load_run_config`)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
