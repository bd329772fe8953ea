"""Optimizers: an optax chain for dense parameters and a separate one for embedding tables.

Recsys practice trains embedding tables with row-wise Adagrad (one accumulator per row, the mean
of the row's squared gradient), which keeps optimizer memory at one float per row. Rows an
example batch does not touch get a zero gradient and so neither move nor change their state,
which makes the dense-gradient form here equal to the sparse update.
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


class RowwiseAdagradState(NamedTuple):
    accumulator: optax.Params  # one value per row: [rows, 1]


def rowwise_adagrad(learning_rate: optax.ScalarOrSchedule, eps: float = 1e-8, initial_accumulator: float = 0.0):
    """Row-wise Adagrad for 2-D tables [rows, dim]: acc_r += mean_j g_rj^2; w_r -= lr g_r / sqrt(acc_r + eps)."""

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
    lr = learning_rate_schedule(cfg.learning_rate, schedule, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        core = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "rmsprop":
        core = optax.rmsprop(lr, decay=cfg.b2, eps=cfg.eps)
    else:
        core = optax.sgd(lr, momentum=cfg.b1 or None)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
    return core


def embedding_optimizer(cfg: EmbeddingOptimizerConfig, schedule: ScheduleConfig, total_steps: int) -> optax.GradientTransformation:
    """Optax transformation for embedding tables."""
    lr = learning_rate_schedule(cfg.learning_rate, schedule, total_steps)
    if cfg.name == "rowwise_adagrad":
        return rowwise_adagrad(lr, eps=cfg.eps, initial_accumulator=cfg.initial_accumulator)
    if cfg.name == "adagrad":
        return optax.adagrad(lr, initial_accumulator_value=cfg.initial_accumulator, eps=cfg.eps)
    if cfg.name == "adam":
        return optax.adam(lr, eps=cfg.eps)
    return optax.sgd(lr)
