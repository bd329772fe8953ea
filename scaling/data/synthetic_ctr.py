"""The synthetic CTR view of the world: a known teacher labels (user, item, context) examples.

An example is one impression: a user, an item and a context drawn by popularity from the world's
pools (`world.py`). Its features are the members' categorical attributes (F fields, Zipf-skewed,
co-varying through the members' latent segments) and D standardized dense features. Its label is
a click drawn from a teacher whose logit is a known function of those features:

    logit = bias + first_order * T1 + pairwise * T2 + deep * T3 + label_noise * eps

Each field value j of field f carries a teacher *score* s_f[j] in R^2 and a pairwise code
c_f[j] in R^4, both fixed linear views of the value's latent vector, shrunk for rare values by
(1 + j / 64)^-1/2 (id j has popularity rank j), so the tail of a large field carries little signal
and per-id memorization stays cheap. With h = [s_1, ..., s_F, dense] (2F + D numbers):

  T1  first order:   sum_f s_f[x_f][0] + <v, dense>                      (additive)
  T2  pairwise:      sum_{f<g} <c_f[x_f], c_g[x_g]>                      (low-rank FM)
  T3  deep:          sum_k a_k phi_k(<w_k, whiten(h)>),   a_k = +-k^-spectrum_exponent

The K = num_ridges directions w_k are orthonormal in the whitened h-space (K <= 2F + D), so the
ridge inputs t_k are uncorrelated, nearly Gaussian, unit-variance. phi_k(t) = tanh(t / 2 + b_k)
(b_k ~ Uniform(-1, 1), t clipped to +-4) with 3/4 of its linear part removed and rescaled to unit
variance (moments by Gauss-Hermite quadrature): a smooth ridge whose even and odd parts mix all
interaction orders of the fields it spans. It keeps a quarter of its linear part (information
exponent 1), so gradient descent picks it up gradually rather than in parity-like jumps; smooth
profiles matter too (sharper ones, tanh(2t + b) and up, were learned far more slowly). Ridge k
therefore contributes variance a_k^2 to T3, and the ridges are ordered by weight: the spectrum is
a power law by construction. A model that resolves the top n ridges is left with the fraction
sum_{k>n} a_k^2 / sum_k a_k^2 ~ n^(1-2β) of T3's variance (β = spectrum_exponent > 1/2, K >> n),
so its excess loss falls as n^-(2β-1):
`Teacher.spectrum_tail(n)` and `reference_metrics()['implied_exponent']` report it.

Each term is standardized (zero mean, unit variance on a calibration sample), so the knobs are the
terms' logit standard deviations; the bias is solved so the mean click probability is base_rate.
`prob` integrates the Gaussian logit noise out exactly (Gauss-Hermite quadrature), so it is the
Bayes-optimal prediction from the features and its logloss is the floor no model can beat.

Randomness: example i of a stream is a pure function of (seed, stream, i) (`world.CounterRNG`).
Train examples are stream 0 (unbounded; batch j of size B is examples [jB, (j+1)B)), the held-out
set is examples [0, eval_examples) of stream 1 (independent of the train stream and of any batch
size), and stream 2 calibrates the teacher.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from scaling.config import DataConfig
from scaling.config_schema import ConfigError, knob
from scaling.data.pipeline import batch_iterator, batch_rows
from scaling.data.registry import register_data
from scaling.data.spec import CTRFeatureSpec
from scaling.train.metrics import split_halves
from scaling.data.world import CounterRNG, World, log_spaced_cardinalities, rowwise_dot, rowwise_matmul

__all__ = ["SyntheticCTRConfig", "SyntheticCTR", "Teacher", "TRAIN_STREAM", "EVAL_STREAM", "binary_entropy",
           "click_reference_metrics", "expected_click"]

TRAIN_STREAM = 0
EVAL_STREAM = 1
CALIBRATION_STREAM = 2
_SLOT_LABEL = World.FIRST_VIEW_SLOT  # the label's uniform draw
_CHUNK = 16384  # examples generated per vectorized call (bounds temporary memory)

# Teacher constants (documented in the module docstring; not knobs).
SCORE_DIM = 2  # teacher score dimensions per field value
PAIR_RANK = 4  # rank of the pairwise (FM) codes
SHRINK_HEAD = 64.0  # ids beyond this popularity rank are shrunk by (1 + j / head)^-1/2
RIDGE_SHARPNESS = 0.5  # phi_k(t) = tanh(sharpness * t + b_k) ...
RIDGE_BIAS = 1.0  # ... with b_k ~ Uniform(-ridge_bias, ridge_bias)
RIDGE_CLIP = 4.0  # ridge inputs are clipped to +-4 standard deviations (bounds every ridge)
RIDGE_LINEAR_FRACTION = 0.25  # share of each ridge's linear (Hermite-1) part that is kept
CALIBRATION_EXAMPLES = 32768

# Gauss-Hermite (probabilists') nodes for E_eps[sigmoid(x + s * eps)], eps ~ N(0, 1).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(16)
_GH_W = _GH_W / _GH_W.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def expected_click(logit: np.ndarray, label_noise: float) -> np.ndarray:
    """float64 [B]: E_eps[sigmoid(logit + label_noise * eps)], eps ~ N(0, 1) (Gauss-Hermite, exact
    for practical purposes): the click probability when the label's logit has Gaussian noise."""
    logit = np.asarray(logit, np.float64)
    if label_noise == 0:
        return _sigmoid(logit)
    return rowwise_dot(_sigmoid(logit[:, None] + label_noise * _GH_X[None, :]), _GH_W)


