"""Neighbourhood baselines on the binary training matrix X [U, V + 1] (X_ui = 1 when user u had item
i before their validation item): fitted families "item_knn" and "user_knn".

Item-kNN (Sarwar et al. 2001; the cosine of Deshpande & Karypis 2004 with a shrink term):

    sim(i, j) = |U_i ∩ U_j| / (sqrt|U_i| sqrt|U_j| + shrink),   sim(i, i) = 0
    S[i, :]   = sim(i, :) restricted to i's `neighbours` largest entries (the rest 0)
    score(b, j) = sum over the history items h of row b of S[h, j]          ((H S)[b, j])

U_i is the set of training users of item i, H [B, V + 1] the binary history matrix of the
evaluation rows. S is built from XᵀX in row blocks, each pruned to its top k before the next is
formed, so the item-item matrix is never dense (memory: a block of rows x V, then V k).

User-kNN (Resnick et al. 1994 / Herlocker et al. 1999 with the same cosine), for evaluation row b
with history set H_b and training user u with item set I_u:

    sim(b, u) = |H_b ∩ I_u| / (sqrt|H_b| sqrt|I_u| + shrink),   sim(b, own user) = 0
    N_b       = the `neighbours` users with the largest sim(b, u)
    score(b, j) = sum over u in N_b of sim(b, u) X[u, j]                      ((W X)[b, j])

computed per batch as sparse products: H Xᵀ [B, U], pruned per row to W, then W X.

Defaults, chosen on Amazon Beauty's validation targets (full ranking): item-kNN 100 neighbours,
shrink 20 (HR@10 0.084 against 0.068 unshrunk; 500 neighbours within noise of 100 at 2x the
storage); user-kNN 300 neighbours, no shrink (0.083; 100 neighbours 0.080, shrink 10 no better).

The evaluator ranks ties in the target's favour, and both scores are sparse: most items score
exactly 0. With `popularity_tiebreak` (default) each score gets + 0.5 m pop_j / (max pop + 1),
m the batch's smallest positive score and pop_j item j's training events, so the items the
neighbours leave at zero are ordered by popularity instead of all tying with the target.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import scipy.sparse as sp

from scaling.config_schema import knob
from scaling.data.leave_one_out import LeaveOneOut
from scaling.models.baselines.fitted import Fitted, FittedModelConfig, history_matrix, training_matrix
from scaling.models.registry import register_fitted

# Rows of XᵀX formed at once: bounds the unpruned block at about this many entries.
_BLOCK_ENTRIES = 1 << 25


def top_k_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The same-shape CSR matrix keeping each row's k largest stored entries (ties: lower column
    first), zeros dropped."""
    m = matrix.tocsr()
    m.eliminate_zeros()
    m.sort_indices()
    counts = np.diff(m.indptr)
    if counts.size == 0 or counts.max(initial=0) <= k:
        return m
    rows = np.repeat(np.arange(m.shape[0]), counts)
    order = np.lexsort((m.indices, -m.data, rows))  # by row, then value descending, then column
    rank = np.arange(m.nnz) - m.indptr[rows[order]]
    keep = np.sort(order[rank < k])
    kept_rows = rows[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(kept_rows, minlength=m.shape[0]))])
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def item_similarities(x: sp.csr_matrix, neighbours: int, shrink: float = 0.0) -> sp.csr_matrix:
    """S [V + 1, V + 1] CSR: row i holds sim(i, j) for i's `neighbours` most similar items j.

    x: binary [U, V + 1] training matrix (`training_matrix(split)`)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    items = x.shape[1]
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    xt = x.T.tocsr()
    block = max(1, _BLOCK_ENTRIES // max(items, 1))
    parts = []
    for start in range(0, items, block):
        co = (xt[start : start + block] @ x).tocoo()  # |U_i ∩ U_j| for this block's rows i
        i = co.row + start
        sim = co.data / (norms[i] * norms[co.col] + shrink)
        sim[i == co.col] = 0.0  # an item is not its own neighbour
        part = sp.csr_matrix((sim, (co.row, co.col)), shape=(min(block, items - start), items))
        parts.append(top_k_per_row(part, neighbours))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((items, items))


def _add_tiebreak(scores: sp.csr_matrix, prior: np.ndarray | None) -> np.ndarray:
    """Densify [B, V + 1]; with a prior in [0, 1) add it scaled below half the smallest positive score."""
    dense = scores.toarray()
    if prior is not None:
        positive = scores.data[scores.data > 0]
        dense += 0.5 * (positive.min() if positive.size else 1.0) * prior[None, :]
    return dense


def _popularity_prior(x: sp.csr_matrix) -> np.ndarray:
    """float64 [V + 1] in [0, 1): training events per item / (max + 1)."""
    pop = np.asarray(x.sum(axis=0)).ravel()
    return pop / (pop.max(initial=0.0) + 1.0)


def item_knn_scorer(split: LeaveOneOut, neighbours: int, shrink: float, tiebreak: bool = True):
    """(scorer, S, X): eval batch -> float [B, V + 1] = H S (+ the popularity tie-break)."""
    x = training_matrix(split)
    s = item_similarities(x, neighbours, shrink)
    prior = _popularity_prior(x) if tiebreak else None
    num_items = split.log.num_items

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        return _add_tiebreak(history_matrix(batch, num_items) @ s, prior)

    return score, s, x


def user_neighbour_weights(history: sp.csr_matrix, x: sp.csr_matrix, xt: sp.csr_matrix, users: np.ndarray,
                           neighbours: int, shrink: float) -> sp.csr_matrix:
    """W [B, U] CSR: sim(b, u) for each row's `neighbours` most similar training users (own user excluded).

    history: binary [B, V + 1]; x: binary [U, V + 1]; xt: x.T as CSR; users [B]: the rows' user ids."""
    h_norm = np.sqrt(np.diff(history.indptr).astype(np.float64))
    u_norm = np.sqrt(np.diff(x.indptr).astype(np.float64))
    overlap = (history @ xt).tocoo()  # |H_b ∩ I_u| for every pair sharing an item
    sim = overlap.data / (h_norm[overlap.row] * u_norm[overlap.col] + shrink)
    sim[overlap.col == np.asarray(users)[overlap.row]] = 0.0  # the user's own training row is a copy of H_b
    weights = sp.csr_matrix((sim, (overlap.row, overlap.col)), shape=(history.shape[0], x.shape[0]))
    return top_k_per_row(weights, neighbours)


