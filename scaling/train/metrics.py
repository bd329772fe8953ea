"""CTR evaluation metrics in float64 on the host: logloss, normalized entropy, exact AUC."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

_EPS = 1e-12


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy in nats."""
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def logloss_from_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy computed stably from logits."""
    y = np.asarray(labels, np.float64)
    z = np.asarray(logits, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def base_rate_entropy(base_rate: float) -> float:
    """Entropy (nats) of a Bernoulli(base_rate): the logloss of the best constant predictor."""
    p = min(max(base_rate, _EPS), 1.0 - _EPS)
    return float(-(p * math.log(p) + (1.0 - p) * math.log1p(-p)))


def normalized_entropy(loss: float, base_rate: float) -> float:
    """NE = logloss / entropy of the base rate (He et al. 2014); < 1 beats the constant predictor."""
    return loss / base_rate_entropy(base_rate)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties)."""
    y = np.asarray(labels) > 0.5
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def relative_logloss(loss: float, reference: float) -> float:
    """Relative logloss in percent vs a reference run (the Wukong paper's y-axis; negative = better)."""
    return 100.0 * (loss - reference) / reference


def teacher_logloss_from_logits(probs: np.ndarray, logits: np.ndarray) -> float:
    """Cross-entropy of logits against known true probabilities (synthetic data only).

    Its expectation over labels equals the logloss's, without the label-sampling noise, so model
    differences show at a fraction of the eval-set size. Its floor is the mean entropy of `probs`.
    """
    p = np.asarray(probs, np.float64)
    z = np.asarray(logits, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - p * z))


def split_halves(n: int) -> dict[str, slice]:
    """The held-out set's two halves: `valid` (selection, e.g. the best lr) and `test` (reported)."""
    return {"valid": slice(0, n // 2), "test": slice(n // 2, n)}


def ctr_metrics(labels: np.ndarray, logits: np.ndarray, base_rate: float | None = None) -> dict[str, float]:
    """logloss, NE and AUC of logits against labels; NE uses the eval set's own base rate by default."""
    labels = np.asarray(labels, np.float64)
    rate = float(labels.mean()) if base_rate is None else base_rate
    loss = logloss_from_logits(labels, logits)
    return {"logloss": loss, "ne": normalized_entropy(loss, rate), "auc": auc(labels, logits)}