def binary_entropy(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return float(-(p * np.log(p) + (1 - p) * np.log1p(-p)))


class Teacher:
    """The click model: features -> logit -> click probability. See the module docstring."""

    def __init__(
        self,
        world: World,
        *,
        base_rate: float,
        first_order: float,
        pairwise: float,
        deep: float,
        label_noise: float,
        num_ridges: int,
        spectrum_exponent: float,
    ):
        self.world = world
        F, D, r = world.num_fields, world.num_dense, world.latent_dim
        self.ridge_dim = SCORE_DIM * F + D
        if not 1 <= num_ridges <= self.ridge_dim:
            raise ValueError(
                f"num_ridges must be in 1..{self.ridge_dim} (2 * num_fields + num_dense), got {num_ridges}"
            )
        g = world.generator("teacher")

        # One table of per-id teacher parameters, all fields stacked: [score (2) | pair code (4)].
        tables = []
        for f, card in enumerate(world.cardinalities):
            shrink = (1.0 + np.arange(card) / SHRINK_HEAD) ** -0.5
            score = world.value_latent[f] @ g.standard_normal((r, SCORE_DIM))
            score = (score - score.mean(0)) / score.std(0).clip(1e-6)
            code = world.value_latent[f] @ (g.standard_normal((r, PAIR_RANK)) * np.sqrt(r / PAIR_RANK))
            tables.append(shrink[:, None] * np.concatenate([score, code], 1))
        self.table = np.concatenate(tables).astype(np.float32)
        self.offsets = world.field_offsets
        self.dense_first = (g.standard_normal(D) / np.sqrt(max(D, 1))).astype(np.float32)

        # Ridges: orthonormal directions, power-law weights, smooth profiles.
        K = int(num_ridges)
        omega = np.linalg.qr(g.standard_normal((self.ridge_dim, self.ridge_dim)))[0][:, :K]
        k = np.arange(1, K + 1, dtype=np.float64)
        self.spectrum_exponent = float(spectrum_exponent)
        self.ridge_weight = k**-self.spectrum_exponent * g.choice([-1.0, 1.0], K)
        kappa = np.full(K, RIDGE_SHARPNESS)
        rbias = RIDGE_BIAS * g.uniform(-1.0, 1.0, K)
        # Moments under t ~ N(0, 1) by Gauss-Hermite quadrature (x: the clipped input).
        x, wq = np.polynomial.hermite_e.hermegauss(96)
        wq = wq / wq.sum()
        x = np.clip(x, -RIDGE_CLIP, RIDGE_CLIP)
        y = np.tanh(kappa[:, None] * x[None, :] + rbias[:, None])
        c1 = (1.0 - RIDGE_LINEAR_FRACTION) * ((y * x[None, :]) @ wq) / ((x * x) @ wq)
        c0 = (y - c1[:, None] * x[None, :]) @ wq
        resid = y - c0[:, None] - c1[:, None] * x[None, :]
        rnorm = np.sqrt((resid**2) @ wq)
        self._kappa, self._rbias, self._c0, self._c1, self._rnorm = (
            a.astype(np.float32) for a in (kappa, rbias, c0, c1, rnorm)
        )
        self._ridge_weight32 = self.ridge_weight.astype(np.float32)

        self.scales = np.array([first_order, pairwise, deep], np.float32)
        self.label_noise = float(label_noise)

        # Calibration on stream 2: whiten h, standardize the ridge inputs and the terms, solve the bias.
        cal = world.draw(CounterRNG(world.seed, CALIBRATION_STREAM), np.arange(CALIBRATION_EXAMPLES))
        rows = self._rows(cal.sparse)
        h = self._h(rows, cal.dense).astype(np.float64)
        mu = h.mean(0)
        evals, evecs = np.linalg.eigh(np.cov(h, rowvar=False))
        whiten = (evecs / np.sqrt(np.maximum(evals, 1e-6 * evals.max()))[None, :]) @ evecs.T
        proj = whiten @ omega
        t = (h - mu) @ proj  # calibration only (float64)
        t_mean, t_std = t.mean(0), t.std(0)
        self._proj = (proj / t_std[None, :]).astype(np.float32)
        self._shift = ((mu @ proj + t_mean) / t_std).astype(np.float32)
        self._term_mean = np.zeros(3, np.float32)
        self._term_scale = np.ones(3, np.float32)
        raw = self._terms(rows, cal.dense)
        self._term_mean = raw.mean(0).astype(np.float32)
        self._term_scale = (1.0 / raw.std(0).clip(1e-6)).astype(np.float32)
        self.bias = 0.0
        logit = self.logit(cal.sparse, cal.dense).astype(np.float64)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if self.prob(logit + mid).mean() > base_rate else (mid, hi)
        self.bias = float(0.5 * (lo + hi))

    # -- the teacher's function ------------------------------------------------------------------
    def _rows(self, sparse: np.ndarray) -> np.ndarray:
        """float32 [B, F, 6]: each field's teacher score and pairwise code."""
        return self.table[sparse + self.offsets[None, :]]

    def _h(self, rows: np.ndarray, dense: np.ndarray) -> np.ndarray:
        B = len(rows)
        return np.concatenate([rows[:, :, :SCORE_DIM].reshape(B, -1), dense], axis=1)

    def ridge_inputs(self, sparse: np.ndarray, dense: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, K]: t_k, the standardized input of each ridge (slots: see world.rowwise_matmul)."""
        return rowwise_matmul(self._h(self._rows(sparse), dense), self._proj, slots) - self._shift

    def ridges(self, t: np.ndarray) -> np.ndarray:
        """float32 [B, K]: phi_k(t_k), each with zero mean and unit variance for t_k ~ N(0, 1)."""
        t = np.clip(t, -RIDGE_CLIP, RIDGE_CLIP)
        y = np.tanh(t * self._kappa + self._rbias)
        y -= self._c0 + self._c1 * t
        y /= self._rnorm
        return y

    def _terms(self, rows: np.ndarray, dense: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        first = rows[:, :, 0].sum(1) + rowwise_dot(dense, self.dense_first)
        code = rows[:, :, SCORE_DIM:]
        total = code.sum(1)
        pair = 0.5 * ((total * total).sum(1) - (code * code).sum((1, 2)))
        t = rowwise_matmul(self._h(rows, dense), self._proj, slots) - self._shift
        deep = rowwise_dot(self.ridges(t), self._ridge_weight32)
        out = np.stack([first, pair, deep], axis=1)
        return (out - self._term_mean) * self._term_scale

    def terms(self, sparse: np.ndarray, dense: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, 3]: the standardized first-order, pairwise and deep terms."""
        return self._terms(self._rows(sparse), dense, slots)

    def logit(self, sparse: np.ndarray, dense: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        """float32 [B]: the noiseless logit. slots: the examples' indices, so that each example's
        numbers do not depend on what else is computed with it (world.rowwise_matmul)."""
        return np.float32(self.bias) + rowwise_dot(self.terms(sparse, dense, slots), self.scales)

    def prob(self, logit: np.ndarray) -> np.ndarray:
        """float64 [B]: P(click | features) = E_eps[sigmoid(logit + label_noise * eps)]."""
        return expected_click(logit, self.label_noise)

    # -- the spectrum -----------------------------------------------------------------------------
    def spectrum_tail(self, n: int) -> float:
        """Fraction of the deep term's variance in ridges n+1..K (0 <= n <= K)."""
        a2 = self.ridge_weight**2
        return float(a2[int(n):].sum() / a2.sum())

    @property
    def implied_exponent(self) -> float:
        """2β - 1: the tail fraction falls as n^-(2β-1) in the number n of resolved ridges (β > 1/2)."""
        return 2.0 * self.spectrum_exponent - 1.0


@register_data("synthetic_ctr")
@dataclasses.dataclass(frozen=True)
class SyntheticCTRConfig(DataConfig):
    """The synthetic CTR world (the default data set): fast, seeded, with a known Bayes floor."""

    name: Literal["synthetic_ctr"] = knob("synthetic_ctr", help="data set")
    seed: int = knob(0, ge=0, help="world seed: fixes users, items, contexts, the teacher and every example")
    num_fields: int = knob(26, ge=1, le=1000, help="categorical fields")
    num_dense: int = knob(13, ge=0, le=112, help="dense features (standardized: mean 0, variance 1)")
    min_cardinality: int = knob(3, ge=2, help="smallest field cardinality (cardinalities are log-spaced)")
    max_cardinality: int = knob(1000, ge=2, le=1_000_000, help="largest field cardinality")
    zipf_exponent: float = knob(1.1, ge=0.0, le=4.0, help="Zipf exponent of field-value popularity")
    eval_examples: int = knob(50_000, ge=1, help="size of the fixed held-out set")
    base_rate: float = knob(0.15, ge=0.01, le=0.5, help="mean click probability (the bias is solved for it)")
    first_order: float = knob(0.5, ge=0.0, help="logit std of the first-order (additive) term")
    pairwise: float = knob(0.5, ge=0.0, help="logit std of the pairwise low-rank (FM) term")
    deep: float = knob(3.0, ge=0.0, help="logit std of the deep term (power-law sum of ridges)")
    label_noise: float = knob(0.25, ge=0.0, help="std of Gaussian noise added to the logit per example")
    num_ridges: int = knob(64, ge=1, help="ridges of the deep term (at most 2 * num_fields + num_dense)")
    spectrum_exponent: float = knob(
        0.6, ge=0.0, le=4.0, help="ridge k has weight k^-exponent; > 0.5 gives excess loss ~ n^-(2*exponent-1)"
    )

    def check(self) -> None:
        if self.min_cardinality > self.max_cardinality:
            raise ConfigError(
                "min_cardinality", f"expected <= max_cardinality ({self.max_cardinality}), got {self.min_cardinality}"
            )
        ridge_dim = SCORE_DIM * self.num_fields + self.num_dense
        if self.num_ridges > ridge_dim:
            raise ConfigError(
                "num_ridges", f"expected <= 2 * num_fields + num_dense = {ridge_dim}, got {self.num_ridges}"
            )

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return log_spaced_cardinalities(self.num_fields, self.min_cardinality, self.max_cardinality)

    def feature_spec(self) -> CTRFeatureSpec:
        return CTRFeatureSpec(cardinalities=self.cardinalities, num_dense=self.num_dense)

    def build(self) -> SyntheticCTR:
        return SyntheticCTR(self)


class SyntheticCTR:
    """The data set object the training loop uses (duck-typed; see `train_iterator` and friends)."""

    def __init__(self, config: SyntheticCTRConfig):
        self.config = config
        self.spec = config.feature_spec()
        self.world = World(
            seed=config.seed,
            cardinalities=self.spec.cardinalities,
            num_dense=config.num_dense,
            zipf_exponent=config.zipf_exponent,
        )
        self.teacher = Teacher(
            self.world,
            base_rate=config.base_rate,
            first_order=config.first_order,
            pairwise=config.pairwise,
            deep=config.deep,
            label_noise=config.label_noise,
            num_ridges=config.num_ridges,
            spectrum_exponent=config.spectrum_exponent,
        )

    # -- direct generation --------------------------------------------------------------------------
    def examples(
        self, index: np.ndarray, *, stream: int = TRAIN_STREAM, with_prob: bool = False
    ) -> dict[str, np.ndarray]:
        """The examples `index` (int [B]) of a stream: {'sparse', 'dense', 'label'} (+ float64 'prob')."""
        index = np.asarray(index, dtype=np.int64)
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {index.shape}")
        if len(index) > _CHUNK:
            parts = [
                self.examples(index[s : s + _CHUNK], stream=stream, with_prob=with_prob)
                for s in range(0, len(index), _CHUNK)
            ]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rng = CounterRNG(self.config.seed, stream)
        ent = self.world.draw(rng, index)
        prob = self.teacher.prob(self.teacher.logit(ent.sparse, ent.dense, slots=index))
        label = (rng.uniform(index, _SLOT_LABEL)[:, 0] < prob).astype(np.float32)
        out = {"sparse": ent.sparse, "dense": ent.dense, "label": label}
        if with_prob:
            out["prob"] = prob
        return out

    def batch(self, j: int, batch_size: int, rows=None) -> dict[str, np.ndarray]:
        """Train batch j: train examples [j * batch_size, (j + 1) * batch_size), or only those at
        positions `rows` of it (one process's share of the global batch)."""
        if j < 0 or batch_size < 1:
            raise ValueError(f"need j >= 0 and batch_size >= 1, got j={j}, batch_size={batch_size}")
        return self.examples(j * batch_size + batch_rows(batch_size, rows))

    # -- what the training loop uses ----------------------------------------------------------------
    def train_iterator(self, batch_size: int, *, prefetch: int = 2, num_threads: int = 1, start_batch: int = 0,
                       rows=None):
        """Infinite grain iterator of train batches {'sparse' int32 [B,F], 'dense' float32 [B,D], 'label' float32 [B]}.

        Batch j is train examples [jB, (j+1)B) (rows: only those positions of it). `get_state()` /
        `set_state()` save and restore the position exactly ({'next_index': batches returned since start_batch}).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_iterator(
            functools.partial(self.batch, batch_size=int(batch_size), rows=None if rows is None else batch_rows(batch_size, rows)),
            start=start_batch,
            prefetch=prefetch,
            num_threads=num_threads,
        )

    @functools.cached_property
    def _eval(self) -> dict[str, np.ndarray]:
        arrays = self.examples(np.arange(self.config.eval_examples), stream=EVAL_STREAM, with_prob=True)
        for a in arrays.values():
            a.setflags(write=False)
        return arrays

    def eval_arrays(self) -> dict[str, np.ndarray]:
        """The fixed held-out set: {'sparse', 'dense', 'label', 'prob'} (prob = true click probability)."""
        return dict(self._eval)

    def reference_metrics(self) -> dict[str, float]:
        """Floors and baselines on the held-out set from the teacher's true probabilities
        (`click_reference_metrics`), and the deep term's spectrum."""
        return {
            **click_reference_metrics(self._eval["label"], self._eval["prob"]),
            "spectrum_exponent": self.teacher.spectrum_exponent,
            "implied_exponent": self.teacher.implied_exponent,
        }


def click_reference_metrics(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Floors and baselines of a held-out set whose true click probabilities are known.

    base_rate: the held-out click rate (mean label). constant_logloss: logloss of always
    predicting it (= its binary entropy, the NE denominator). bayes_logloss: logloss of the true
    probabilities on the held-out labels (no model can do better in expectation); bayes_ne its
    normalized entropy; bayes_entropy: its expectation over labels, mean H(prob). The same floors
    on the halves the loop reports as valid_* and test_*.
    """
    y = np.asarray(label, np.float64)
    p = np.clip(np.asarray(prob, np.float64), 1e-12, 1 - 1e-12)
    base = float(y.mean())
    constant = binary_entropy(base)
    bayes_each = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    entropy_each = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    per_half = {}
    for half, rows in split_halves(len(y)).items():
        per_half[f"{half}_bayes_logloss"] = float(bayes_each[rows].mean())
        per_half[f"{half}_bayes_entropy"] = float(entropy_each[rows].mean())
    bayes = float(bayes_each.mean())
    return {
        **per_half,
        "base_rate": base,
        "true_base_rate": float(p.mean()),
        "constant_logloss": constant,
        "bayes_logloss": bayes,
        "bayes_ne": bayes / constant,
        "bayes_entropy": float(entropy_each.mean()),
    }
