"""Fitted classical baselines: item-kNN, user-kNN, implicit ALS, Funk MF, against hand-computed numbers
and independent dense formulas, and end to end against a random scorer on a clustered log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from scaling.config_schema import ConfigError
from scaling.data.interactions import Interactions
from scaling.data.leave_one_out import leave_one_out
from scaling.data.sequence_batches import SequenceBatches
from scaling.models.baselines.als import ALSConfig, _objective, fit_als, solve_rows
from scaling.models.baselines.funk_mf import FunkMFConfig, fit_funk_mf, rmse
from scaling.models.baselines.neighbourhood import (ItemKNNConfig, UserKNNConfig, item_similarities, top_k_per_row,
                                                    user_neighbour_weights)
from scaling.train.retrieval_eval import evaluate_retrieval

# 4 users x items 1..4 (column 0 is padding): u0 {1, 2}, u1 {1, 2, 3}, u2 {2, 3}, u3 {1, 4}
TINY = [[1, 2], [1, 2, 3], [2, 3], [1, 4]]


def _binary(rows: list[list[int]], items: int = 4) -> sp.csr_matrix:
    dense = np.zeros((len(rows), items + 1))
    for u, row in enumerate(rows):
        dense[u, row] = 1.0
    return sp.csr_matrix(dense)


def test_item_knn_similarities_by_hand():
    # degrees: |U_1| = 3, |U_2| = 3, |U_3| = 2, |U_4| = 1; overlaps: 1-2: 2, 1-3: 1, 1-4: 1, 2-3: 2
    s = item_similarities(_binary(TINY), neighbours=10).toarray()
    r2, r3, r6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    expected = np.zeros((5, 5))
    for (i, j), v in {(1, 2): 2 / 3, (1, 3): 1 / r6, (1, 4): 1 / r3, (2, 3): 2 / r6}.items():
        expected[i, j] = expected[j, i] = v
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    assert np.all(np.diag(s) == 0)

    shrunk = item_similarities(_binary(TINY), neighbours=10, shrink=1.0).toarray()
    assert shrunk[1, 2] == pytest.approx(2 / (3 + 1))
    assert shrunk[1, 3] == pytest.approx(1 / (r6 + 1))
    assert shrunk[1, 4] == pytest.approx(1 / (r3 * 1 + 1))
    assert shrunk[3, 2] == pytest.approx(2 / (r2 * r3 + 1))

    # top-1 per row: 1 -> 2 (2/3 > 1/sqrt3 > 1/sqrt6), 2 -> 3 (2/sqrt6 > 2/3), 3 -> 2, 4 -> 1
    top1 = item_similarities(_binary(TINY), neighbours=1)
    assert top1.nnz == 4
    assert {(i, int(top1[i].indices[0])) for i in range(1, 5)} == {(1, 2), (2, 3), (3, 2), (4, 1)}
    assert top1[2, 3] == pytest.approx(2 / r6)


def test_item_knn_matches_dense_formula_with_pruning():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 25)) < 0.2).astype(float)
    x[:, 0] = 0.0
    co = x.T @ x
    n = np.sqrt(x.sum(0))
    dense = co / (np.outer(n, n) + 2.0)
    np.fill_diagonal(dense, 0.0)
    k = 3
    for row in dense:  # keep each row's k largest, ties to the lower column
        row[np.argsort(-row, kind="stable")[k:]] = 0.0
    s = item_similarities(sp.csr_matrix(x), neighbours=k, shrink=2.0)
    np.testing.assert_allclose(s.toarray(), dense, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(s.indptr) <= k)


def test_top_k_per_row_breaks_ties_by_column():
    m = sp.csr_matrix(np.array([[0.5, 0.5, 0.2, 0.5], [0.0, 0.0, 0.0, 0.0], [0.1, 0.3, 0.0, 0.0]]))
    expected = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.3, 0.0, 0.0]]
    np.testing.assert_array_equal(top_k_per_row(m, 2).toarray(), expected)


def test_user_knn_scores_by_hand():
    # evaluation row: user 1 with history {1, 2, 3}; own row excluded. sims: u0 2/sqrt6, u2 2/sqrt6, u3 1/sqrt6
    x = _binary(TINY)
    history = _binary([[1, 2, 3]])
    r6 = math.sqrt(6)
    w = user_neighbour_weights(history, x, x.T.tocsr(), np.array([1]), neighbours=10, shrink=0.0)
    np.testing.assert_allclose(w.toarray(), [[2 / r6, 0.0, 2 / r6, 1 / r6]])
    np.testing.assert_allclose((w @ x).toarray(), [[0.0, 3 / r6, 4 / r6, 2 / r6, 1 / r6]])
    w2 = user_neighbour_weights(history, x, x.T.tocsr(), np.array([1]), neighbours=2, shrink=1.0)
    np.testing.assert_allclose((w2 @ x).toarray(), [[0.0, 2 / (r6 + 1), 4 / (r6 + 1), 2 / (r6 + 1), 0.0]])


def test_als_user_solve_matches_dense_closed_form():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 4, size=(6, 9)) * (rng.random((6, 9)) < 0.4)
    r = sp.csr_matrix(counts.astype(np.float32))
    y = rng.normal(size=(9, 3)).astype(np.float32)
    alpha, reg = 7.0, 0.3
    x = np.asarray(solve_rows(r, y, alpha, reg))
    for u in range(6):
        c = 1.0 + alpha * counts[u]
        p = (counts[u] > 0).astype(float)
        yd = y.astype(np.float64)
        expected = np.linalg.solve(yd.T @ (c[:, None] * yd) + reg * np.eye(3), yd.T @ (c * p))
        np.testing.assert_allclose(x[u], expected, rtol=2e-4, atol=1e-5)


def test_als_objective_decreases_and_matches_dense():
    rng = np.random.default_rng(2)
    counts = (rng.integers(1, 3, size=(30, 20)) * (rng.random((30, 20)) < 0.25)).astype(np.float32)
    r = sp.csr_matrix(counts)
    alpha, reg = 4.0, 0.05
    x, y, objectives = fit_als(r, rank=4, alpha=alpha, reg=reg, iterations=6, seed=0)
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < objectives[0]
    xd, yd = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dense = np.sum((1 + alpha * counts) * ((counts > 0) - xd @ yd.T) ** 2) + reg * (np.sum(xd**2) + np.sum(yd**2))
    coo = r.tocoo()
    assert _objective(x, y, coo.row, coo.col, coo.data, alpha, reg) == pytest.approx(dense, rel=1e-4)
    assert objectives[-1] == pytest.approx(dense, rel=1e-4)


def test_funk_mf_learns_a_low_rank_rating_matrix():
    rng = np.random.default_rng(3)
    users, items = 40, 30
    truth = 3.0 + rng.normal(size=(users, 2)) @ rng.normal(size=(2, items + 1))
    u, i = np.nonzero(rng.random((users, items)) < 0.6)
    i = i + 1  # item ids start at 1
    ratings = truth[u, i].astype(np.float32)
    params = fit_funk_mf(u.astype(np.int32), i.astype(np.int32), ratings, users, items, rank=4, learning_rate=0.02,
                         regularization=0.01, epochs=150, batch_size=32, init_scale=0.1, seed=0)
    fitted = rmse(params, u, i, ratings)
    assert fitted < 0.2 * np.std(ratings), (fitted, np.std(ratings))


def _log(timelines: list[list[int]], ratings: list[list[float]] | None, num_items: int) -> Interactions:
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in timelines])]).astype(np.int64)
    items = np.concatenate(timelines).astype(np.int32)
    rated = np.concatenate(ratings).astype(np.float32) if ratings else np.full(len(items), np.nan, np.float32)
    stamps = np.concatenate([np.arange(len(t)) for t in timelines]).astype(np.int64)
    return Interactions(offsets=offsets, items=items, timestamps=stamps, ratings=rated,
                        user_ids=tuple(str(u) for u in range(len(timelines))),
                        item_ids=("",) + tuple(str(i) for i in range(1, num_items + 1)), source="synthetic", timed=False)


def test_funk_mf_refuses_a_log_without_ratings():
    split = leave_one_out(_log([[1, 2, 3], [2, 3, 1]], None, 3))
    with pytest.raises(ConfigError, match="synthetic has no ratings .*funk_mf needs explicit ratings, use bpr_mf or als"):
        FunkMFConfig().fit(split, seed=0)


def _clustered(users: int = 300, clusters: int = 10, per_cluster: int = 8, seed: int = 0):
    """Each user lives in one cluster: 6 of its items in random order (rated 5), two off-cluster items
    (rated 1) somewhere in the training part; validation and test targets are in the cluster."""
    rng = np.random.default_rng(seed)
    timelines, ratings = [], []
    for u in range(users):
        own = 1 + (u % clusters) * per_cluster + rng.permutation(per_cluster)[:6]
        noise = [int(rng.choice(np.setdiff1d(np.arange(1, clusters * per_cluster + 1), own))) for _ in range(2)]
        train = list(own[:4])
        for item in noise:
            train.insert(int(rng.integers(0, len(train) + 1)), item)
        timelines.append(train + list(own[4:]))
        ratings.append([1.0 if t in noise else 5.0 for t in timelines[-1]])
    return _log(timelines, ratings, clusters * per_cluster)


# Funk MF ranks by predicted rating, not by what a user will pick next: a lower floor.
@pytest.mark.parametrize("config, floor", [
    (ItemKNNConfig(), 0.9), (UserKNNConfig(neighbours=20), 0.9),
    (ALSConfig(rank=8, iterations=5, alpha=10.0, regularization=0.1), 0.9),
    (FunkMFConfig(rank=8, learning_rate=0.05, regularization=0.1, epochs=40, batch_size=64), 0.6),
], ids=["item_knn", "user_knn", "als", "funk_mf"])
def test_fitted_family_beats_random_on_a_clustered_log(config, floor):
    split = leave_one_out(_clustered())
    data = SequenceBatches(split, max_len=int(split.log.lengths.max()))
    fitted = config.fit(split, seed=0)
    rng = np.random.default_rng(0)
    chance = evaluate_retrieval(data, lambda b: rng.random((len(b["target"]), split.log.num_items + 1)), "test")
    result = evaluate_retrieval(data, fitted.score, "test")
    assert result["hr@10"] > floor and result["hr@10"] > 4 * chance["hr@10"], (result["hr@10"], chance["hr@10"])
    assert fitted.parameters > 0 and fitted.scoring_flops > 0
