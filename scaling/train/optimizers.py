"""Optimizers: an optax chain for dense parameters and a separate one for embedding tables.

Recsys practice trains embedding tables with row-wise Adagrad (one accumulator per row, the mean
of the row's squared gradient), which keeps optimizer memory at one float per row. Rows an
example batch does not touch get a zero gradient and so neither move nor change their state,
which makes the dense-gradient form here equal to the sparse update.

The peak learning rate is not baked into the compiled step: each chain ends in
`scale_by_peak_schedule`, which keeps the peak as a scalar in the optimizer state and multiplies by
peak x shape(step). Runs that differ only in their learning rates (a sweep's per-size lr grid)
therefore lower to the same program and share one entry of the compilation cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from scaling.config import DenseOptimizerConfig, EmbeddingOptimizerConfig, ScheduleConfig


def learning_rate_schedule(peak: float, schedule: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine down to `final_fraction * peak` (or constant)."""
    warmup = int(round(schedule.warmup_fraction * total_steps))
    if schedule.name == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=schedule.final_fraction)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def schedule_shape(schedule: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """The schedule with peak 1: warmup then cosine or constant, as a multiplier of the peak."""
    return learning_rate_schedule(1.0, schedule, total_steps)


class PeakScheduleState(NamedTuple):
    count: jax.Array  # int32 steps taken
    peak: jax.Array  # float32 peak learning rate, a traced value


def scale_by_peak_schedule(peak: float, shape: optax.Schedule) -> optax.GradientTransformation:
    """updates * peak * shape(step). The chain before it already carries the descent sign."""

    def init(params):
        del params
        return PeakScheduleState(jnp.zeros((), jnp.int32), jnp.asarray(peak, jnp.float32))

    def update(updates, state, params=None):
        del params
        factor = state.peak * shape(state.count)
        updates = jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates)
        return updates, PeakScheduleState(optax.safe_increment(state.count), state.peak)

    return optax.GradientTransformation(init, update)


class RowwiseAdagradState(NamedTuple):
    accumulator: optax.Params  # one value per row: [rows, 1]


def rowwise_adagrad(learning_rate: optax.ScalarOrSchedule, eps: float = 1e-8, initial_accumulator: float = 0.0):
    """Row-wise Adagrad for tables [rows, dim]: acc_r += mean_j g_rj^2; w_r -= lr g_r / sqrt(acc_r + eps).
    The accumulator [rows, 1] has the stored table's leading dim (padding rows of a sharded layout
    included: their gradient is 0, so they stay 0), so the table's PartitionSpec shards it too."""

    def init(params):
        return RowwiseAdagradState(
            jax.tree.map(lambda p: jnp.full(p.shape[:-1] + (1,), initial_accumulator, p.dtype), params)
        )

    def update(grads, state, params=None, *, step=None):
        del params
        acc = jax.tree.map(lambda a, g: a + jnp.mean(jnp.square(g), axis=-1, keepdims=True), state.accumulator, grads)
        # A row never touched has acc == 0 and g == 0: keep it at exactly 0 (not 0 * inf).
        updates = jax.tree.map(
            lambda g, a: jnp.where(a > 0, -g * jax.lax.rsqrt(jnp.maximum(a + eps, 1e-30)), 0.0), grads, acc
        )
        return updates, RowwiseAdagradState(acc)

    base = optax.GradientTransformation(init, lambda g, s, p=None: update(g, s, p))
    return optax.chain(base, optax.scale_by_learning_rate(learning_rate, flip_sign=False))


def dense_optimizer(cfg: DenseOptimizerConfig, schedule: ScheduleConfig, total_steps: int) -> optax.GradientTransformation:
    """Optax chain for every non-embedding parameter (with optional global-norm clipping)."""
    if cfg.name == "adamw":  # decoupled weight decay, scaled by the learning rate as in optax.adamw
        core = optax.adamw(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        core = optax.adam(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "rmsprop":
        core = optax.rmsprop(1.0, decay=cfg.b2, eps=cfg.eps)
    else:
        core = optax.sgd(1.0, momentum=cfg.b1 or None)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*parts, core, scale_by_peak_schedule(cfg.learning_rate, schedule_shape(schedule, total_steps)))


def embedding_optimizer(cfg: EmbeddingOptimizerConfig, dense: DenseOptimizerConfig, schedule: ScheduleConfig,
                        total_steps: int) -> optax.GradientTransformation:
    """Optax transformation for embedding tables. `dense`: the tables are trained like the dense
    parameters, with the dense optimizer's hyperparameters (as the HSTU and SASRec research code
    trains them); its gradient clipping, if any, then clips the tables' global norm on its own."""
    if cfg.name == "dense":
        return dense_optimizer(dense, schedule, total_steps)
    if cfg.name == "rowwise_adagrad":
        core = rowwise_adagrad(1.0, eps=cfg.eps, initial_accumulator=cfg.initial_accumulator)
    elif cfg.name == "adagrad":
        core = optax.adagrad(1.0, initial_accumulator_value=cfg.initial_accumulator, eps=cfg.eps)
    elif cfg.name == "adam":
        core = optax.adam(1.0, eps=cfg.eps)
    else:
        core = optax.sgd(1.0)
    return optax.chain(core, scale_by_peak_schedule(cfg.learning_rate, schedule_shape(schedule, total_steps)))
