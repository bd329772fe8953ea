"""FLOPs per example: the analytic count of each family, cross-checked against XLA.

What is counted (the project's convention, DESIGN.md "Numbers and metrics"):
  - the forward pass of one example, dense math only: every matmul/einsum as 2 x multiply-adds,
    plus elementwise ops at one FLOP per output element (bias adds, ReLUs, residual adds) and
    LayerNorm at 8 FLOPs per element (formulas in scaling.models.mlp). Elementwise terms are a
    few percent of the total at the smallest sizes; they are counted because XLA counts them, so
    the two figures agree closely at every size;
  - interactions as computed (e.g. DLRM's full F' x F' Gram matrix, not only its upper triangle);
  - NOT the embedding gathers: those move bytes, reported as embedding bytes/example;
  - NOT transcendentals (rsqrt in LayerNorm; XLA reports them separately).
Training FLOPs = 3 x forward (run records multiply by examples seen).

The XLA figure compiles the forward on an all-zero batch of abstract shapes (nothing is allocated
or run) and reads `compiled.cost_analysis()['flops']`, divided by the batch size. tests/test_flops.py
holds every registered family's analytic figure within 10% of it at several sizes. On CPU, XLA
reads a few percent higher for Wukong at mid sizes (fusion recomputes a LayerNorm's elementwise ops
in each consumer) and ~600 FLOPs/example higher everywhere (index arithmetic of the embedding
gather); neither is model math, so the analytic figure leaves them out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.data.spec import CTRFeatureSpec, RankingSpec, SequenceSpec
from scaling.models.base import abstract_param_counts

__all__ = [
    "FlopReport",
    "analytic_flops_per_example",
    "xla_flops_per_example",
    "flop_report",
    "abstract_model",
    "flops_from_cost",
]


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """FLOPs and sizes of one model config on one data spec (per example, forward)."""

    family: str
    size: str
    analytic_flops: float
    xla_flops: float
    dense_params: int
    embedding_params: int
    embedding_bytes: float

    @property
    def relative_error(self) -> float:
        """(analytic - xla) / xla."""
        return (self.analytic_flops - self.xla_flops) / self.xla_flops

    @property
    def train_flops(self) -> float:
        """Training FLOPs per example: 3 x forward (analytic)."""
        return 3.0 * self.analytic_flops

    def to_json(self) -> dict[str, Any]:
        """Flat, human-ordered fields for `scaling flops` (GFLOP figures per example)."""
        return {
            "family": self.family,
            "size": self.size,
            "forward_gflops_per_example_analytic": self.analytic_flops / 1e9,
            "forward_gflops_per_example_xla": self.xla_flops / 1e9,
            "analytic_vs_xla_relative_error": self.relative_error,
            "train_gflops_per_example": self.train_flops / 1e9,
            "params_dense": self.dense_params,
            "params_embedding": self.embedding_params,
            "embedding_bytes_per_example": self.embedding_bytes,
        }


def analytic_flops_per_example(model_config: Any, spec: CTRFeatureSpec) -> float:
    """The family's own formula: `model_config.flops_per_example(spec)`."""
    return float(model_config.flops_per_example(spec))


def abstract_model(model_config: Any, spec: CTRFeatureSpec, seed: int = 0) -> nnx.Module:
    """The registered model of `model_config` with abstract (shape-only) parameters."""
    from scaling.models.registry import build_model

    return nnx.eval_shape(lambda: build_model(model_config, spec, rngs=nnx.Rngs(seed)))


def _zero_batch(spec: CTRFeatureSpec | SequenceSpec, batch_size: int, max_len: int | None) -> dict[str, jax.ShapeDtypeStruct]:
    if isinstance(spec, SequenceSpec):
        ints = lambda *shape: jax.ShapeDtypeStruct((batch_size, *shape), jnp.int32)  # noqa: E731
        L = int(max_len)
        return {"items": ints(L), "timestamps": ints(L), "next_timestamps": ints(L), "lengths": ints(),
                "users": ints(), "targets": ints(L), "negatives": ints(L, spec.num_negatives)}
    batch = {
        "sparse": jax.ShapeDtypeStruct((batch_size, spec.num_sparse), jnp.int32),
        "dense": jax.ShapeDtypeStruct((batch_size, spec.num_dense), jnp.float32),
    }
    if spec.bag_cardinalities:
        history = (batch_size, len(spec.bag_cardinalities), spec.bag_length)
        batch["history"] = jax.ShapeDtypeStruct(history, jnp.int32)
        if isinstance(spec, RankingSpec):
            batch["history_actions"] = jax.ShapeDtypeStruct(history, jnp.int32)
            batch["history_times"] = jax.ShapeDtypeStruct(history, jnp.int32)
            batch["request_time"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return batch


def sequence_training_forward(model: nnx.Module, batch) -> jax.Array:
    """What a next-item model computes per training sequence before the loss (its `training_forward`:
    by default the queries [B, L, D] and their dot products with the target and negatives [B, L, 1 + M])."""
    return model.training_forward(batch)


def flops_from_cost(cost: Any) -> float:
    """`cost_analysis()` returns a dict, or (older jax / some backends) a list of dicts, or None."""
    if cost is None:
        raise RuntimeError("XLA returned no cost analysis on this backend")
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost if c))
    return float(cost.get("flops", 0.0))


def xla_flops_per_example(model: nnx.Module, spec: CTRFeatureSpec | SequenceSpec, batch_size: int = 8,
                          max_len: int | None = None) -> float:
    """XLA's FLOP count of the forward per example (the model may be abstract, from eval_shape):
    `model(batch)` for CTR models, `sequence_training_forward` at `max_len` for next-item models."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    sequence = isinstance(spec, SequenceSpec)

    def forward(state, batch):
        model = nnx.view(nnx.merge(graphdef, state), deterministic=True, raise_if_not_found=False)
        return sequence_training_forward(model, batch) if sequence else model(batch)

    compiled = jax.jit(forward).lower(state, _zero_batch(spec, batch_size, max_len)).compile()
    return flops_from_cost(compiled.cost_analysis()) / batch_size


def flop_report(model_config: Any, spec: CTRFeatureSpec, batch_size: int = 8) -> FlopReport:
    """Analytic and XLA FLOPs/example, dense and embedding parameter counts, embedding bytes."""
    counts = abstract_param_counts(model_config, spec)
    return FlopReport(
        family=model_config.name,
        size=getattr(model_config, "size", "custom"),
        analytic_flops=analytic_flops_per_example(model_config, spec),
        xla_flops=xla_flops_per_example(abstract_model(model_config, spec), spec, batch_size,
                                        getattr(model_config, "max_len", None)),
        dense_params=counts.dense,
        embedding_params=counts.embedding,
        embedding_bytes=float(model_config.embedding_bytes_per_example(spec)),
    )
