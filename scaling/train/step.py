"""The train state and the jitted train / eval steps.

The NNX model is split once into a static graph and two parameter groups (embedding tables and
dense parameters), each with its own optimizer, plus the random streams of its dropout layers.
The step is a pure function of (state, batch), jitted once with the state donated; it never
recompiles after step 0 because every batch has the same static shape. What the step optimizes
comes from the run's task (`scaling.train.tasks`): the model is merged, cast and handed to it.

Dropout: each layer's stream keeps the key it was created with; step t folds t into every key,
so masks differ per step and per layer and a resumed run draws the same masks as an unbroken one.
Evaluation merges the model in deterministic mode (no dropout).

Sharded embeddings (`scaling.sharding.embedding`): the loss opens `collect_overflow()` around the
model, so the ids a row_wise lookup dropped for capacity come back as the loss's aux and reach the
step's metrics as `embedding_overflow` (int32, summed over devices and lookups; 0 otherwise);
the eval step returns its own count beside its outputs.
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
from scaling.sharding.embedding import OVERFLOW_METRIC, collect_overflow, overflow_total


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint holds about the model and optimizers.

    step:          int32 scalar, optimizer steps taken
    dense, embed:  nnx.State of dense parameters / embedding tables (float32)
    opt_dense, opt_embed: optimizer states
    nonfinite_step: int32 scalar, first step whose loss was NaN/inf (-1 if none)
    rngs:          nnx.State of the dropout streams as created (keys never advance in the state)
    """

    step: jax.Array
    dense: Any
    embed: Any
    opt_dense: Any
    opt_embed: Any
    nonfinite_step: jax.Array
    rngs: Any


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The model's static graph, its task and the pure functions that use them."""

    graphdef: Any
    dense_tx: optax.GradientTransformation
    embed_tx: optax.GradientTransformation
    compute_dtype: Any
    task: Any

    def init_state(self, dense: nnx.State, embed: nnx.State, rngs: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            dense=dense,
            embed=embed,
            opt_dense=self.dense_tx.init(dense),
            opt_embed=self.embed_tx.init(embed),
            nonfinite_step=jnp.full((), -1, jnp.int32),
            rngs=rngs,
        )

    def model(self, dense: nnx.State, embed: nnx.State, rngs: nnx.State, batch: Mapping[str, jax.Array],
              step: jax.Array | None) -> tuple[nnx.Module, Mapping[str, jax.Array]]:
        """(model, batch) in the compute dtype: params stay float32 in the state and are cast here.
        step None: deterministic (evaluation); otherwise dropout keys are folded with the step."""
        if self.compute_dtype != jnp.float32:
            cast = lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            dense, embed = jax.tree.map(cast, dense), jax.tree.map(cast, embed)
            batch = {k: cast(v) for k, v in batch.items()}
        if step is not None:
            rngs = jax.tree.map(lambda x: jax.random.fold_in(x, step) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rngs)
        model = nnx.merge(self.graphdef, embed, dense, rngs)
        if step is None:
            model = nnx.view(model, deterministic=True, raise_if_not_found=False)
        return model, batch

    def loss(self, dense: nnx.State, embed: nnx.State, rngs: nnx.State, step: jax.Array,
             batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(loss, embedding ids dropped for capacity: int32 scalar)."""
        model, batch = self.model(dense, embed, rngs, batch, step)
        with collect_overflow() as dropped:
            loss = self.task.loss(model, batch)
        return loss, overflow_total(dropped)

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, overflow), (g_dense, g_embed) = jax.value_and_grad(self.loss, argnums=(0, 1), has_aux=True)(
            state.dense, state.embed, state.rngs, state.step, batch)
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
            rngs=state.rngs,
        )
        metrics = {"loss": loss, "grad_norm_dense": optax.tree.norm(g_dense), OVERFLOW_METRIC: overflow}
        return new_state, metrics

    def eval_outputs(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(the task's eval outputs, the lookups that got zero vectors for row_wise capacity)."""
        model, batch = self.model(state.dense, state.embed, state.rngs, batch, None)
        with collect_overflow() as dropped:
            outputs = self.task.eval_outputs(model, batch)
        return outputs, overflow_total(dropped)


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State, nnx.State]:
    """(graphdef, embedding tables, dense params, dropout streams); any other state is an error
    (models keep no running statistics)."""
    graphdef, embed, dense, rngs, rest = nnx.split(model, EmbeddingTable, nnx.Param, nnx.RngState, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has non-parameter state, which training does not carry: {rest}")
    return graphdef, embed, dense, rngs
