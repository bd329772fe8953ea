"""Funk-style biased matrix factorization for explicit ratings (Funk 2006; Koren, Bell & Volinsky 2009)
as a fitted family "funk_mf".

    r̂_ui = mu + b_u + b_i + p_uᵀ q_i
    loss  = sum over training ratings (u, i, r) of ½ (r - r̂_ui)² + ½ reg (b_u² + b_i² + |p_u|² + |q_i|²)

mu is the mean training rating (fixed). Training is Funk's per-rating SGD step, e = r - r̂_ui:

    b_u += lr (e - reg b_u)      p_u += lr (e q_i - reg p_u)
    b_i += lr (e - reg b_i)      q_i += lr (e p_u - reg q_i)

applied in minibatches: a batch's per-rating steps are computed from the same parameters and
summed into the rows they touch (a row rated twice in a batch moves twice), which is per-rating
SGD when batch_size = 1 and close to it while lr x (a row's ratings per batch) stays small. Each
epoch visits the training ratings in a fresh seeded order, one jit-compiled `lax.scan` over its
batches. p and q start N(0, init_scale²), biases 0; items never rated keep their initial q_i.
Events without a rating (NaN) are left out; a log with no rating at all is refused.

Ranking: score(b, j) = r̂_{u_b, j} for the whole catalogue, with the trained p_u of the row's user
(every evaluation user has training ratings); the validation rating is not folded in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from scaling.config_schema import ConfigError, knob
from scaling.data.leave_one_out import LeaveOneOut
from scaling.models.baselines.fitted import Fitted, FittedModelConfig
from scaling.models.registry import register_fitted

_SIZES: dict[str, dict[str, Any]] = {f"r{k}": dict(rank=k) for k in (8, 16, 32, 64, 128, 256)}

Params = dict[str, jax.Array]  # mu [], bu [U], bi [V + 1], p [U, k], q [V + 1, k]


def predict(params: Params, users: jax.Array, items: jax.Array) -> jax.Array:
    """r̂ for matching users [N] and items [N]."""
    dot = jnp.sum(params["p"][users] * params["q"][items], axis=-1)
    return params["mu"] + params["bu"][users] + params["bi"][items] + dot


def _step(params: Params, batch: tuple[jax.Array, ...], lr: float, reg: float) -> tuple[Params, None]:
    users, items, ratings, weight = batch  # weight 0 on the padding that fills the last batch
    pu, qi = params["p"][users], params["q"][items]
    bu, bi = params["bu"][users], params["bi"][items]
    e = weight * (ratings - predict(params, users, items))
    w = weight[:, None]
    return {
        "mu": params["mu"],
        "bu": params["bu"].at[users].add(lr * (e - reg * weight * bu)),
        "bi": params["bi"].at[items].add(lr * (e - reg * weight * bi)),
        "p": params["p"].at[users].add(lr * (e[:, None] * qi - reg * w * pu)),
        "q": params["q"].at[items].add(lr * (e[:, None] * pu - reg * w * qi)),
    }, None


@functools.partial(jax.jit, donate_argnums=0)
def _epoch(params: Params, users: jax.Array, items: jax.Array, ratings: jax.Array, weight: jax.Array,
           lr: jax.Array, reg: jax.Array) -> Params:
    """One pass over batches users/items/ratings/weight [S, B]."""
    params, _ = jax.lax.scan(lambda p, b: _step(p, b, lr, reg), params, (users, items, ratings, weight))
    return params


def rmse(params: Params, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(ratings) - predict(params, jnp.asarray(users), jnp.asarray(items))))))


def fit_funk_mf(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int, num_items: int, *,
                rank: int, learning_rate: float, regularization: float, epochs: int, batch_size: int,
                init_scale: float, seed: int) -> Params:
    """Parameters fitted to the ratings [N] of (users [N], items [N]); items in 1..num_items."""
    n = len(ratings)
    kp, kq = jax.random.split(jax.random.key(seed))
    params = {
        "mu": jnp.float32(np.mean(ratings)),
        "bu": jnp.zeros(num_users, jnp.float32),
        "bi": jnp.zeros(num_items + 1, jnp.float32),
        "p": init_scale * jax.random.normal(kp, (num_users, rank), jnp.float32),
        "q": init_scale * jax.random.normal(kq, (num_items + 1, rank), jnp.float32),
    }
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    rng = np.random.default_rng(seed)
    lr, reg = jnp.float32(learning_rate), jnp.float32(regularization)
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(steps, batch_size)
    for _ in range(epochs):
        order = np.concatenate([rng.permutation(n), np.zeros(pad, np.int64)])  # padding reuses rating 0 at weight 0
        params = _epoch(params, users[order].reshape(steps, batch_size), items[order].reshape(steps, batch_size),
                        ratings[order].reshape(steps, batch_size), weight, lr, reg)
    return params


def training_ratings(split: LeaveOneOut) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) of the rated training events: int32, int32, float32 [N]."""
    log = split.log
    starts = log.offsets[:-1]
    counts = split.train_end - starts
    users = np.repeat(np.arange(log.num_users), counts)
    keep = np.concatenate([np.arange(s, e) for s, e in zip(starts, split.train_end)]) if users.size else np.zeros(0, np.int64)
    ratings = log.ratings[keep].astype(np.float32)
    rated = ~np.isnan(ratings)
    return users[rated].astype(np.int32), log.items[keep][rated].astype(np.int32), ratings[rated]


