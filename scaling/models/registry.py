"""Model families by name: `model.name` in YAML picks the config class and the nnx.Module."""

from __future__ import annotations

import importlib

from flax import nnx

_MODELS: dict[str, tuple[type, type]] = {}
# Modules that register model families on import.
_FAMILY_MODULES = ("scaling.models.wukong", "scaling.models.dlrm", "scaling.models.hstu", "scaling.models.sasrec")


def register_model(name: str, config_cls: type):
    """Class decorator: register an nnx.Module family built from `config_cls`."""

    def wrap(model_cls: type) -> type:
        _MODELS[name] = (config_cls, model_cls)
        return model_cls

    return wrap


def _load() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def model_config_classes() -> dict[str, type]:
    _load()
    return {name: cfg for name, (cfg, _) in _MODELS.items()}


def model_class(name: str) -> type:
    _load()
    return _MODELS[name][1]


def build_model(config, spec, *, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiate the registered family of `config` for a data spec."""
    return model_class(config.name)(config, spec, rngs=rngs)
