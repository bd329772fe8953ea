"""Two-tower retrieval (YouTube/Google-style: Yi et al., RecSys 2019, "Sampling-bias-corrected
neural modeling for large corpus item recommendations") as a trained next-item family "two_tower".

Towers, for a history row of item ids x_0..x_{L-1} (left-aligned, 0 = padding) of user u, with E
the item-id embedding table [V + 1, D] (shared by both towers; row 0 padding) and U the user-id
table [users, D]:

    m_t = (1 / (t + 1)) sum_{s <= t} E[x_s]                  causal mean of the history up to t
    q_t = n(MLP_user([m_t ; E[x_t] ; U[u]]))                 [D]  (U[u] only when user_embedding)
    v_i = n(MLP_item(E[i]))                                  [D]  item features: none in these data
                                                                  sets (id, timestamp, action only),
                                                                  so the item tower reads the id alone
    s(t, i) = q_t . v_i / temperature,        n(x) = x / ||x||   (cosine scores)

`TARGETS = "next"`: position t of a row predicts event t + 1 (y_t = targets[t]).

Objective: in-batch sampled softmax with the logQ correction. Position t of row b (valid while
t < length_b) scores its target y against the valid targets of the R = min(in_batch_rows, B - 1)
rows after b in the batch (cyclically b+1..b+R mod B; R = B - 1 is the whole rest of the batch;
row b's own other targets are the user's positives, never candidates), plus, with uniform_negatives, the batch's M uniform negatives of that position. For every item c
among them (the target included):

    logit(c) = s(t, c) - log Q_b(c),     Q_b(c) = n_b q(c) + M / V
    loss     = mean over valid (b, t) of  -log softmax(logits)[y]

candidates equal to y (accidental hits) and padded candidates get logit -5e4 (out of the softmax).
q is the items' share of training events (`spec.training_events.item_frequency`), the law the
in-batch targets follow; n_b the row's count of valid in-batch candidates. Q_b(c) is c's expected
count among the candidates, so subtracting log Q_b is the sampled-softmax correction (for M = 0 it
is Yi et al.'s log q plus a per-row constant, which the softmax ignores). Without training events
(a spec built from a data config alone) q is uniform: no correction. logq_correction = false drops
the term. Rows past b + R are left out so that the FLOPs per example do not grow with the batch
size. When B <= R the whole rest of the batch is used (R = B - 1) and the analytic count, which
assumes R rows, overstates the step: the default R = 7 keeps it exact for the XLA checks' 8- and
16-row batches; set R = B - 1 (e.g. 127) for Yi et al.'s full-batch candidates.

Evaluation (`catalogue_scores`, the base class's): q at the last history position against the item
tower applied to the whole table (`item_table()` = `export_item_embeddings()` [V + 1, D], row 0
zero), for exact top-K; `IVFIndex` is an approximate index over the exported embeddings.

FLOPs per example (one train row of L = max_len positions; gathers not counted): the causal mean as
an [L, L] x [L, D] matmul (2 L^2 D), the user MLP, L2 norms (3 D + 1) and padding select (D) at each
of L positions; the item tower at the L targets (and at the uniform negatives when used: M per
row when shared_negatives, else L M; `scaling.flops`' zero batch always holds per-position
negatives, so its XLA figure is the unshared one); the dot products 2 D (1 + R L (+ M)) per
position. XLA computes every position, padded or not.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaling.config_schema import knob
from scaling.data.spec import SequenceSpec, TrainingEvents
from scaling.models.embedding import embedding_table
from scaling.models.mlp import MLP, check_widths, mlp_flops
from scaling.models.registry import register_model
from scaling.models.sequence_base import SequenceModel, SequenceModelConfig, l2_normalize
from scaling.models.transformer import valid_from_lengths
from scaling.sharding.embedding import lookup, natural_table
from scaling.train.sampled_softmax import ACCIDENTAL_HIT_LOGIT

__all__ = ["IVFIndex", "TwoTower", "TwoTowerConfig", "exact_top_k", "recall_at_k"]

_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(embed_dim=16, hidden=(32,)),
    "s": dict(embed_dim=32, hidden=(64,)),
    "m": dict(embed_dim=64, hidden=(128,)),
    "l": dict(embed_dim=128, hidden=(256, 256)),
    "xl": dict(embed_dim=256, hidden=(512, 512)),
}


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig(SequenceModelConfig):
    """Two-tower hyperparameters; `size` names a tower width/depth preset (xs ... xl)."""

    SIZES: ClassVar[dict[str, dict[str, Any]]] = _SIZES
    NEEDS_LOADED_DATA: ClassVar[bool] = True  # one embedding row per user of the data
    TARGETS: ClassVar[str] = "next"

    name: Literal["two_tower"] = knob("two_tower")
    size: str = knob("custom", help=f"preset name ({', '.join(_SIZES)}) or 'custom' (no preset)")
    embed_dim: int = knob(64, ge=1, help="D: id embedding width and both towers' output width")
    hidden: tuple[int, ...] = knob((128,), help="hidden widths of each tower's MLP (ReLU)")
    max_len: int = knob(50, ge=1, help="history positions per train row")
    user_embedding: bool = knob(True, help="feed a user-id embedding to the user tower")
    tower_norm: bool = knob(False, help="LayerNorm after each hidden layer of the towers")
    in_batch_rows: int = knob(7, ge=1, help="R: a row's candidates are the targets of the next R rows")
    logq_correction: bool = knob(True, help="subtract log Q(c) (sampling-bias correction) from every logit")
    uniform_negatives: bool = knob(False, help="add the batch's uniform negatives to the candidates")
    temperature: float = knob(0.05, gt=0.0, help="softmax temperature of the cosine scores")

    def check(self) -> None:
        check_widths("hidden", self.hidden)

    @property
    def user_inputs(self) -> int:
        return 3 if self.user_embedding else 2

    def encoder_flops(self, n: int) -> float:
        """User tower over n positions: causal-mean matmul, MLP, L2 norm, padding select."""
        d = self.embed_dim
        per_position = mlp_flops(self.user_inputs * d, self.hidden, d, norm=self.tower_norm) + 3 * d + 1 + d
        return float(2.0 * n * n * d + n * per_position)

    def item_tower_flops(self) -> float:
        """One item through the item tower and its L2 norm."""
        d = self.embed_dim
        return float(mlp_flops(d, self.hidden, d, norm=self.tower_norm) + 3 * d + 1)

    def scoring_flops(self, spec: SequenceSpec) -> float:
        """Dot products per row: target + R L in-batch candidates (+ M uniform negatives) per position."""
        per_position = 1 + self.in_batch_rows * self.max_len + (spec.num_negatives if self.uniform_negatives else 0)
        return 2.0 * self.max_len * per_position * self.embed_dim

    def flops_per_example(self, spec: SequenceSpec) -> float:
        items = self.max_len  # the targets
        if self.uniform_negatives:
            items += spec.num_negatives * (1 if spec.shared_negatives else self.max_len)
        return float(self.encoder_flops(self.max_len) + items * self.item_tower_flops() + self.scoring_flops(spec))

    def embedding_bytes_per_example(self, spec: SequenceSpec) -> float:
        """float32 rows gathered per row: inputs, targets, the user (and the uniform negatives)."""
        rows = 2 * self.max_len + int(self.user_embedding)
        if self.uniform_negatives:
            rows += spec.num_negatives * (1 if spec.shared_negatives else self.max_len)
        return float(rows * self.embed_dim * 4)


@functools.lru_cache(maxsize=8)
def _causal_mean_weights(n: int) -> np.ndarray:
    """float32 [n, n]: A[t, s] = 1 / (t + 1) for s <= t, else 0 (A @ x = causal means of x)."""
    return (np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _item_shares(events: TrainingEvents | None, num_items: int) -> np.ndarray:
    """float32 [V + 1]: q, each item's share of the training events (uniform without events); items
    never trained get half the smallest share, so log q stays finite."""
    if events is None:
        return np.full(num_items + 1, 1.0 / num_items, np.float32)
    q = events.item_frequency(num_items)
    floor = 0.5 * q[q > 0].min() if np.any(q > 0) else 1.0 / num_items
    return np.maximum(q, floor).astype(np.float32)


@register_model("two_tower", TwoTowerConfig)
class TwoTower(SequenceModel):
    """User tower over history rows, item tower over ids; `__call__` -> user queries [B, L, D]."""

    batch_keys = ("items", "lengths", "users")

    def __init__(self, config: TwoTowerConfig, spec: SequenceSpec, *, rngs: nnx.Rngs):
        self.config, self.spec = config, spec
        d = config.embed_dim
        # unit-norm rows in expectation: the towers' He init keeps that scale through the MLP
        items = jax.random.normal(rngs.params(), (spec.num_items + 1, d), jnp.float32) / np.sqrt(d)
        self.item_emb = embedding_table(items.at[0].set(0.0))
        if config.user_embedding:  # one row when the user count is unknown (FLOPs from a data config)
            users = jax.random.normal(rngs.params(), (max(spec.num_users, 1), d), jnp.float32) / np.sqrt(d)
            self.user_emb = embedding_table(users)
        else:
            self.user_emb = None
        self.user_tower = MLP(config.user_inputs * d, config.hidden, d, norm=config.tower_norm, rngs=rngs)
        self.item_tower = MLP(d, config.hidden, d, norm=config.tower_norm, rngs=rngs)

    # ------------------------------------------------------------------------------------ towers
    def user_features(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The user tower's input [B, N, k D]: [causal mean of E[x_0..x_t] ; E[x_t] (; U[u])]."""
        items = batch["items"]
        e = lookup(self.item_emb, items)
        mean = jnp.einsum("ts,bsd->btd", jnp.asarray(_causal_mean_weights(items.shape[1]), e.dtype), e)
        parts = [mean, e]
        if self.user_emb is not None:
            u = lookup(self.user_emb, batch["users"])
            parts.append(jnp.broadcast_to(u[:, None, :], e.shape))
        return jnp.concatenate(parts, axis=-1)

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """items int [B, N], lengths [B], users [B] -> unit queries [B, N, D] (padded positions 0);
        the query at position t reads items 0..t only."""
        q = l2_normalize(self.user_tower(self.user_features(batch)))
        valid = valid_from_lengths(batch["lengths"], batch["items"].shape[1])
        return jnp.where(valid[..., None], q, 0.0)

    def item_embeddings(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> unit item-tower outputs [..., D]."""
        return l2_normalize(self.item_tower(lookup(self.item_emb, ids)))

    def export_item_embeddings(self) -> jax.Array:
        """The item tower over the whole catalogue [V + 1, D] (row 0, padding, is 0): what exact
        top-K (`catalogue_scores`) and `IVFIndex` search."""
        return l2_normalize(self.item_tower(natural_table(self.item_emb))).at[0].set(0.0)  # full-table read

    def item_table(self) -> jax.Array:
        return self.export_item_embeddings()

    # ------------------------------------------------------------------------------- objective
    def _candidates(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(dot products [B, L, 1 + C] of each query with its target (column 0) and its candidates,
        candidate ids [B, L, 1 + C]): C = R L in-batch targets (+ M uniform negatives)."""
        q, targets = self(batch), batch["targets"]
        b, n = targets.shape
        v = self.item_embeddings(targets)
        scores = [jnp.einsum("bld,bld->bl", q, v)[..., None]]
        ids = [targets[..., None]]
        r = min(self.config.in_batch_rows, b - 1)
        if r > 0:  # row b's candidates: the targets of rows b+1..b+r (a roll is a slice, no gather)
            cand_v = jnp.concatenate([jnp.roll(v, -s, axis=0) for s in range(1, r + 1)], axis=1)
            cand = jnp.concatenate([jnp.roll(targets, -s, axis=0) for s in range(1, r + 1)], axis=1)
            scores.append(jnp.einsum("bld,bcd->blc", q, cand_v))
            ids.append(jnp.broadcast_to(cand[:, None, :], (b, n, cand.shape[1])))
        if self.config.uniform_negatives:
            negatives = batch["negatives"]  # [B, L, M] or [B, 1, M] (one draw per row)
            neg_v = self.item_embeddings(negatives)
            if negatives.shape[1] == 1:  # shared: one [L, D] x [D, M] matmul per row
                scores.append(jnp.einsum("bld,bmd->blm", q, neg_v[:, 0]))
            else:
                scores.append(jnp.einsum("bld,blmd->blm", q, neg_v))
            ids.append(jnp.broadcast_to(negatives, (b, n, negatives.shape[-1])))
        return jnp.concatenate(scores, axis=-1), jnp.concatenate(ids, axis=-1)

    def training_forward(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Dot products [B, L, 1 + C] of each query with its target and candidates (what the FLOPs count)."""
        return self._candidates(batch)[0]

    def log_q(self, ids: jax.Array, in_batch: jax.Array) -> jax.Array:
        """log Q_b(c) (module docstring) for candidate ids [B, L, K] given each row's count of
        valid in-batch candidates in_batch [B]."""
        q = jnp.asarray(_item_shares(self.spec.training_events, self.spec.num_items))[ids]
        m = self.spec.num_negatives if self.config.uniform_negatives else 0
        return jnp.log(in_batch[:, None, None] * q + m / self.spec.num_items)

    def training_loss(self, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
        scores, ids = self._candidates(batch)
        logits = scores.astype(jnp.float32) / temperature
        targets, lengths = batch["targets"], batch["lengths"]
        m = batch["negatives"].shape[-1] if self.config.uniform_negatives else 0
        # >= 1: a lone row (B = 1) has no in-batch candidates; its Q is then M / V alone
        in_batch = jnp.maximum(jnp.sum(ids[:, 0, 1 : ids.shape[-1] - m] > 0, axis=-1), 1).astype(jnp.float32)
        if self.config.logq_correction:
            logits = logits - self.log_q(ids, in_batch)
        out = (ids == 0) | (ids == targets[..., None])
        out = out.at[..., 0].set(False)  # column 0 is the target itself
        logits = jnp.where(out, ACCIDENTAL_HIT_LOGIT, logits)
        nll = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
        valid = valid_from_lengths(lengths, targets.shape[1])
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    def flops_per_example(self) -> float:
        return self.config.flops_per_example(self.spec)


# ------------------------------------------------------------------------ exact and approximate top-K


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """int [Q, k]: the k rows of items [N, D] (row 0, padding, excluded) with the largest q . v."""
    scores = np.asarray(queries, np.float32) @ np.asarray(items, np.float32)[1:].T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1) + 1


class IVFIndex:
    """Inverted-file approximate maximum-inner-product search over unit item embeddings.

    Build: spherical k-means (`iterations` Lloyd steps from `num_lists` random items; centroids
    re-normalised; an empty list keeps its centroid) over rows 1..N-1 of items [N, D] (row 0 is
    padding). Search: each query probes the `num_probe` lists whose centroids score highest and
    ranks only their members exactly, so it scores about N num_probe / num_lists items.
    """

    def __init__(self, items: np.ndarray, num_lists: int, *, iterations: int = 20, seed: int = 0):
        x = np.asarray(items, np.float32)[1:]
        rng = np.random.default_rng(seed)
        centroids = x[rng.choice(len(x), size=min(num_lists, len(x)), replace=False)]
        for _ in range(iterations):
            assign = np.argmax(x @ centroids.T, axis=1)
            sums = np.zeros_like(centroids)
            np.add.at(sums, assign, x)
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)
        assign = np.argmax(x @ centroids.T, axis=1)
        self.centroids = centroids
        self.lists = [np.flatnonzero(assign == c) + 1 for c in range(len(centroids))]  # item ids
        self.items = np.asarray(items, np.float32)

    def search(self, queries: np.ndarray, k: int, num_probe: int) -> np.ndarray:
        """int [Q, k]: approximate top-k item ids per query, best first (0 pads a short result)."""
        queries = np.asarray(queries, np.float32)
        probe = np.argsort(-(queries @ self.centroids.T), axis=1)[:, :num_probe]
        out = np.zeros((len(queries), k), np.int64)
        for row, (query, lists) in enumerate(zip(queries, probe)):
            ids = np.concatenate([self.lists[c] for c in lists])
            best = ids[np.argsort(-(self.items[ids] @ query), kind="stable")[:k]]
            out[row, : len(best)] = best
        return out


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each exact top-k list that the approximate list found."""
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approximate, exact)]))
