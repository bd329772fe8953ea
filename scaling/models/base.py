"""What every model family provides: the contract the training loop, FLOP accounting and sweeps use.

A family is an `nnx.Module` registered with `register_model(name, ConfigClass)`:

    class Wukong(CTRModel):
        def __init__(self, config: WukongConfig, spec: CTRFeatureSpec, *, rngs: nnx.Rngs): ...
        def __call__(self, batch) -> logits [B]

and its frozen config (a `ModelConfig`) exposes, without building the model:
    flops_per_example(spec) -> float           forward dense FLOPs (2 x multiply-adds)
    embedding_bytes_per_example(spec) -> float  bytes gathered from embedding tables
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from flax import nnx

from scaling.config import ModelConfig
from scaling.models.embedding import EmbeddingTable
from scaling.sharding.annotate import natural_count
from scaling.sharding.embedding import natural_size


class CTRModelConfig(ModelConfig):
    """Shared by CTR family configs (which define `embed_dim`): one embedding row per field."""

    def embedding_bytes_per_example(self, spec) -> float:
        """Bytes gathered from the float32 embedding tables per example (one row per single-hot
        field, bag_length rows per multi-hot field)."""
        rows = spec.num_sparse + len(spec.bag_cardinalities) * spec.bag_length
        return float(rows * self.embed_dim * 4)


class CTRModel(nnx.Module):
    """Base class of CTR families: batch {'sparse' [B,F] int32, 'dense' [B,D]} -> logits [B]."""

    batch_keys: tuple[str, ...] = ("sparse", "dense")

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    dense: int
    embedding: int

    @property
    def total(self) -> int:
        return self.dense + self.embedding


def _count(state: nnx.State) -> int:
    """Parameters of a state, storage padding (`annotate.padded_vector`) excluded."""
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return int(sum(natural_count(x) if isinstance(x, nnx.Variable) else x.size for x in leaves))


def param_counts(model: nnx.Module) -> ParamCounts:
    """Parameters split into embedding tables and everything else (dense). Tables count their
    natural rows: the padding rows of a sharded layout are not parameters."""
    _, emb, dense, _ = nnx.split(model, EmbeddingTable, nnx.Param, ...)
    tables = jax.tree.leaves(emb, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return ParamCounts(dense=_count(dense), embedding=sum(natural_size(t) for t in tables))


def abstract_param_counts(config, spec) -> ParamCounts:
    """Parameter counts without allocating (via nnx.eval_shape); zeros for a fitted baseline, whose
    size is known only after its fit (the run record has it)."""
    from scaling.models.registry import build_model, is_fitted

    if is_fitted(config):
        return ParamCounts(dense=0, embedding=0)

    model = nnx.eval_shape(lambda: build_model(config, spec, rngs=nnx.Rngs(0)))
    return param_counts(model)
