"""The ranking view of the synthetic world: impressions with behaviour sequences, labelled by a known teacher.

Same world, users and items as the CTR view (`synthetic_ctr.py`) and the sequence view
(`synthetic_sequences.py`, whose timelines this view reads). An example is one impression:

  user u at the time of one of its events r (the "request"), with
  history     the user's events before r (item, action, timestamp), as S behaviour sequences:
              S = 1 ("single": every event) or S = 2 ("by_action": views | clicks and purchases),
              each the most recent `seq_len` events of its kind among the last 4 seq_len events,
              right-aligned (padding first);
  candidate   the item the user really took at r with probability `positive_share`, otherwise an
              item drawn by catalogue popularity (what a recommender would also have shown);
  features    the world's categorical attributes of the user, the candidate and a context drawn by
              popularity (the CTR view's 26 fields), its 13 dense features, and the candidate's id
              as a last categorical field;
  label       a click drawn from the teacher below.

Teacher. With g_c the candidate's code, n_j the "leads to" code of item j and lambda the code
spectrum of the sequence view (sum lambda_k^2 = 1), over the last W = `interest_window` events w
of the history (W <= seq_len, so the teacher reads only what the model sees):

    a_w      = INTEREST_SHARPNESS <lambda * n_{j_w}, g_c> + ACTION_BONUS[a_w]
               + REPEAT_BONUS [j_w = c] - (request_time - tau_w) / recency_time
    interest = log(1 + sum_w exp(a_w))                  target-aware, recency- and action-weighted
    features = the CTR view's teacher logit of (sparse, dense) without its bias
               (first-order + pairwise FM + a power-law sum of deep ridges: the feature crosses)
    logit    = bias + interest_scale z(interest) + feature_scale z(features)
    P(click) = E_eps[sigmoid(logit + label_noise eps)]

z(.) standardizes a term on a calibration sample (stream 2) and the bias is solved for `base_rate`.
The interest term is a soft maximum over history events of a candidate-dependent score: mean
pooling of the history (DLRM- and Wukong-style multi-hot features) cannot express it, target
attention (DIN) and attention over the sequence with the candidate (HSTU, OneTrans) can, and the
recency term makes the events' times matter. P(click) is a function of the features the batch
holds, so its logloss on the held-out set is the Bayes floor (`reference_metrics()['bayes_logloss']`).

Splits. Train requests are the events at positions 1 .. L_u - 2 of each timeline (uniformly over
all of them); held-out requests are the users' last events, after every train request's time.
Randomness: example i of a stream is a pure function of (seed, stream, i) (`world.CounterRNG`);
train batch j of size B is examples [jB, (j+1)B) of stream 0, the held-out set examples
[0, eval_examples) of stream 1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal

import numpy as np

from scaling.config import DataConfig
from scaling.config_schema import ConfigError, knob
from scaling.data.pipeline import batch_iterator, batch_rows
from scaling.data.registry import register_data
from scaling.data.spec import RankingSpec
from scaling.data.synthetic_ctr import SyntheticCTRConfig, Teacher, click_reference_metrics, expected_click
from scaling.data.synthetic_sequences import SyntheticSequencesConfig, SequenceTeacher, generate_sequences
from scaling.data.world import CounterRNG, World

__all__ = ["SyntheticRankingConfig", "SyntheticRanking", "RankingTeacher"]

TRAIN_STREAM, EVAL_STREAM, CALIBRATION_STREAM = 0, 1, 2
# Slots of an example's random numbers (the world uses 0..63; see world.World).
_SLOT_REQUEST, _SLOT_CANDIDATE, _SLOT_CONTEXT, _SLOT_LABEL = 64, 65, 67, 68
_CHUNK = 8192  # examples generated per vectorized call
INTEREST_SHARPNESS = 2.0
ACTION_BONUS = np.array([0.0, 1.0, 2.0], np.float32)  # view, click, purchase
REPEAT_BONUS = 2.0
CALIBRATION_EXAMPLES = 16384
HISTORY_SPAN = 4  # by_action sequences are cut from the last HISTORY_SPAN * seq_len events


@register_data("synthetic_ranking")
@dataclasses.dataclass(frozen=True)
class SyntheticRankingConfig(DataConfig):
    """The synthetic ranking view: impressions with behaviour sequences and a known Bayes floor."""

    TASK: ClassVar[str] = "ranking"

    name: Literal["synthetic_ranking"] = knob("synthetic_ranking", help="data set")
    seed: int = knob(0, ge=0, help="world seed: fixes the world, the timelines, the teacher and every example")
    num_users: int = knob(4000, ge=10, le=100_000, help="users whose timelines give the requests")
    num_items: int = knob(2000, ge=2, le=50_000, help="catalogue: the world's most popular items")
    mean_length: float = knob(60.0, gt=0.0, help="mean events per user timeline")
    max_length: int = knob(300, ge=8, help="most events per user timeline")
    sequences: Literal["single", "by_action"] = knob(
        "by_action", help="behaviour sequences: one of every event, or views | clicks and purchases")
    seq_len: int = knob(32, ge=1, le=1024, help="events kept per behaviour sequence (the most recent)")
    positive_share: float = knob(0.5, ge=0.0, le=1.0, help="share of impressions showing the item really taken next")
    eval_examples: int = knob(20_000, ge=2, help="size of the fixed held-out set (requests at users' last events)")
    base_rate: float = knob(0.2, ge=0.01, le=0.5, help="mean click probability (the bias is solved for it)")
    interest_scale: float = knob(2.0, ge=0.0, help="logit std of the target-aware interest term")
    feature_scale: float = knob(1.5, ge=0.0, help="logit std of the non-sequential feature term")
    label_noise: float = knob(0.25, ge=0.0, help="std of Gaussian noise added to the logit per example")
    interest_window: int = knob(32, ge=1, help="most recent events the interest term reads (<= seq_len)")
    recency_time: float = knob(86400.0, gt=0.0, help="seconds over which an event's weight falls by e")

    def check(self) -> None:
        if self.interest_window > self.seq_len:
            raise ConfigError("interest_window", f"expected <= seq_len ({self.seq_len}): the teacher may only read "
                              f"what the model sees, got {self.interest_window}")
        if self.mean_length > self.max_length:
            raise ConfigError("mean_length", f"expected <= max_length ({self.max_length}), got {self.mean_length}")

    @property
    def num_sequences(self) -> int:
        return 1 if self.sequences == "single" else 2

    def sequence_config(self) -> SyntheticSequencesConfig:
        """The sequence view whose timelines this view reads (same seed: same world and users)."""
        return SyntheticSequencesConfig(seed=self.seed, num_users=self.num_users, num_items=self.num_items,
                                        mean_length=self.mean_length, max_length=self.max_length)

    def feature_spec(self) -> RankingSpec:
        ctr = SyntheticCTRConfig(seed=self.seed)
        items = self.num_items + 1  # ids 1..num_items, 0 = padding
        return RankingSpec(cardinalities=ctr.cardinalities + (items,), num_dense=ctr.num_dense,
                           bag_cardinalities=(items,) * self.num_sequences, bag_length=self.seq_len,
                           num_items=self.num_items, num_actions=3)

    def build(self) -> SyntheticRanking:
        return SyntheticRanking(self)


class RankingTeacher:
    """The click model of the ranking view (see the module docstring)."""

    def __init__(self, world: World, sequences: SequenceTeacher, config: SyntheticRankingConfig):
        self.config = config
        self.sequences = sequences
        ctr = SyntheticCTRConfig(seed=config.seed)
        self.features = Teacher(world, base_rate=ctr.base_rate, first_order=ctr.first_order, pairwise=ctr.pairwise,
                                deep=ctr.deep, label_noise=0.0, num_ridges=ctr.num_ridges,
                                spectrum_exponent=ctr.spectrum_exponent)
        # lambda * n_j, so that a_w is one row-wise dot product with g_c.
        self.weighted_next = (sequences.next_codes * sequences.spectrum[None, :]).astype(np.float32)
        self.mean = np.zeros(2, np.float64)
        self.scale = np.ones(2, np.float64)
        self.bias = 0.0

    def calibrate(self, raw: np.ndarray) -> None:
        """Standardize the terms on raw [N, 2] (interest, features) and solve the bias for base_rate."""
        self.mean, self.scale = raw.mean(0), 1.0 / raw.std(0).clip(1e-9)
        logit = self.logit(raw)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if self.prob(logit + mid).mean() > self.config.base_rate else (mid, hi)
        self.bias = float(0.5 * (lo + hi))

    def interest(self, candidate: np.ndarray, items: np.ndarray, actions: np.ndarray, times: np.ndarray,
                 request_time: np.ndarray) -> np.ndarray:
        """float64 [B]: log(1 + sum_w exp(a_w)) over the window items/actions/times int [B, W] (item 0 =
        no event), candidate int [B] (1..I), request_time int [B]."""
        c = self.config
        valid = items > 0
        g = self.sequences.codes[candidate - 1]  # [B, K]
        sim = np.einsum("bwk,bk->bw", self.weighted_next[np.maximum(items, 1) - 1], g)
        age = (request_time[:, None] - times).astype(np.float64) / c.recency_time
        score = INTEREST_SHARPNESS * sim + ACTION_BONUS[actions] + REPEAT_BONUS * (items == candidate[:, None]) - age
        return np.log1p(np.where(valid, np.exp(np.minimum(score, 50.0)), 0.0).sum(1))

    def logit(self, raw: np.ndarray) -> np.ndarray:
        """float64 [B] from raw terms [B, 2] (interest, features), noiseless."""
        c = self.config
        z = (raw - self.mean) * self.scale
        return self.bias + c.interest_scale * z[:, 0] + c.feature_scale * z[:, 1]

    def prob(self, logit: np.ndarray) -> np.ndarray:
        return expected_click(logit, self.config.label_noise)


class SyntheticRanking:
    """The data set object the training loop uses (duck-typed like `SyntheticCTR`)."""

    BATCH_KEYS = ("sparse", "dense", "history", "history_actions", "history_times", "request_time")

    def __init__(self, config: SyntheticRankingConfig):
        self.config = c = config
        self.spec = config.feature_spec()
        seq_config = config.sequence_config()
        self.world = seq_config.world()
        self.log, oracle = generate_sequences(seq_config, self.world)
        self.world_users = oracle.world_users  # int64 [U]: world user of each timeline
        self.teacher = RankingTeacher(self.world, oracle.teacher, config)
        offsets = self.log.offsets
        lengths = np.diff(offsets)
        position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        self._user_of_row = np.repeat(np.arange(len(lengths)), lengths)
        self._train_requests = np.flatnonzero((position >= 1) & (position <= np.repeat(lengths, lengths) - 2))
        self._eval_requests = offsets[1:] - 1
        pop = np.exp(oracle.teacher.log_pop.astype(np.float64))
        self._popularity_cdf = np.cumsum(pop / pop.sum())
        self._events = (self.log.items, self.log.actions.astype(np.int32), self.log.timestamps)
        span = c.seq_len if c.sequences == "single" else HISTORY_SPAN * c.seq_len
        self._span = max(span, c.interest_window)
        calibration = self._draw(np.arange(CALIBRATION_EXAMPLES), CALIBRATION_STREAM)
        self.teacher.calibrate(calibration["raw"])
        self._blind = _fit_logistic(calibration["raw"][:, 1:], self.teacher.prob(self.teacher.logit(calibration["raw"])))

    # -- generation -------------------------------------------------------------------------------
    def _window(self, rows: np.ndarray, span: int) -> tuple[np.ndarray, ...]:
        """The `span` events before each request row int [B] (oldest first; item 0 where the user
        has fewer): items, actions, times int [B, span]."""
        start = self.log.offsets[self._user_of_row[rows]]
        idx = rows[:, None] + np.arange(-span, 0)[None, :]
        valid = idx >= start[:, None]
        idx = np.where(valid, idx, 0)
        items, actions, times = (np.where(valid, a[idx], 0) for a in self._events)
        return items.astype(np.int32), actions.astype(np.int32), times.astype(np.int64)

    def _sequences(self, items: np.ndarray, actions: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, ...]:
        """[B, span] window -> [B, S, seq_len] right-aligned behaviour sequences (items, actions, times)."""
        c = self.config
        L = c.seq_len
        B = len(items)
        groups = [items > 0] if c.sequences == "single" else [(items > 0) & (actions == 0), (items > 0) & (actions > 0)]
        out = [np.zeros((B, len(groups), L), dt) for dt in (np.int32, np.int32, np.int64)]
        for s, member in enumerate(groups):
            from_end = np.cumsum(member[:, ::-1], axis=1)[:, ::-1]  # 1 for the group's last event
            keep = member & (from_end <= L)
            b, w = np.nonzero(keep)
            slot = L - from_end[b, w]
            for dst, src in zip(out, (items, actions, times)):
                dst[b, s, slot] = src[b, w]
        return tuple(out)

    def _draw(self, index: np.ndarray, stream: int) -> dict[str, np.ndarray]:
        c = self.config
        rng = CounterRNG(c.seed, stream)
        u = rng.uniform(index, _SLOT_REQUEST)[:, 0]
        if stream == EVAL_STREAM:
            rows = self._eval_requests[np.minimum((u * len(self._eval_requests)).astype(np.int64),
                                                  len(self._eval_requests) - 1)]
        else:
            rows = self._train_requests[np.minimum((u * len(self._train_requests)).astype(np.int64),
                                                   len(self._train_requests) - 1)]
        uc = rng.uniform(index, _SLOT_CANDIDATE, 2)
        popular = np.minimum(np.searchsorted(self._popularity_cdf, uc[:, 1]), c.num_items - 1) + 1
        candidate = np.where(uc[:, 0] < c.positive_share, self.log.items[rows], popular).astype(np.int32)
        request_time = self.log.timestamps[rows]
        users = self._user_of_row[rows]

        context = self.world.sides["context"].draw(rng.uniform(index, _SLOT_CONTEXT)[:, 0])
        members = {"user": self.world_users[users], "item": self.teacher.sequences.world_items[candidate - 1],
                   "context": context}
        ent = self.world.features(members, rng, index)
        feature_term = self.teacher.features.logit(ent.sparse, ent.dense, slots=index) - self.teacher.features.bias

        items, actions, times = self._window(rows, self._span)
        W = c.interest_window
        interest = self.teacher.interest(candidate, items[:, -W:], actions[:, -W:], times[:, -W:], request_time)
        seq_items, seq_actions, seq_times = self._sequences(items, actions, times)
        return {
            "sparse": np.concatenate([ent.sparse, candidate[:, None]], axis=1),
            "dense": ent.dense,
            "history": seq_items,
            "history_actions": seq_actions,
            "history_times": seq_times.astype(np.int32),
            "request_time": request_time.astype(np.int32),
            "raw": np.stack([interest, feature_term.astype(np.float64)], axis=1),
        }

    def examples(self, index: np.ndarray, *, stream: int = TRAIN_STREAM, with_prob: bool = False) -> dict[str, np.ndarray]:
        """Examples `index` (int [B]) of a stream: the BATCH_KEYS arrays and 'label' (+ float64 'prob',
        the true click probability, and 'interest' / 'feature_term', the teacher's raw terms)."""
        index = np.asarray(index, np.int64)
        if len(index) > _CHUNK:
            parts = [self.examples(index[s : s + _CHUNK], stream=stream, with_prob=with_prob)
                     for s in range(0, len(index), _CHUNK)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out = self._draw(index, stream)
        raw = out.pop("raw")
        prob = self.teacher.prob(self.teacher.logit(raw))
        u = CounterRNG(self.config.seed, stream).uniform(index, _SLOT_LABEL)[:, 0]
        out["label"] = (u < prob).astype(np.float32)
        if with_prob:
            out.update(prob=prob, interest=raw[:, 0], feature_term=raw[:, 1])
        return out

    def batch(self, j: int, batch_size: int, rows=None) -> dict[str, np.ndarray]:
        """Train batch j: train examples [j * batch_size, (j + 1) * batch_size), or only those at
        positions `rows` of it (one process's share of the global batch)."""
        if j < 0 or batch_size < 1:
            raise ValueError(f"need j >= 0 and batch_size >= 1, got j={j}, batch_size={batch_size}")
        return self.examples(j * batch_size + batch_rows(batch_size, rows))

    # -- what the training loop uses -----------------------------------------------------------------
    def train_iterator(self, batch_size: int, *, prefetch: int = 2, num_threads: int = 1, start_batch: int = 0,
                       rows=None):
        """Infinite, checkpointable grain iterator of train batches (BATCH_KEYS + 'label'; see RankingSpec);
        rows: only those positions of each batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = None if rows is None else batch_rows(batch_size, rows)
        return batch_iterator(functools.partial(self.batch, batch_size=int(batch_size), rows=rows), start=start_batch,
                              prefetch=prefetch, num_threads=num_threads)

    @functools.cached_property
    def _eval(self) -> dict[str, np.ndarray]:
        arrays = self.examples(np.arange(self.config.eval_examples), stream=EVAL_STREAM, with_prob=True)
        for a in arrays.values():
            a.setflags(write=False)
        return arrays

    def eval_arrays(self) -> dict[str, np.ndarray]:
        """The fixed held-out set: BATCH_KEYS arrays, 'label' and 'prob' (the true click probability)."""
        return dict(self._eval)

    def reference_metrics(self) -> dict[str, float]:
        """The CTR view's floors (`click_reference_metrics`: base rate, constant and Bayes logloss)
        plus `sequence_blind_logloss`: the logloss of the best logistic function of the teacher's
        feature term alone, what a model that ignores the history could at most reach with that
        term learned exactly (the history's worth is the gap to bayes_logloss)."""
        ev = self._eval
        y = ev["label"].astype(np.float64)
        blind = np.clip(_sigmoid(self._blind[0] + self._blind[1] * ev["feature_term"]), 1e-12, 1 - 1e-12)
        return {
            **click_reference_metrics(ev["label"], ev["prob"]),
            "sequence_blind_logloss": float(-(y * np.log(blind) + (1 - y) * np.log1p(-blind)).mean()),
            "positive_share": self.config.positive_share,
            "train_requests": float(len(self._train_requests)),
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _fit_logistic(x: np.ndarray, p: np.ndarray, steps: int = 50) -> np.ndarray:
    """(a, b): the logistic a + b x [N, 1] minimizing the expected logloss against probabilities p [N]
    (Newton's method; the soft targets make it the population fit, not a fit to drawn labels)."""
    X = np.concatenate([np.ones((len(x), 1)), x.astype(np.float64)], axis=1)
    w = np.zeros(X.shape[1])
    for _ in range(steps):
        q = _sigmoid(X @ w)
        grad = X.T @ (q - p) / len(p)
        hess = (X * (q * (1 - q))[:, None]).T @ X / len(p) + 1e-9 * np.eye(X.shape[1])
        w -= np.linalg.solve(hess, grad)
    return w
