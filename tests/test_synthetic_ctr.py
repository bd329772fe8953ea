"""The synthetic CTR world: determinism, random access, held-out set, statistics, grain state, config."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from scaling.config import DataConfig
from scaling.config_schema import ConfigError, build
from scaling.data.registry import data_config_classes
from scaling.data.spec import CTRFeatureSpec
from scaling.data.synthetic_ctr import EVAL_STREAM, SyntheticCTR, SyntheticCTRConfig
from scaling.data.world import CounterRNG

SMALL = {
    "name": "synthetic_ctr",
    "num_fields": 8,
    "num_dense": 4,
    "min_cardinality": 3,
    "max_cardinality": 300,
    "eval_examples": 3000,
    "num_ridges": 16,
}


def make(**overrides) -> SyntheticCTR:
    return build(DataConfig, {**SMALL, **overrides}).build()


@pytest.fixture(scope="module")
def small() -> SyntheticCTR:
    return make()


@pytest.fixture(scope="module")
def default() -> SyntheticCTR:
    return build(DataConfig, {"name": "synthetic_ctr"}).build()


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- config -------------------------------------------------------------------------------------


def test_registered_config_and_spec():
    assert data_config_classes()["synthetic_ctr"] is SyntheticCTRConfig
    config = build(DataConfig, {"name": "synthetic_ctr"})
    assert isinstance(config, SyntheticCTRConfig)
    assert (config.num_fields, config.num_dense) == (26, 13)
    spec = config.feature_spec()
    assert isinstance(spec, CTRFeatureSpec)
    cards = np.array(spec.cardinalities)
    assert spec.num_fields == 26 and spec.num_dense == 13
    assert cards[0] == config.min_cardinality and cards[-1] == config.max_cardinality
    ratios = cards[1:] / cards[:-1]
    assert np.all(ratios >= 1) and np.ptp(np.log(ratios)) < 0.5  # log-spaced
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"min_cardinality": 50, "max_cardinality": 10}, "min_cardinality"),
        ({"num_ridges": 1000}, "num_ridges"),
        ({"base_rate": 0.9}, "base_rate"),
        ({"zipf_exponent": -1}, "zipf_exponent"),
        ({"num_fields": 0}, "num_fields"),
        ({"eval_examples": "many"}, "eval_examples"),
        ({"zipf_exponet": 1.0}, "zipf_exponet"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        build(DataConfig, {"name": "synthetic_ctr", **data}, "data")
    assert err.value.path == f"data.{key}"
    assert f"data.{key}" in str(err.value)


def test_config_typo_suggests_the_key():
    with pytest.raises(ConfigError, match="did you mean 'zipf_exponent'"):
        build(DataConfig, {"name": "synthetic_ctr", "zipf_exponet": 1.0}, "data")


# -- determinism and random access ----------------------------------------------------------------


def test_same_seed_same_arrays_different_seed_differs(small):
    again = make()
    assert_batches_equal(small.batch(3, 256), again.batch(3, 256))
    assert_batches_equal(small.eval_arrays(), again.eval_arrays())
    other = make(seed=1)
    b0, b1 = small.batch(3, 256), other.batch(3, 256)
    assert not np.array_equal(b0["sparse"], b1["sparse"])
    assert not np.array_equal(b0["dense"], b1["dense"])
    assert not np.array_equal(small.eval_arrays()["prob"], other.eval_arrays()["prob"])


def test_batch_is_a_function_of_example_indices(small):
    B = 96
    whole = small.examples(np.arange(0, 4 * B))
    for j in range(4):
        part = small.batch(j, B)
        for key in part:
            np.testing.assert_array_equal(part[key], whole[key][j * B : (j + 1) * B])
    # Any order, any grouping: examples 130..150 on their own, backwards, and within a bigger batch.
    idx = np.arange(130, 150)
    alone = small.examples(idx)
    backwards = small.examples(idx[::-1])
    for key in alone:
        np.testing.assert_array_equal(alone[key], backwards[key][::-1])
        np.testing.assert_array_equal(alone[key], whole[key][130:150])


def test_examples_do_not_depend_on_request_size(small):
    # Bit-identical whatever else is generated in the same call (BLAS kernels vary with shape).
    full = small.examples(np.arange(3000), with_prob=True)
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 7, 33, 100, 777):
        idx = np.sort(rng.choice(3000, size, replace=False))
        part = small.examples(idx, with_prob=True)
        for key in part:
            np.testing.assert_array_equal(part[key], full[key][idx], err_msg=f"{key} at size {size}")


def test_chunked_generation_matches(small):
    # Longer requests are generated in chunks; chunk boundaries must not show.
    n = 40_000
    whole = small.examples(np.arange(n))
    tail = small.examples(np.arange(n - 100, n))
    for key in whole:
        np.testing.assert_array_equal(whole[key][-100:], tail[key])


def test_iterator_batches_equal_direct_generation(small):
    B = 128
    it = small.train_iterator(B, prefetch=3, num_threads=2)
    try:
        for j in range(5):
            assert_batches_equal(next(it), small.examples(np.arange(j * B, (j + 1) * B)))
    finally:
        it.close()


def test_iterator_state_save_restore_resumes_exactly(small):
    B = 64
    it = small.train_iterator(B, prefetch=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # checkpointable as plain data
    expected = [next(it) for _ in range(4)]
    it.close()
    for prefetch in (0, 4):
        resumed = small.train_iterator(B, prefetch=prefetch)
        resumed.set_state(state)
        try:
            for want in expected:
                assert_batches_equal(next(resumed), want)
        finally:
            resumed.close()
    # Restoring on the same iterator rewinds it.
    it = small.train_iterator(B, prefetch=2)
    first = [next(it) for _ in range(2)]
    it.set_state({"next_index": 0})
    assert_batches_equal(next(it), first[0])
    it.close()


def test_batch_layout_and_ids_in_range(small):
    b = small.batch(0, 512)
    F, D = small.spec.num_fields, small.spec.num_dense
    assert b["sparse"].shape == (512, F) and b["sparse"].dtype == np.int32
    assert b["dense"].shape == (512, D) and b["dense"].dtype == np.float32
    assert b["label"].shape == (512,) and b["label"].dtype == np.float32
    assert set(np.unique(b["label"])) <= {0.0, 1.0}
    ev = small.eval_arrays()
    cards = np.array(small.spec.cardinalities)
    for sparse in (b["sparse"], ev["sparse"]):
        assert sparse.min() >= 0
        assert np.all(sparse.max(0) < cards)
    assert np.all(np.isfinite(ev["dense"]))
    assert np.all((ev["prob"] > 0) & (ev["prob"] < 1))


# -- the held-out set ---------------------------------------------------------------------------------


def test_eval_set_is_disjoint_from_train_and_fixed(small):
    ev = small.eval_arrays()
    n = small.config.eval_examples
    assert len(ev["label"]) == n and set(ev) == {"sparse", "dense", "label", "prob"}
    train = small.examples(np.arange(20_000))
    assert not np.array_equal(ev["dense"], train["dense"][:n])
    train_rows = {row.tobytes() for row in np.concatenate([train["sparse"].view(np.float32), train["dense"]], 1)}
    eval_rows = [row.tobytes() for row in np.concatenate([ev["sparse"].view(np.float32), ev["dense"]], 1)]
    assert not any(row in train_rows for row in eval_rows)
    # Independent of the train batch size and of what was generated before.
    small.batch(5, 1000)
    fresh = make()
    fresh.batch(0, 7)
    assert_batches_equal(fresh.eval_arrays(), ev)
    # The eval set is examples 0..n-1 of its own stream.
    direct = small.examples(np.arange(10), stream=EVAL_STREAM, with_prob=True)
    for key in direct:
        np.testing.assert_array_equal(direct[key], ev[key][:10])
    with pytest.raises(ValueError):
        ev["label"][0] = 1.0  # read-only


# -- statistics of the world --------------------------------------------------------------------------


def test_zipf_skew(default):
    sparse = default.eval_arrays()["sparse"]
    cards = default.spec.cardinalities
    for f, factor in ((len(cards) - 1, 50.0), (len(cards) // 2, 5.0)):
        freq = np.bincount(sparse[:, f], minlength=cards[f]) / len(sparse)
        assert freq.max() > factor / cards[f], f  # the top id is far above a uniform share
        top = np.sort(freq)[::-1]
        assert top[:10].sum() > 10 * top[-10:].sum()


def test_dense_features_are_standardized(default):
    dense = default.examples(np.arange(100_000))["dense"]
    np.testing.assert_allclose(dense.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(dense.std(0), 1.0, atol=0.05)


def test_fields_of_one_side_co_vary(default):
    # Fields 0 and 3 both belong to the user side: their values depend on the user's segment.
    sparse = default.eval_arrays()["sparse"]
    a, b = sparse[:, 0], sparse[:, 3]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    mask = expected > 5
    chi2 = ((table - expected) ** 2 / np.where(mask, expected, 1))[mask].sum()
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    assert chi2 > 10 * dof


def test_base_rate_and_bayes_headroom(default):
    ref = default.reference_metrics()
    assert 0.05 <= ref["base_rate"] <= 0.2
    assert ref["constant_logloss"] == pytest.approx(
        -(ref["base_rate"] * np.log(ref["base_rate"]) + (1 - ref["base_rate"]) * np.log(1 - ref["base_rate"]))
    )
    assert ref["bayes_logloss"] < ref["constant_logloss"] - 0.1
    assert ref["bayes_ne"] == pytest.approx(ref["bayes_logloss"] / ref["constant_logloss"])
    assert ref["bayes_ne"] < 0.8
    assert abs(ref["bayes_logloss"] - ref["bayes_entropy"]) < 0.01


def test_labels_consistent_with_prob(default):
    ev = default.eval_arrays()
    y, p = ev["label"].astype(np.float64), ev["prob"].astype(np.float64)
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * se
    # Calibrated in every decile of prob, not only on average.
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for k in range(10):
        sel = bins == k
        se_k = np.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()
        assert abs(y[sel].mean() - p[sel].mean()) < 4 * se_k + 1e-3
    # And prob is the teacher's probability of these very features.
    teacher = default.teacher
    recomputed = teacher.prob(teacher.logit(ev["sparse"][:500], ev["dense"][:500]))
    np.testing.assert_array_equal(recomputed, p[:500])


def test_deep_term_carries_the_headroom(default):
    # Without its deep (ridge) term the teacher's own prediction is far from Bayes: the headroom
    # a bigger model can win lies in the interaction structure, not in per-id memorization.
    teacher = default.teacher
    ev = default.eval_arrays()
    terms = teacher.terms(ev["sparse"], ev["dense"]).astype(np.float64)
    y = ev["label"].astype(np.float64)

    def logloss(logit):
        p = np.clip(teacher.prob(logit), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())

    shallow = terms[:, :2] @ teacher.scales[:2].astype(np.float64)
    best_shallow = min(logloss(shallow + b) for b in np.linspace(-4.0, 0.0, 81))
    assert best_shallow > default.reference_metrics()["bayes_logloss"] + 0.1


def test_teacher_spectrum_is_a_power_law(default):
    teacher = default.teacher
    K = len(teacher.ridge_weight)
    tails = np.array([teacher.spectrum_tail(n) for n in range(K + 1)])
    assert tails[0] == pytest.approx(1.0) and tails[-1] == 0.0
    assert np.all(np.diff(tails) < 0)
    beta = teacher.spectrum_exponent
    np.testing.assert_allclose(np.abs(teacher.ridge_weight), np.arange(1, K + 1) ** -beta)
    # Ridge inputs are standardized and nearly uncorrelated (orthonormal in the whitened space).
    ev = default.eval_arrays()
    t = teacher.ridge_inputs(ev["sparse"][:20_000], ev["dense"][:20_000])
    np.testing.assert_allclose(t.std(0), 1.0, atol=0.05)
    corr = np.corrcoef(t, rowvar=False)
    assert np.abs(corr - np.eye(K)).max() < 0.1
    ref = default.reference_metrics()
    assert ref["implied_exponent"] == pytest.approx(2 * beta - 1)


def test_counter_rng_is_stateless_and_uniform():
    rng = CounterRNG(7, 0)
    idx = np.arange(50_000)
    u = rng.uniform(idx, 3, 2)
    np.testing.assert_array_equal(u[1000:1010], rng.uniform(idx[1000:1010], 3, 2))
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02
    z = rng.normal(idx, 10, 3)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(z.std(0), 1.0, atol=0.02)
    assert not np.array_equal(u, CounterRNG(7, 1).uniform(idx, 3, 2))
    with pytest.raises(ValueError):
        rng.bits(idx, 255, 2)


def test_no_dense_and_one_field_build():
    ds = make(num_fields=1, num_dense=0, num_ridges=2, eval_examples=100)
    b = ds.batch(0, 32)
    assert b["sparse"].shape == (32, 1) and b["dense"].shape == (32, 0)
    assert 0.0 < ds.reference_metrics()["base_rate"] < 0.5
