"""Criteo and Avazu loaders: parsing, vocabulary, hashing, bad rows, caches, grain order, a real run."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from scaling.config import DataConfig, load_run_config
from scaling.config_schema import ConfigError, build
from scaling.data import kaggle_ctr
from scaling.data.avazu import AvazuConfig
from scaling.data.criteo import CriteoConfig, CriteoFormat
from scaling.data.registry import data_config_classes
from tests.conftest import ROOT, run_cli

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "criteo").is_dir() or not (SHARED / "avazu").is_dir(),
                                  reason="../shared/data (the real Criteo/Avazu samples) is absent")

INTS = [1, 0, 5, None, -1, 100, 3, None, 0, 2, 7, None, 4]


def criteo_row(label, c1: str = "aa", c2: str = "x1", ints=INTS) -> str:
    """One Criteo line: label, 13 integers (None = empty), C1, C2 as given, C3..C26 fixed or empty."""
    cats = [c1, c2] + [f"{i:08x}" if i % 3 else "" for i in range(3, 27)]
    return "\t".join([str(label), *("" if x is None else str(x) for x in ints), *cats])


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def criteo_dir(tmp_path) -> Path:
    """train: C1 = 'aa' x4, 'bb' x1, '' x1 (labels alternate); valid/test: seen, unseen and empty values."""
    d = tmp_path / "criteo"
    d.mkdir()
    c1 = ["aa", "aa", "bb", "aa", "", "aa"]
    write(d / "train.txt", [criteo_row(i % 2, c) for i, c in enumerate(c1)])
    write(d / "valid.txt", [criteo_row(0, "aa"), criteo_row(1, "zz"), criteo_row(1, "")])
    write(d / "test.txt", [criteo_row(1, "bb"), criteo_row(0, "aa")])
    return d


def criteo(path, tmp_path, **knobs) -> CriteoConfig:
    return build(DataConfig, {"name": "criteo", "path": str(path), "cache_dir": str(tmp_path / "cache"), **knobs})


# -- formats ----------------------------------------------------------------------------------------


def test_registered_configs():
    classes = data_config_classes()
    assert classes["criteo"] is CriteoConfig and classes["avazu"] is AvazuConfig


def test_criteo_log_transform_negatives_and_missing():
    label, dense, values = CriteoFormat(missing_indicators=True).parse(criteo_row(1, "aa", ""))
    assert label == 1.0 and len(dense) == 26 and len(values) == 26
    expected = [math.log1p(x) if x and x > 0 else 0.0 for x in INTS]  # DLRM: log(1 + max(x, 0)), empty -> 0
    np.testing.assert_allclose(dense[:13], expected)
    assert dense[1] == 0.0 and dense[4] == 0.0  # 0 and -1 both map to 0
    assert dense[13:] == [1.0 if x is None else 0.0 for x in INTS]  # the missing-ness columns
    assert values[:2] == ["aa", ""]


def test_criteo_ids_min_count_oov_and_empty(criteo_dir, tmp_path):
    data = criteo(criteo_dir, tmp_path, min_count=2).build()
    # C1: 'aa' (4 times) kept as id 2; 'bb' (once) below min_count -> OOV 0; '' -> 1
    assert data.spec.cardinalities[0] == 3
    assert list(data.train["sparse"][:, 0]) == [2, 2, 0, 2, 1, 2]
    assert list(data.valid["sparse"][:, 0]) == [2, 0, 1]  # 'zz' never seen in train -> OOV
    assert list(data.test["sparse"][:, 0]) == [0, 2]
    np.testing.assert_allclose(data.train["dense"][0], [math.log1p(max(x or 0, 0)) for x in INTS], rtol=1e-6)
    # min_count=1 keeps every train value; ties in count are ordered by value
    data = criteo(criteo_dir, tmp_path, min_count=1).build()
    assert data.spec.cardinalities[0] == 4 and list(data.test["sparse"][:, 0]) == [3, 2]
    ref = data.reference_metrics()
    assert (ref["train_rows_read"], ref["valid_rows_read"], ref["test_rows_read"]) == (6, 3, 2)
    assert ref["vocab_C1"] == 4 and ref["vocab_total"] == sum(data.spec.cardinalities)


def test_hashing_mode(criteo_dir, tmp_path):
    config = criteo(criteo_dir, tmp_path, hashing=True, hash_buckets=97)
    assert config.feature_spec().cardinalities == (97,) * 26  # no pass over the data needed
    data = config.build()
    sparse = np.concatenate([data.train["sparse"], data.valid["sparse"], data.test["sparse"]])
    assert sparse.min() >= 1 and sparse.max() < 97
    c1 = data.train["sparse"][:, 0]
    assert c1[0] == c1[1] == c1[3] >= 2 and c1[4] == 1  # same value, same bucket; empty -> 1
    assert data.valid["sparse"][1, 0] >= 2  # an unseen value still hashes to a bucket (no OOV)
    again = criteo(criteo_dir, tmp_path / "other", hashing=True, hash_buckets=97).build()
    np.testing.assert_array_equal(again.train["sparse"], data.train["sparse"])  # stable across caches


# -- bad rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, expected", [
    ("\t".join(criteo_row(0).split("\t")[:25]), "expected 40 tab-separated fields"),
    (criteo_row(0, ints=[1, "x7"] + INTS[2:]), "expected an integer or nothing in I2"),
    (criteo_row(2), "expected the label 0 or 1"),
])
def test_malformed_row_names_file_and_line(criteo_dir, tmp_path, bad, expected):
    rows = (criteo_dir / "train.txt").read_text().splitlines()
    write(criteo_dir / "train.txt", rows[:2] + [bad] + rows[2:])
    with pytest.raises(ConfigError) as err:
        criteo(criteo_dir, tmp_path).build()
    message = str(err.value)
    assert f"{criteo_dir / 'train.txt'}:3: {expected}" in message and "\n" not in message


def test_skip_mode_counts_rejected_rows(criteo_dir, tmp_path):
    rows = (criteo_dir / "train.txt").read_text().splitlines()
    write(criteo_dir / "train.txt", rows + [criteo_row(5), criteo_row(1)[:60]])
    write(criteo_dir / "test.txt", (criteo_dir / "test.txt").read_text().splitlines() + ["garbage"])
    data = criteo(criteo_dir, tmp_path, on_bad_row="skip").build()
    ref = data.reference_metrics()
    assert (ref["train_rows_read"], ref["train_rows_rejected"], ref["train_rows"]) == (8, 2, 6)
    assert (ref["test_rows_read"], ref["test_rows_rejected"], ref["valid_rows_rejected"]) == (3, 1, 0)
    assert len(data.train["label"]) == 6 and len(data.test["label"]) == 2
    assert data.meta["splits"]["train"]["first_rejected"].startswith(f"{criteo_dir / 'train.txt'}:7: ")


def test_cli_exits_2_with_one_line(criteo_dir, tmp_path):
    write(criteo_dir / "valid.txt", [criteo_row(0), criteo_row(1, ints=["1.5"] + INTS[1:])])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: dcnv2, size: xs}}\ndata: {{name: criteo, path: {criteo_dir}, "
                      f"cache_dir: {tmp_path / 'cache'}}}\ntrain: {{output_dir: {tmp_path / 'runs'}}}\n")
    result = run_cli("train", str(config), "--no-progress", "--wandb", "disabled")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {criteo_dir / 'valid.txt'}:2: expected an integer or nothing in I1 (field 2), got '1.5' "
                     f"(data.on_bad_row=skip counts and skips such rows)"]
    assert not (tmp_path / "runs").exists()


def test_file_errors(criteo_dir, tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        criteo(tmp_path / "nowhere", tmp_path)
    os.remove(criteo_dir / "valid.txt")
    with pytest.raises(ConfigError, match="found a test file .* but no valid file"):
        criteo(criteo_dir, tmp_path)
    with pytest.raises(ConfigError, match="data.path: expected a directory"):
        build(DataConfig, {"name": "criteo"}, "data")


# -- caches -----------------------------------------------------------------------------------------


def test_vocabulary_cache_reuse_and_invalidation(criteo_dir, tmp_path, monkeypatch):
    passes = []
    count_values = kaggle_ctr._count_values
    monkeypatch.setattr(kaggle_ctr, "_count_values", lambda *a: passes.append(1) or count_values(*a))
    first = criteo(criteo_dir, tmp_path, min_count=1).build()
    assert len(passes) == 1
    again = criteo(criteo_dir, tmp_path, min_count=1).build()  # vocabulary and arrays from the cache
    assert len(passes) == 1 and again.meta["directory"] == first.meta["directory"]
    criteo(criteo_dir, tmp_path, min_count=1, missing_indicators=True).build()  # new arrays, same vocabulary
    assert len(passes) == 1
    criteo(criteo_dir, tmp_path, min_count=2).build()  # another threshold: another vocabulary
    assert len(passes) == 2
    # the train file changes (size and mtime): the vocabulary is rebuilt, the new value counts
    rows = (criteo_dir / "train.txt").read_text().splitlines()
    write(criteo_dir / "train.txt", rows + [criteo_row(1, "cc")])
    changed = criteo(criteo_dir, tmp_path, min_count=1).build()
    assert len(passes) == 3 and changed.spec.cardinalities[0] == first.spec.cardinalities[0] + 1
    assert changed.meta["directory"] != first.meta["directory"]


def test_single_file_hashed_split(tmp_path):
    rows = [criteo_row(i % 2, f"v{i % 7}") for i in range(400)]
    path = write(tmp_path / "day_0.txt", rows)
    data = criteo(path, tmp_path, min_count=1, valid_fraction=0.2, test_fraction=0.1).build()
    ref = data.reference_metrics()
    n = {s: int(ref[f"{s}_rows"]) for s in ("train", "valid", "test")}
    assert sum(n.values()) == 400 and 50 < n["valid"] < 110 and 20 < n["test"] < 65
    assign = kaggle_ctr.hashed_split(np.arange(1, 401), 0.2, 0.1)
    assert n == {"train": int((assign == 0).sum()), "valid": int((assign == 1).sum()), "test": int((assign == 2).sum())}
    # the train split holds exactly the lines hashed to it, in file order
    labels = np.array([i % 2 for i in range(400)], np.float32)
    np.testing.assert_array_equal(data.train["label"], labels[assign == 0])
    np.testing.assert_array_equal(data.test["label"], labels[assign == 2])


def test_default_cache_avoids_read_only_data(tmp_path, monkeypatch, criteo_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = build(DataConfig, {"name": "criteo", "path": str(criteo_dir)})
    assert config.cache_root() == str(criteo_dir / ".scaling_cache")  # beside writable data
    os.chmod(criteo_dir, 0o555)  # marked read-only: even root must leave it alone
    try:
        assert config.cache_root() == str(tmp_path / "xdg" / "scaling" / "kaggle_ctr")
    finally:
        os.chmod(criteo_dir, 0o755)


# -- the grain pipeline -----------------------------------------------------------------------------


def test_deterministic_order_epochs_and_resume(tmp_path):
    path = write(tmp_path / "train.txt", [criteo_row(i % 2, f"v{i}", ints=[i] + INTS[1:]) for i in range(50)])
    data = criteo(path, tmp_path, min_count=1, valid_fraction=0.2, test_fraction=0.2).build()
    n = data.num_train
    ident = np.round(np.expm1(data.train["dense"][:, 0])).astype(int)  # I1 = the line index: a row's identity

    def rows_of(batch):
        return sorted(np.round(np.expm1(batch["dense"][:, 0])).astype(int))

    # each epoch visits every train row once, in a new order per epoch and per seed
    epoch0, epoch1 = (np.sort(data.train_rows(j, n, seed=3)) for j in (0, 1))
    np.testing.assert_array_equal(epoch0, np.arange(n))
    np.testing.assert_array_equal(epoch1, np.arange(n))
    assert not np.array_equal(data.train_rows(0, n, seed=3), data.train_rows(1, n, seed=3))
    assert not np.array_equal(data.train_rows(0, n, seed=3), data.train_rows(0, n, seed=4))
    # the iterator: same seed, same batches; its state resumes exactly
    it = data.train_iterator(8, seed=3)
    batches = [next(it) for _ in range(12)]  # crosses epoch boundaries (n < 96)
    state = None
    other = data.train_iterator(8, seed=3, prefetch=0)
    for j in range(12):
        b = next(other)
        assert rows_of(b) == rows_of(batches[j]) == sorted(ident[data.train_rows(j, 8, seed=3)])
        if j == 4:
            state = other.get_state()
    resumed = data.train_iterator(8, seed=3)
    resumed.set_state(state)
    for j in range(5, 12):
        b = next(resumed)
        for key in b:
            np.testing.assert_array_equal(b[key], batches[j][key], err_msg=key)


# -- Avazu ------------------------------------------------------------------------------------------

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def avazu_row(i: int, click: int, hour: str = "14102113", site: str = "s1") -> str:
    return ",".join([str(10**18 + i), str(click), hour, "1005", "0", site] + [f"v{k}" for k in range(18)])


def test_avazu_header_hour_fields_and_errors(tmp_path):
    d = tmp_path / "avazu"
    d.mkdir()
    write(d / "train.csv", [AVAZU_HEADER] + [avazu_row(i, i % 2, h) for i, h in
                                             enumerate(["14102113", "14102113", "14102500", "14102623"])])
    write(d / "valid.csv", [avazu_row(9, 1, "14102113", site="")])
    write(d / "test.csv", [avazu_row(10, 0, "14102500")])
    config = build(DataConfig, {"name": "avazu", "path": str(d), "cache_dir": str(tmp_path / "cache"), "min_count": 1})
    data = config.build()
    assert data.spec.num_sparse == 23 and data.spec.num_dense == 0 and data.train["dense"].shape == (4, 0)
    ref = data.reference_metrics()
    assert ref["train_rows_read"] == 4  # the header is not a row
    # hour 13 (x2), 00, 23; weekdays: 2014-10-21 Tuesday (1) x2, 10-25 Saturday (5), 10-26 Sunday (6)
    assert list(data.train["sparse"][:, 0]) == [2, 2, 3, 4] and list(data.train["sparse"][:, 1]) == [2, 2, 3, 4]
    assert ref["vocab_hour_of_day"] == 5 and ref["vocab_weekday"] == 5
    assert data.valid["sparse"][0, 4] == 1  # empty site_id (field 5: hour_of_day, weekday, C1, banner_pos, site_id)
    assert list(data.train["label"]) == [0, 1, 0, 1]
    write(d / "test.csv", [avazu_row(11, 0, "14103299")])
    with pytest.raises(ConfigError, match=r"test.csv:1: expected hour as YYMMDDHH with a valid date"):
        config.build()
    write(d / "test.csv", [AVAZU_HEADER.replace("click,", "")])
    with pytest.raises(ConfigError, match=r"test.csv:1: expected the header .* has no labels"):
        config.build()


# -- the real samples (../shared/data) --------------------------------------------------------------


@needs_shared
def test_real_criteo_and_avazu_samples(tmp_path):
    counts = {"criteo": (7200, 409, 391), "avazu": (8087, 480, 432)}
    for name, (train, valid, test) in counts.items():
        config = build(DataConfig, {"name": name, "path": str(SHARED / name), "cache_dir": str(tmp_path)})
        data = config.build()
        ref = data.reference_metrics()
        assert (ref["train_rows_read"], ref["valid_rows_read"], ref["test_rows_read"]) == (train, valid, test)
        assert ref["train_rows_rejected"] == ref["valid_rows_rejected"] == ref["test_rows_rejected"] == 0
        assert 0.1 < ref["train_click_rate"] < 0.3
        assert config.feature_spec() == data.spec
        assert data.spec.num_sparse == {"criteo": 26, "avazu": 23}[name]
        for split in (data.train, data.valid, data.test):
            assert (split["sparse"] < np.array(data.spec.cardinalities)).all() and (split["sparse"] >= 0).all()
    dense = build(DataConfig, {"name": "criteo", "path": str(SHARED / "criteo"), "cache_dir": str(tmp_path)}).build().train["dense"]
    assert np.isfinite(dense).all() and dense.min() == 0.0


@needs_shared
def test_real_criteo_with_a_truncated_row(tmp_path):
    """A download cut off mid-row: the real test file plus a real row truncated after 100 characters."""
    d = tmp_path / "criteo"
    shutil.copytree(SHARED / "criteo", d)
    os.chmod(d, 0o755)
    rows = (SHARED / "criteo" / "test.txt").read_text().splitlines()
    (d / "test.txt").chmod(0o644)
    write(d / "test.txt", rows + [rows[0][:100]])
    with pytest.raises(ConfigError, match=rf"{d / 'test.txt'}:{len(rows) + 1}: expected 40 tab-separated fields"):
        criteo(d, tmp_path).build()
    ref = criteo(d, tmp_path, on_bad_row="skip").build().reference_metrics()
    assert (ref["test_rows_read"], ref["test_rows_rejected"], ref["test_rows"]) == (len(rows) + 1, 1, len(rows))


@needs_shared
def test_real_criteo_training_run(tmp_path):
    """`sweeps/criteo.yaml` through the loop, shortened: valid/test metrics, data counts in the record."""
    from scaling.train.loop import run_directory as train_dir
    from scaling.train.loop import train

    config = load_run_config(os.path.join(ROOT, "sweeps", "criteo.yaml"), [
        f"data.path={SHARED / 'criteo'}", f"data.cache_dir={tmp_path / 'cache'}", "model.size=xs",
        f"train.output_dir={tmp_path / 'runs'}", "train.steps=40", "train.batch_size=64", "train.eval_every=20",
        "train.checkpoint_every=20", "train.log_every=10", "logging.progress=false", "logging.wandb.mode=disabled",
    ])
    record = train(config)
    assert record.status == "ok", record.reason
    ev = record.final_eval
    for key in ("valid_logloss", "valid_auc", "valid_ne", "test_logloss", "test_auc", "test_ne"):
        assert math.isfinite(ev[key]), key
    assert ev["logloss"] == ev["test_logloss"] and ev["auc"] == ev["test_auc"]
    assert 0.5 < ev["test_auc"] < 1.0 and ev["test_logloss"] < 0.7
    ref = record.data_reference
    assert (ref["train_rows_read"], ref["test_rows_rejected"]) == (7200, 0) and ref["vocab_total"] > 26 * 2
    # the valid file picks the best evaluation
    evals = [json.loads(line) for line in open(os.path.join(train_dir(config), "metrics.jsonl"))]
    evals = {r["step"]: r["eval/valid_logloss"] for r in evals if r["split"] == "eval"}
    assert sorted(evals) == [20, 40] and record.best_eval_step == min(evals, key=evals.get)