@register_fitted("funk_mf")
@dataclasses.dataclass(frozen=True)
class FunkMFConfig(FittedModelConfig):
    """Biased MF on explicit ratings by minibatch SGD; `size` names a rank preset (r8 ... r256).
    Defaults are Surprise's SVD (rank 100 aside: 64 here, the other families' default).
    parameters: all factors and biases (U (k + 1) + V (k + 1) + 1). scoring_flops: 2 V (k + 2)
    (one dot and two bias adds per catalogue item)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES

    name: Literal["funk_mf"] = knob("funk_mf")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    rank: int = knob(64, ge=1, help="k: rank of p_u and q_i")
    learning_rate: float = knob(0.005, gt=0.0, help="lr of the per-rating SGD step")
    regularization: float = knob(0.02, ge=0.0, help="reg: L2 penalty on biases and factors")
    epochs: int = knob(20, ge=1, help="passes over the training ratings")
    batch_size: int = knob(256, ge=1, help="ratings whose SGD steps are taken together")
    init_scale: float = knob(0.1, gt=0.0, help="p and q start N(0, init_scale²)")

    def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted:
        users, items, ratings = training_ratings(split)
        if ratings.size == 0:
            raise ConfigError("model.name", f"{split.log.source} has no ratings (every training event's rating is NaN, "
                              "as in the line format); funk_mf needs explicit ratings, use bpr_mf or als for implicit feedback")
        log = split.log
        params = fit_funk_mf(users, items, ratings, log.num_users, log.num_items, rank=self.rank,
                             learning_rate=self.learning_rate, regularization=self.regularization, epochs=self.epochs,
                             batch_size=self.batch_size, init_scale=self.init_scale, seed=seed)
        item_bias = params["mu"] + params["bi"]

        def score(batch: dict[str, np.ndarray]) -> np.ndarray:
            u = jnp.asarray(batch["users"])
            return np.asarray(item_bias[None, :] + params["bu"][u][:, None] + params["p"][u] @ params["q"].T)

        k = self.rank
        details = {"train_rmse": rmse(params, users, items, ratings),
                   "train_rmse_mean_predictor": float(np.std(ratings)), "ratings": float(ratings.size),
                   "mean_rating": float(params["mu"])}
        return Fitted(score, parameters=(log.num_users + log.num_items) * (k + 1) + 1,
                      scoring_flops=2.0 * log.num_items * (k + 2), details=details)
