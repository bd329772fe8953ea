"""Model families by name: `model.name` in YAML picks the config class and the nnx.Module."""

from __future__ import annotations

import importlib

from flax import nnx

_MODELS: dict[str, tuple[type, type | None]] = {}
# Modules that register model families on import.
_FAMILY_MODULES = (
    "scaling.models.wukong",
    "scaling.models.dlrm",
    "scaling.models.hstu",
    "scaling.models.sasrec",
    "scaling.models.onetrans",
    "scaling.models.din",
    "scaling.models.hstu_ranker",
    "scaling.models.baselines.catalogue",
)


def register_model(name: str, config_cls: type):
    """Class decorator: register an nnx.Module family built from `config_cls`."""

    def wrap(model_cls: type) -> type:
        _MODELS[name] = (config_cls, model_cls)
        return model_cls

    return wrap


def register_fitted(name: str):
    """Class decorator: register a fitted baseline's config (`scaling.models.baselines.fitted`);
    it has no nnx.Module: `scaling.train.fit_run` fits it."""

    def wrap(config_cls: type) -> type:
        _MODELS[name] = (config_cls, None)
        return config_cls

    return wrap


def is_fitted(config) -> bool:
    """True for a fitted baseline's config (fit by its own solver, not the gradient loop)."""
    return bool(getattr(type(config), "FITTED", False))


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
    cls = model_class(config.name)
    if cls is None:
        raise TypeError(f"'{config.name}' is a fitted baseline; it has no nnx.Module (scaling.train.fit_run fits it)")
    return cls(config, spec, rngs=rngs)