def user_knn_scorer(split: LeaveOneOut, neighbours: int, shrink: float, tiebreak: bool = True):
    """(scorer, X): eval batch -> float [B, V + 1] = W X (+ the popularity tie-break)."""
    x = training_matrix(split)
    xt = x.T.tocsr()
    prior = _popularity_prior(x) if tiebreak else None
    num_items = split.log.num_items

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        w = user_neighbour_weights(history_matrix(batch, num_items), x, xt, batch["users"], neighbours, shrink)
        return _add_tiebreak(w @ x, prior)

    return score, x


def _mean_history(x: sp.csr_matrix) -> float:
    """Distinct training items per user: stands in for an evaluation row's history length."""
    return x.nnz / max(x.shape[0], 1)


@register_fitted("item_knn")
@dataclasses.dataclass(frozen=True)
class ItemKNNConfig(FittedModelConfig):
    """Item-based cosine kNN. parameters: stored similarities (nnz of S). scoring_flops: 2 x (mean
    distinct training items per user) x (mean stored neighbours per item): one multiply-add per
    (history item, neighbour) of H S."""

    name: Literal["item_knn"] = knob("item_knn")
    neighbours: int = knob(100, ge=1, help="most similar items kept per item")
    shrink: float = knob(20.0, ge=0.0, help="added to the cosine's denominator: damps pairs of rare items")
    popularity_tiebreak: bool = knob(True, help="order items the neighbours leave tied (unscored) by training popularity")

    def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted:
        score, s, x = item_knn_scorer(split, self.neighbours, self.shrink, self.popularity_tiebreak)
        items_with_neighbours = max(int((np.diff(s.indptr) > 0).sum()), 1)
        per_item = s.nnz / items_with_neighbours
        history = _mean_history(x)
        return Fitted(score, parameters=int(s.nnz), scoring_flops=2.0 * history * per_item,
                      details={"neighbours_per_item": per_item, "mean_history": history})


@register_fitted("user_knn")
@dataclasses.dataclass(frozen=True)
class UserKNNConfig(FittedModelConfig):
    """User-based cosine kNN. parameters: the training matrix's nonzeros (all of X is kept).
    scoring_flops: 2 x (n̄ d̄ + k n̄), n̄ the mean distinct training items per user, d̄ the mean
    training users per item, k the neighbours: the overlaps H Xᵀ touch d̄ users per history item,
    the weighted sum W X touches the n̄ items of each of k neighbours (top-k selection not counted)."""

    name: Literal["user_knn"] = knob("user_knn")
    neighbours: int = knob(300, ge=1, help="most similar training users summed per evaluation row")
    shrink: float = knob(0.0, ge=0.0, help="added to the cosine's denominator: damps users with short histories")
    popularity_tiebreak: bool = knob(True, help="order items the neighbours leave tied (unscored) by training popularity")

    def fit(self, split: LeaveOneOut, *, seed: int) -> Fitted:
        score, x = user_knn_scorer(split, self.neighbours, self.shrink, self.popularity_tiebreak)
        history = _mean_history(x)
        degree = x.nnz / max(int((np.diff(x.tocsc().indptr) > 0).sum()), 1)
        flops = 2.0 * (history * degree + self.neighbours * history)
        return Fitted(score, parameters=int(x.nnz), scoring_flops=flops,
                      details={"mean_history": history, "mean_item_degree": degree})
