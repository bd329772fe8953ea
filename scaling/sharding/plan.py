"""`scaling shard-plan`: where every parameter of a run would live, and what its compiled train
step would need per device, without training (nothing is allocated but the step's compilation).

    scaling shard-plan sweeps/quickstart.yaml --devices 8 --set sharding.layout=fsdp --model wukong:s+

Per parameter: path, shape, logical axes, PartitionSpec, bytes per device (a fallback, a mesh
axis that divides no dimension of it, is flagged). Then the totals: parameter bytes in all and per
device, the replicated share (bytes every device holds whole), train-state bytes per device
(parameters + optimizer states) and XLA's `memory_analysis()` of the AOT-compiled train step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

from scaling.config import RunConfig, load_run_config
from scaling.config_schema import ConfigError

DEVICES_ENV = "SCALING_FORCED_DEVICES"


def force_host_devices(count: int) -> bool:
    """Make JAX see `count` CPU devices. True when done in this process (JAX not yet imported);
    False when the caller must re-run itself in a fresh interpreter with `forced_env(count)`."""
    if os.environ.get(DEVICES_ENV) == str(count):
        return True
    if "jax" in sys.modules:  # XLA_FLAGS is read once, when the backend starts
        return False
    os.environ.update(forced_env(count))
    return True


def forced_env(count: int) -> dict[str, str]:
    """The environment of a process that should see `count` host CPU devices (any other
    --xla_force_host_platform_device_count in XLA_FLAGS is replaced)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    flags = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", DEVICES_ENV: str(count)}


def pick_config(path: str, overrides: list[str], model: str | None) -> RunConfig:
    """The run config of a run YAML, or of a sweep's trial: `model` 'family:size' (or 'family')
    picks the first trial of that family and size; None: the sweep's base config."""
    if model is None:
        return load_run_config(path, overrides)
    from scaling.sweep.spec import load_sweep

    family, _, size = model.partition(":")
    trials = load_sweep(path, overrides).trials
    for trial in trials:
        if trial.family == family and (not size or trial.size == size):
            return trial.config
    choices = sorted({f"{t.family}:{t.size}" for t in trials})
    raise ConfigError("--model", f"{model!r} is not among the trials of {path}; expected one of {', '.join(choices)}")


@dataclasses.dataclass
class ShardPlan:
    config: RunConfig
    devices: int
    placements: list  # ParamPlacement
    summary: dict[str, Any]
    memory: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        from scaling.sharding.rules import spec_to_json

        return {
            "model": f"{self.config.model.name}:{getattr(self.config.model, 'size', 'custom')}",
            "devices": self.devices,
            **self.summary,
            "compiled_step": self.memory,
            "params": [{"path": p.path, "shape": list(p.shape), "logical": list(p.logical), "spec": spec_to_json(p.spec),
                        "bytes": p.bytes, "bytes_per_device": p.bytes_per_device, "fallbacks": list(p.fallbacks)}
                       for p in self.placements],
        }


def step_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled step (XLA memory_analysis); total = arguments + outputs -
    aliased (donated buffers reused for outputs) + temporaries. Empty where unsupported."""
    from scaling.train.run_record import compiled_memory  # imports JAX: not before force_host_devices

    stats = compiled_memory(compiled)
    if not stats:
        return {}
    out = {k: stats[f"step_{k}_bytes"] for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def shard_plan(config: RunConfig) -> ShardPlan:
    """Place the run's state on the visible devices and AOT-compile its train step."""
    import jax

    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    setup = prepare(config, dataset_of(config.data))
    partitioner = setup.partitioner
    with partitioner.activate():
        compiled = setup.compile_train_step()
    return ShardPlan(config, len(jax.devices()), partitioner.placements(setup.abstract),
                     partitioner.summary(setup.abstract), step_memory(compiled))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.3f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _spec_text(spec) -> str:
    parts = []
    for e in spec:
        parts.append("·" if e is None else "+".join(e) if isinstance(e, tuple) else e)
    return "(" + ", ".join(parts) + ")"


def print_plan(plan: ShardPlan, console) -> None:
    """The plan as a Rich table of parameters and a block of totals."""
    from rich.table import Table

    s = plan.summary
    mesh = " x ".join(f"{k} {v}" for k, v in s["mesh"].items())
    title = (f"{plan.config.model.name}:{getattr(plan.config.model, 'size', 'custom')} - layout {s['layout']}, "
             f"embedding {s['embedding']}, {plan.devices} devices ({mesh})")
    table = Table(title=title, title_justify="left")
    for name, justify in (("parameter", "left"), ("shape", "right"), ("logical axes", "left"), ("spec", "left"),
                          ("bytes/device", "right"), ("", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "")
    for p in plan.placements:
        logical = "(" + ", ".join(a or "·" for a in p.logical) + ")"
        note = "[yellow]" + "; ".join(p.fallbacks) + "[/]" if p.fallbacks else ("replicated" if p.replicated else "")
        table.add_row(p.path, "x".join(map(str, p.shape)) or "scalar", logical, _spec_text(p.spec),
                      f"{p.bytes_per_device:,}", note)
    console.print(table)
    console.print(f"parameters: {_mib(s['param_bytes'])} in all, {_mib(s['param_bytes_per_device'])} per device; "
                  f"replicated share {100 * s['replicated_param_share']:.2f}% of parameter bytes "
                  f"(dense parameters {100 * s['dense_replicated_share']:.2f}%)")
    console.print(f"train state (parameters + optimizer states): {_mib(s['state_bytes_per_device'])} per device")
    from scaling.sharding.rules import load_layout

    rules = load_layout(plan.config.sharding.layout, plan.config.sharding.rules)
    split_axes = sorted({a for name, axes in rules.table if name != "batch" for a in axes})
    if split_axes and all(s["mesh"][a] == 1 for a in split_axes):
        console.print(f"[yellow]layout {s['layout']} splits parameters over {', '.join(split_axes)}, all of size 1 in "
                      f"this mesh: nothing is split (set sharding.mesh.* to give them devices)[/]")
    if s["fallbacks"]:
        console.print(f"[yellow]{len(s['fallbacks'])} parameters keep a mesh axis replicated (no dimension divides it)[/]")
    m = plan.memory
    if m:
        console.print(f"compiled train step per device (XLA memory_analysis): {_mib(m['total'])} = arguments "
                      f"{_mib(m['argument'])} + outputs {_mib(m['output'])} - aliased {_mib(m['alias'])} + "
                      f"temporaries {_mib(m['temp'])}")
    else:
        console.print("compiled train step: this backend reports no memory analysis")
