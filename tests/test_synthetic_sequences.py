"""The synthetic sequence view: determinism, a valid log, the oracle, and the signal in order and time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scaling.config_schema import ConfigError, check_constraints
from scaling.data.leave_one_out import leave_one_out
from scaling.data.sequence_batches import SequenceBatches
from scaling.data.synthetic_sequences import EPOCH, SequenceTeacher, SyntheticSequencesConfig, oracle_metrics
from scaling.models.baselines.popularity import popularity_scorer, popularity_scores
from scaling.train.retrieval_eval import evaluate_retrieval

# Big enough for stable statistics (~45k events), small enough to generate in about a second.
MAIN = SyntheticSequencesConfig(num_users=1500, num_items=400, mean_length=30.0)
TINY = SyntheticSequencesConfig(num_users=300, num_items=200, mean_length=20.0, max_length=60)


@pytest.fixture(scope="module")
def main():
    log, oracle = MAIN.generate()
    return log, oracle, leave_one_out(log)


def _positions(log) -> np.ndarray:
    """int64 [N]: each event's index within its user's timeline."""
    return np.arange(log.num_interactions) - np.repeat(log.offsets[:-1], log.lengths)


def _recent_repeat(log, window: int) -> np.ndarray:
    """bool [N]: the event's item occurred among the user's previous `window` events."""
    pos = _positions(log)
    recent = np.zeros(log.num_interactions, bool)
    for lag in range(1, window + 1):
        recent[lag:] |= (log.items[lag:] == log.items[:-lag]) & (pos[lag:] >= lag)
    return recent


def _heldout_markov(log, *, shuffle: bool = False, k: int = 10):
    """First-order Markov fitted on the first half of the users (each timeline optionally shuffled),
    scored on every consecutive pair of the other half: (markov hit, popularity hit, gap) per pair,
    a hit = the next item is among the k best for the previous one. ~20k pairs, so differences
    of a percent are well outside the noise."""
    I, U = log.num_items, log.num_users
    half = int(log.offsets[U // 2])
    items = log.items.copy()
    if shuffle:
        user = np.repeat(np.arange(U), log.lengths)[:half]
        items[:half] = items[:half][np.lexsort((np.random.default_rng(0).random(half), user))]
    later = _positions(log)[1:] >= 1  # pairs inside one user's timeline
    fit = later & (np.arange(1, log.num_interactions) < half)
    held_out = later & ~fit
    counts = np.zeros((I + 1, I + 1))
    np.add.at(counts, (items[:-1][fit], items[1:][fit]), 1.0)
    pop = np.bincount(items[:half], minlength=I + 1).astype(np.float64)
    pop[0] = -1.0  # never recommend padding
    top = np.argsort(-(counts + 1e-3 * pop / pop.max()), axis=1)[:, :k]  # popularity breaks ties
    in_top = np.zeros((I + 1, I + 1), bool)
    in_top[np.arange(I + 1)[:, None], top] = True
    prev, nxt = log.items[:-1][held_out], log.items[1:][held_out]
    return in_top[prev, nxt], np.isin(nxt, np.argsort(-pop)[:k]), np.diff(log.timestamps)[held_out]


def test_same_seed_same_log_and_other_seed_differs():
    a_log, a_or = TINY.generate()
    b_log, b_or = TINY.generate()
    for f in ("offsets", "items", "timestamps", "actions"):
        np.testing.assert_array_equal(getattr(a_log, f), getattr(b_log, f))
    assert a_log.user_ids == b_log.user_ids and a_log.item_ids == b_log.item_ids
    np.testing.assert_array_equal(a_or.event_logprob, b_or.event_logprob)
    np.testing.assert_array_equal(a_or.states.query, b_or.states.query)
    c_log, _ = dataclasses.replace(TINY, seed=1).generate()
    assert c_log.user_ids != a_log.user_ids
    n = min(c_log.num_interactions, a_log.num_interactions)
    assert (c_log.items[:n] != a_log.items[:n]).mean() > 0.5


def test_log_is_a_valid_timeline_set(main):
    log, oracle, _ = main
    c = MAIN
    assert log.source == "synthetic" and log.num_users == c.num_users and log.num_items == c.num_items
    assert log.items.dtype == np.int32 and log.timestamps.dtype == np.int64
    assert log.items.min() >= 1 and log.items.max() <= c.num_items
    assert len(np.unique(log.items)) > 0.9 * c.num_items  # the whole catalogue is in use
    lengths = log.lengths
    assert lengths.min() >= c.min_length and lengths.max() <= c.max_length
    assert abs(lengths.mean() - c.mean_length) < 0.15 * c.mean_length
    assert lengths.std() > 0.3 * lengths.mean()  # lengths vary across users
    first = np.zeros(log.num_interactions, bool)
    first[log.offsets[:-1]] = True
    assert (np.diff(log.timestamps)[~first[1:]] >= 1).all()  # strictly increasing within each user
    assert log.timestamps.min() >= EPOCH and log.timestamps.max() < 2**31  # sequence batches hold int32 seconds
    assert np.isnan(log.ratings).all()
    assert log.actions is not None and log.actions.shape == log.items.shape
    assert set(np.unique(log.actions)) == {0, 1, 2}
    share = np.bincount(log.actions) / log.num_interactions
    assert share[0] > share[1] > 0.05 and share[2] > 0.05  # views most common, all three present
    # The same users and items as the world's: distinct users; items are the most popular of the pool.
    world = c.world()
    assert len(set(log.user_ids)) == c.num_users
    assert log.item_ids[1:] == tuple(str(i) for i in world.sides["item"].by_rank[: c.num_items])
    np.testing.assert_array_equal(oracle.world_users, [int(u) for u in log.user_ids])


def test_config_checks():
    with pytest.raises(ConfigError, match="min_length"):
        check_constraints(dataclasses.replace(TINY, min_length=70), "data")
    with pytest.raises(ConfigError, match="repeat_prob"):
        check_constraints(dataclasses.replace(TINY, repeat_prob=1.5), "data")
    with pytest.raises(ConfigError, match="mean_length"):
        dataclasses.replace(TINY, mean_length=100.0).generate()


def test_oracle_probabilities_are_the_ones_that_generated_the_targets(main):
    log, oracle, split = main
    users = split.eval_users[:400]
    for stage, shift in (("valid", 2), ("test", 1)):
        p = oracle.probs(users, stage)
        assert p.shape == (len(users), log.num_items + 1)
        assert (p >= 0).all() and (p[:, 0] == 0).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        rows = log.offsets[users + 1] - shift
        np.testing.assert_allclose(np.log(p[np.arange(len(users)), log.items[rows]]), oracle.event_logprob[rows],
                                   rtol=1e-4, atol=1e-5)


def test_oracle_far_above_popularity(main):
    log, oracle, split = main
    m = oracle_metrics(split, oracle, "test", ks=(10,))
    data = SequenceBatches(split, max_len=50)
    pop_all = evaluate_retrieval(data, popularity_scorer(split), "test", ks=(10,), exclude_seen=False)
    pop_excl = evaluate_retrieval(data, popularity_scorer(split), "test", ks=(10,))
    assert m["oracle_hr@10"] > 3 * pop_all["hr@10"] and m["oracle_ndcg@10"] > 3 * pop_all["ndcg@10"]
    assert m["oracle_excl_hr@10"] > 3 * pop_excl["hr@10"]
    # Seen items first is the seen-excluded protocol's ceiling: never below ranking by P_t.
    assert m["ceiling_excl_hr@10"] >= m["oracle_excl_hr@10"] and m["ceiling_excl_ndcg@10"] >= m["oracle_excl_ndcg@10"]
    # The oracle's cross-entropy beats popularity's (train frequencies, add-one smoothed).
    pop = popularity_scores(split)[1:] + 1.0
    pop_nll = -np.log(pop[split.targets("test") - 1] / pop.sum()).mean()
    assert m["oracle_nll"] < pop_nll - 1.0


def test_order_carries_signal_that_shuffling_destroys(main):
    log, _, _ = main
    markov, pop, _ = _heldout_markov(log)
    shuffled, _, _ = _heldout_markov(log, shuffle=True)
    assert markov.mean() > pop.mean() + 0.03
    assert shuffled.mean() - pop.mean() < 0.5 * (markov.mean() - pop.mean())


def test_time_since_last_event_carries_signal(main):
    """The session interest decays with elapsed time, so the previous item predicts the next one
    better when the next follows within minutes than after a break."""
    log, _, _ = main
    hit, _, gap = _heldout_markov(log)
    soon, late = gap < 1800, gap > 3600
    assert soon.sum() > 1000 and late.sum() > 1000
    assert hit[soon].mean() > 1.25 * hit[late].mean()


def test_repeat_consumption_rate(main):
    log, oracle, _ = main
    c = MAIN
    pos = _positions(log)
    later = pos >= 1  # the window is non-empty from the second event on
    assert abs(oracle.repeat[later].mean() - c.repeat_prob) < 0.015
    assert not oracle.repeat[pos == 0].any()
    recent = _recent_repeat(log, c.repeat_window)
    # The repeat branch adds repeat_prob on top of what the softmax re-picks by itself (measured
    # on the same process without the branch): observed ~ p + (1 - p) * base.
    quiet_log, quiet = dataclasses.replace(MAIN, repeat_prob=0.0).generate()
    assert not quiet.repeat.any()
    base = _recent_repeat(quiet_log, c.repeat_window)[_positions(quiet_log) >= 1].mean()
    assert abs(recent[later].mean() - (c.repeat_prob + (1 - c.repeat_prob) * base)) < 0.02
    assert base < recent[later].mean() - 0.08


def test_time_gaps_are_heavy_tailed_and_follow_actions(main):
    log, oracle, _ = main
    c = MAIN
    pos = _positions(log)
    gaps = np.diff(log.timestamps)[pos[1:] >= 1].astype(np.float64)
    new = oracle.new_session[1:][pos[1:] >= 1]
    intra, inter = gaps[~new], gaps[new]
    assert abs(np.median(intra) / c.intra_gap_median - 1) < 0.1
    assert abs(np.median(inter) / c.inter_gap_median - 1) < 0.15
    assert np.median(inter) > 300 * np.median(intra)
    # Pareto tail: the 99th percentile of breaks is tens of medians (a lognormal(1) gives ~10).
    assert np.percentile(inter, 99) > 20 * np.median(inter)
    # The action of an event shapes what follows: purchases end sessions three times as often.
    prev_action = log.actions[:-1][pos[1:] >= 1]
    long_gap = gaps > 3600
    after_buy, after_view = long_gap[prev_action == 2].mean(), long_gap[prev_action == 0].mean()
    assert after_buy > 2.0 * after_view


def test_extreme_temperature_stays_normalized():
    """A cold softmax overflows float32 without the max shift: the fallback must keep P_t exact."""
    log, oracle = SyntheticSequencesConfig(num_users=100, num_items=100, mean_length=20.0, temperature=0.02).generate()
    split = leave_one_out(log)
    p = oracle.probs(split.eval_users, "test")
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    rows = log.offsets[split.eval_users + 1] - 1
    assert np.isfinite(oracle.event_logprob).all()
    np.testing.assert_allclose(np.log(p[np.arange(len(rows)), log.items[rows]]), oracle.event_logprob[rows], atol=1e-4)


def test_two_level_sampler_draws_from_the_softmax():
    """The block-then-item inverse CDF reproduces P_soft (chi-square per degree of freedom ~ 1)."""
    config = dataclasses.replace(TINY, num_items=150)  # 3 blocks, the last one partly padding
    teacher = SequenceTeacher(config.world(), config)
    rng = np.random.default_rng(0)
    query = np.repeat(2.0 * teacher.spectrum[None] * rng.standard_normal((1, config.code_dim)), 100_000, axis=0)
    e, bsum = teacher.softmax_weights(query.astype(np.float32))
    items = teacher.sample_softmax(e, bsum, rng.random(len(query)))
    assert items.min() >= 1 and items.max() <= config.num_items
    p = e[0, : config.num_items] / bsum[0].sum()
    freq = np.bincount(items, minlength=config.num_items + 1)[1:] / len(query)
    chi2 = ((freq - p) ** 2 / p).sum() * len(query) / (config.num_items - 1)
    assert chi2 < 1.4


def test_batches_carry_the_actions(main):
    log, _, split = main
    batches = SequenceBatches(split, max_len=16, num_negatives=2)
    batch = batches.train_batch(0, 8)
    for b, user in enumerate(batches._epoch_order(0)[:8]):
        lo = max(int(log.offsets[user]), int(batches.split.train_end[user]) - 17)
        n = int(batch["lengths"][b])
        np.testing.assert_array_equal(batch["actions"][b, :n], log.actions[lo : lo + n])
        np.testing.assert_array_equal(batch["items"][b, :n], log.items[lo : lo + n])
    assert set(np.unique(batch["actions"])) <= {0, 1, 2} and batch["actions"].max() > 0
