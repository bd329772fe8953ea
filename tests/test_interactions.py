"""Interaction loaders on the real formats (Amazon Beauty, MovieLens-100K from the recbole wheel, GroupLens
files), leave-one-out splits and the retrieval metrics, against hand-computed cases."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from scaling.config_schema import ConfigError
from scaling.data.interactions import load_interactions
from scaling.data.leave_one_out import leave_one_out
from scaling.train.retrieval_metrics import coverage, novelty, ranking_metrics, target_ranks, top_k
from tests.conftest import SHARED_DATA

BEAUTY = os.path.join(SHARED_DATA, "amazon", "Beauty.txt")


@pytest.mark.skipif(not os.path.exists(BEAUTY), reason="Amazon Beauty not present at ../shared/data/amazon")
def test_amazon_beauty_counts_and_split():
    log = load_interactions(BEAUTY)
    assert (log.num_users, log.num_items, log.num_interactions) == (22_363, 12_101, 198_502)
    assert log.lengths.min() >= 5  # the 5-core version
    first = open(BEAUTY).readline().split()
    assert [log.item_ids[i] for i in log.history(0)] == first[1:]
    split = leave_one_out(log)
    assert len(split.eval_users) == log.num_users
    history, target = split.case(0, "test")
    assert log.item_ids[target] == first[-1] and [log.item_ids[i] for i in history] == first[1:-1]
    history, target = split.case(0, "valid")
    assert log.item_ids[target] == first[-2] and len(split.train_sequence(0)) == len(first) - 3


def test_movielens_formats_sorted_by_time(tmp_path):
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::300\n1::20::3::100\n2::10::4::50\n1::30::4::200\n")
    udata = tmp_path / "u.data"
    udata.write_text("1\t10\t5\t300\n1\t20\t3\t100\n2\t10\t4\t50\n1\t30\t4\t200\n")
    csv = tmp_path / "ratings.csv"  # ML-20M and later
    csv.write_text("userId,movieId,rating,timestamp\n1,10,5.0,300\n1,20,3.0,100\n2,10,4.0,50\n1,30,4.0,200\n")
    for path in (dat, udata, csv):
        log = load_interactions(str(path))
        assert log.num_users == 2 and log.num_items == 3
        assert [log.item_ids[i] for i in log.history(0)] == ["20", "30", "10"]  # time order
        assert list(log.timestamps[:3]) == [100, 200, 300] and log.ratings[0] == 3.0


def test_recbole_inter_and_malformed_files_name_the_line(tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t4\t10\nu1\ti2\t5\t5\n")
    log = load_interactions(str(inter))
    assert [log.item_ids[i] for i in log.history(0)] == ["i2", "i1"]
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t10\nu1\ti2\n")
    with pytest.raises(ConfigError, match=r"bad.inter:3: expected 3 tab-separated columns"):
        load_interactions(str(bad))
    lines = tmp_path / "seq.txt"
    lines.write_text("1 1 2 3\n2 4 x5 6\n")
    with pytest.raises(ConfigError, match=r"seq.txt:2: expected integer ids .* got 'x5'"):
        load_interactions(str(lines))
    ml = tmp_path / "ratings.dat"
    ml.write_text("1::10::5::300\n1::20::oops::100\n")
    with pytest.raises(ConfigError, match=r"ratings.dat:2: expected a numeric rating"):
        load_interactions(str(ml))
    with pytest.raises(ConfigError, match="no such file"):
        load_interactions(str(tmp_path / "missing.txt"))


def _movielens_100k(tmp_path) -> str | None:
    """ml-100k.inter out of the recbole wheel on PyPI (downloaded, not installed); None when offline."""
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "recbole==1.2.1",
                        "-d", str(tmp_path)], check=True, capture_output=True, timeout=90)
    except (subprocess.SubprocessError, OSError):
        return None
    wheels = glob.glob(str(tmp_path / "recbole-*.whl"))
    if not wheels:
        return None
    out = tmp_path / "ml-100k.inter"
    with zipfile.ZipFile(wheels[0]) as z:
        out.write_bytes(z.read("recbole/dataset_example/ml-100k/ml-100k.inter"))
    return str(out)


def test_movielens_100k_from_the_recbole_wheel(tmp_path):
    path = _movielens_100k(tmp_path)
    if path is None:
        pytest.skip("could not download the recbole wheel (offline?)")
    log = load_interactions(path)
    assert (log.num_users, log.num_items, log.num_interactions) == (943, 1682, 100_000)
    for u in (0, 500, 942):
        stamps = log.timestamps[log.offsets[u] : log.offsets[u + 1]]
        assert np.all(np.diff(stamps) >= 0)
    assert set(np.unique(log.ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_leave_one_out_hand_case(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 5 6 7 8\n2 9 5\n3 6 7 5\n")
    split = leave_one_out(load_interactions(str(path)))
    log = split.log
    ids = lambda items: [int(log.item_ids[i]) for i in np.atleast_1d(items)]  # noqa: E731
    assert list(split.eval_users) == [0, 2]  # the second user has only 2 events: train only
    assert ids(split.train_sequence(0)) == [5, 6] and ids(split.train_sequence(1)) == [9, 5]
    assert ids(split.targets("valid")) == [7, 7] and ids(split.targets("test")) == [8, 5]
    history, target = split.case(2, "test")
    assert ids(history) == [6, 7] and ids(target) == [5]


def test_ranking_metrics_by_hand():
    # catalogue of 5 items (+ padding column 0); two users
    scores = np.array([[9.0, 0.1, 0.9, 0.5, 0.7, 0.3],
                       [9.0, 0.8, 0.1, 0.6, 0.2, 0.9]])
    targets = np.array([3, 1])
    assert list(target_ranks(scores, targets)) == [3, 2]  # padding's 9.0 never counts
    # user 0 has seen item 2 (0.9) and item 3 (the target, kept): rank 2; user 1 saw item 5: rank 1
    ranks = target_ranks(scores, targets, seen=[np.array([2, 3]), np.array([5])])
    assert list(ranks) == [2, 1]
    m = ranking_metrics(ranks, ks=(1, 5))
    assert m["hr@1"] == 0.5 and m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    top = top_k(scores, 2, seen=[np.array([2]), np.array([5])])
    assert top.tolist() == [[4, 3], [1, 3]]
    assert coverage(top, 5) == pytest.approx(3 / 5)
    popularity = np.array([0, 4, 1, 2, 1, 1], dtype=float)
    assert novelty(top, popularity, num_users=4) == pytest.approx(np.mean(-np.log2([1 / 4, 2 / 4, 4 / 4, 2 / 4])))


def test_sequence_batches_by_hand(tmp_path):
    from scaling.data.sequence_batches import SequenceBatches

    path = tmp_path / "log.dat"  # user::item::rating::timestamp
    rows = [(1, i, 5, 10 * i) for i in (11, 12, 13, 14, 15, 16)] + [(2, i, 4, i) for i in (21, 22, 23)]
    path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    log = load_interactions(str(path))
    split = leave_one_out(log)
    data = SequenceBatches(split, max_len=3, num_negatives=4, seed=7)
    assert list(data.train_users) == [0]  # user 2 trains on a single event: no (input, target) pair
    batch = data.train_batch(0, batch_size=2)  # one user: the batch wraps around to it again
    raw = lambda a: [int(log.item_ids[i]) if i else 0 for i in a]  # noqa: E731
    # user 1's training events are 11..14 (15 = valid, 16 = test); the most recent 3 + 1 are 11..14
    assert raw(batch["items"][0]) == [11, 12, 13] and raw(batch["targets"][0]) == [12, 13, 14]
    assert list(batch["timestamps"][0]) == [110, 120, 130] and list(batch["next_timestamps"][0]) == [120, 130, 140]
    assert list(batch["lengths"]) == [3, 3] and batch["negatives"].shape == (2, 3, 4)
    assert batch["negatives"].min() >= 1 and batch["negatives"].max() <= log.num_items
    again = data.train_batch(0, batch_size=2)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)  # batch j is a function of j
    it = data.train_iterator(2, prefetch=0)
    next(it), next(it)
    state = it.get_state()
    third = next(it)
    it.set_state(state)
    assert np.array_equal(next(it)["negatives"], third["negatives"])

    ev, seen = data.eval_batch(split.eval_users, "test")
    assert raw(ev["items"][0]) == [13, 14, 15] and raw(ev["target"]) == [16, 23]
    assert raw(seen[0]) == [11, 12, 13, 14, 15] and list(ev["lengths"]) == [3, 2]
    assert list(ev["target_timestamp"]) == [160, 23]
    assert list(ev["next_timestamps"][0]) == [140, 150, 160] and list(ev["next_timestamps"][1][:2]) == [22, 23]
    ev, _ = data.eval_batch(split.eval_users, "valid")
    assert raw(ev["target"]) == [15, 22] and raw(ev["items"][1]) == [21, 0, 0]

    shared = SequenceBatches(split, max_len=3, num_negatives=4, seed=7, shared_negatives=True).train_batch(0, 2)
    assert shared["negatives"].shape == (2, 1, 4)  # one draw per sequence, used at every position
    in_batch = SequenceBatches(split, max_len=3, num_negatives=50, seed=7, negatives="in_batch").train_batch(0, 2)
    assert set(in_batch["negatives"].ravel()) <= set(batch["targets"].ravel()) - {0}  # the batch's own targets


def test_popularity_through_the_shared_evaluation(tmp_path):
    from scaling.data.sequence_batches import SequenceBatches
    from scaling.models.baselines.popularity import popularity_scorer, popularity_scores
    from scaling.train.retrieval_eval import evaluate_retrieval

    path = tmp_path / "seq.txt"
    path.write_text("1 1 2 3 4\n2 1 2 4 3\n3 2 1 5 2\n")
    split = leave_one_out(load_interactions(str(path)))
    log = split.log
    pop = popularity_scores(split)
    # training prefixes: [1, 2], [1, 2], [2, 1] -> items '1' and '2' twice... three times each
    assert pop[log.item_ids.index("1")] == 3 and pop[log.item_ids.index("2")] == 3 and pop.sum() == 6
    m = evaluate_retrieval(SequenceBatches(split, max_len=4), popularity_scorer(split), "test", ks=(1, 5))
    # every user has seen both popular items; the rest tie at 0, so each target ranks first among the rest
    assert m["hr@1"] == 1.0 and m["mrr"] == 1.0 and m["users"] == 3
