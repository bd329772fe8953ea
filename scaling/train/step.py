"""The train state and the jitted train / eval steps.

The NNX model is split once into a static graph and two parameter groups (embedding tables and
dense parameters), each with its own optimizer. The step is a pure function of (state, batch),
jitted once with the state donated; it never recompiles after step 0 because every batch has the
same static shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from scaling.models.embedding import EmbeddingTable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint holds about the model and optimizers.

    step:          int32 scalar, optimizer steps taken
    dense, embed:  nnx.State of dense parameters / embedding tables (float32)
    opt_dense, opt_embed: optimizer states
    nonfinite_step: int32 scalar, first step whose loss was NaN/inf (-1 if none)
    """

    step: jax.Array
    dense: Any
    embed: Any
    opt_dense: Any
    opt_embed: Any
    nonfinite_step: jax.Array


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The model's static graph and the pure functions that use it."""

    graphdef: Any
    dense_tx: optax.GradientTransformation
    embed_tx: optax.GradientTransformation
    compute_dtype: Any

    def init_state(self, dense: nnx.State, embed: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            dense=dense,
            embed=embed,
            opt_dense=self.dense_tx.init(dense),
            opt_embed=self.embed_tx.init(embed),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    def logits(self, dense: nnx.State, embed: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Forward pass: params stay float32 in the state and are cast to the compute dtype here."""
        if self.compute_dtype != jnp.float32:
            cast = lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            dense, embed = jax.tree.map(cast, dense), jax.tree.map(cast, embed)
            batch = {k: cast(v) for k, v in batch.items()}
        model = nnx.merge(self.graphdef, embed, dense)
        return model(batch).astype(jnp.float32)

    def loss(self, dense: nnx.State, embed: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
        logits = self.logits(dense, embed, batch)
        return optax.sigmoid_binary_cross_entropy(logits, batch["label"].astype(jnp.float32)).mean()

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, (g_dense, g_embed) = jax.value_and_grad(self.loss, argnums=(0, 1))(state.dense, state.embed, batch)
        u_dense, opt_dense = self.dense_tx.update(g_dense, state.opt_dense, state.dense)
        u_embed, opt_embed = self.embed_tx.update(g_embed, state.opt_embed, state.embed)
        finite = jnp.isfinite(loss)
        nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
        new_state = TrainState(
            step=state.step + 1,
            dense=optax.apply_updates(state.dense, u_dense),
            embed=optax.apply_updates(state.embed, u_embed),
            opt_dense=opt_dense,
            opt_embed=opt_embed,
            nonfinite_step=nonfinite_step,
        )
        metrics = {"loss": loss, "grad_norm_dense": optax.tree.norm(g_dense)}
        return new_state, metrics

    def eval_logits(self, state: TrainState, batch: Mapping[str, jax.Array]) -> jax.Array:
        return self.logits(state.dense, state.embed, batch)


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, embedding tables, dense params); any other state is an error (models are stateless)."""
    graphdef, embed, dense, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has non-parameter state, which training does not carry: {rest}")
    return graphdef, embed, dense
