"""From a run config to what a training step needs: the partitioner, the step functions, the
sharded init and the abstract train state. Shared by the training loop, `scaling shard-plan`,
the sharding benchmarks and tests, so all four place and compile exactly the same program.

    setup = prepare(config, dataset)
    with setup.partitioner.activate():
        state = setup.partitioner.init(setup.init_state, setup.abstract)
        step = setup.compile_train_step()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scaling.config import RunConfig
from scaling.models.registry import build_model
from scaling.sharding.mesh import batch_divisor
from scaling.sharding.partitioner import Partitioner
from scaling.train.optimizers import dense_optimizer, embedding_optimizer
from scaling.train.step import StepFunctions, TrainState, split_model
from scaling.train.tasks import make_task


@dataclasses.dataclass
class TrainSetup:
    """partitioner: mesh + layout;  fns: the pure step functions (graphdef, optimizers, task);
    init_state: () -> TrainState (call jitted: `partitioner.init`);  abstract: the TrainState of
    ShapeDtypeStructs (from jax.eval_shape, under the partitioner's mesh)."""

    config: RunConfig
    partitioner: Partitioner
    fns: StepFunctions
    task: Any
    init_state: Callable[[], TrainState]
    abstract: TrainState

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        return self.task.abstract_batch(batch_size or self.config.train.batch_size, self.partitioner.batch_sharding)

    def compile_train_step(self):
        """The AOT-compiled train step (state donated); call inside `partitioner.activate()`."""
        return self.partitioner.compile_train_step(self.fns.train_step, self.abstract, self.abstract_batch())


def prepare(config: RunConfig, dataset, reference_logloss: float | None = None, devices: list | None = None) -> TrainSetup:
    """Build the partitioner (on `devices`, default all), task, optimizers and step functions of a
    run, and trace its init once (abstractly) to get the train state's shapes and the model graph."""
    cfg = config
    partitioner = Partitioner.from_config(cfg.sharding, devices)
    divisor = batch_divisor(partitioner.mesh)
    if cfg.train.batch_size % divisor or cfg.train.eval_batch_size % divisor:
        raise ValueError(f"train.batch_size and train.eval_batch_size must be multiples of {divisor} (devices holding the batch)")
    spec = dataset.spec
    task = make_task(cfg, dataset, reference_logloss)
    dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
    fns = StepFunctions(
        graphdef=None,  # filled from the traced init below
        dense_tx=dense_optimizer(cfg.optimizer.dense, cfg.optimizer.schedule, cfg.train.steps),
        embed_tx=embedding_optimizer(cfg.optimizer.embedding, cfg.optimizer.dense, cfg.optimizer.schedule, cfg.train.steps),
        compute_dtype=dtype,
        task=task,
    )
    graph: dict[str, Any] = {}

    def init_state() -> TrainState:
        """The model built and its optimizer states made in one function, so that under jit every
        array is created in its own shard and never exists whole on one device."""
        graphdef, embed, dense, rngs = split_model(build_model(cfg.model, spec, rngs=nnx.Rngs(cfg.seed)))
        graph["graphdef"] = graphdef  # static: the same on every trace
        return fns.init_state(dense, embed, rngs)

    with partitioner.activate():  # the model is built under the run's mesh and placement
        abstract = jax.eval_shape(init_state)
    fns = dataclasses.replace(fns, graphdef=graph["graphdef"])
    return TrainSetup(cfg, partitioner, fns, task, init_state, abstract)
