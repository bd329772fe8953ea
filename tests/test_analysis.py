"""The analysis pipeline on run directories with a known law: selection, seeds, fits, report, plots, W&B."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

from analysis.records import load_local, scale_points
from analysis.scaling_fit import fit_sweep
from tests.conftest import run_cli

# Truth: test logloss = E + A x^-alpha at the best lr; other lrs are worse by a known amount.
E, A, ALPHA = 0.20, 0.004, 0.30
SIZES = {"xxs": 2e-5, "xs": 5e-5, "s": 1.2e-4, "m": 3e-4, "l": 8e-4, "xl": 2e-3}
LRS = (1e-3, 3e-3, 1e-2)


def law(x):
    return E + A * x ** (-ALPHA)


def _record(run_id, family, size, seed, lr, logloss, *, status="ok", gflops=None):
    x = SIZES[size] if gflops is None else gflops
    return {
        "run_id": run_id, "name": "fake", "family": family, "size": size, "seed": seed, "status": status,
        "reason": "" if status == "ok" else "loss became NaN/inf at step 3",
        "config": {"name": "fake", "seed": seed, "model": {"name": family, "size": size},
                   "optimizer": {"dense": {"learning_rate": lr}}, "logging": {"progress": False}},
        "params_dense": int(1e9 * x), "params_embedding": 1000, "flops_per_example_analytic": x * 1e9,
        "flops_per_example_xla": None, "embedding_bytes_per_example": 64.0, "examples_seen": 1000, "steps": 10,
        "train_flops": 3 * x * 1e9 * 1000,
        "final_eval": {"logloss": logloss, "valid_logloss": logloss + 0.0005, "test_logloss": logloss},
        "best_eval": {}, "best_eval_step": 10, "data_reference": {"test_bayes_logloss": 0.19},
        "wall_time_s": 1.0, "examples_per_s": 1.0, "memory": {}, "device": {}, "versions": {},
    }


def make_sweep_dir(root, *, noise=0.0005, seed=0, best_lr_edge_at=None, family="wukong", with_failed=True):
    rng = np.random.default_rng(seed)
    records = []
    for size, x in SIZES.items():
        best = 1 if size != best_lr_edge_at else 2
        seeds = (0, 1, 2) if size in ("xxs", "xl") else (0,)
        for j, lr in enumerate(LRS):
            for s in seeds:
                penalty = 0.002 * abs(j - best)
                value = law(x) + penalty + rng.normal(0, noise)
                records.append(_record(f"{family}-{size}-{j}{s}", family, size, s, lr, value))
    if with_failed:
        records.append(_record(f"{family}-xl-nan", family, "xl", 9, 1.0, float("nan"), status="diverged"))
    for r in records:
        os.makedirs(os.path.join(root, r["run_id"]), exist_ok=True)
        with open(os.path.join(root, r["run_id"], "result.json"), "w") as f:
            json.dump(r, f)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"name": "fake", "tune": ["optimizer.dense.learning_rate"], "trials": []}, f)
    return records


def test_selection_seeds_and_dropped_runs(tmp_path):
    make_sweep_dir(tmp_path, noise=0.0, best_lr_edge_at="m")
    runs = load_local(str(tmp_path))
    assert [rid for rid, _ in runs.dropped] == ["wukong-xl-nan"] and "diverged" in runs.dropped[0][1]
    points = {p.size: p for p in scale_points(runs, "logloss")}
    assert set(points) == set(SIZES)
    assert points["xxs"].n == 3 and points["s"].n == 1
    assert points["s"].choice.values == (("optimizer.dense.learning_rate", 3e-3),)
    assert points["s"].choice.on_edge == ()
    assert points["m"].choice.values == (("optimizer.dense.learning_rate", 1e-2),)
    assert points["m"].choice.on_edge == ("optimizer.dense.learning_rate",)
    assert points["xl"].mean == pytest.approx(law(SIZES["xl"]), abs=1e-12)  # test half, not valid


def test_fit_recovers_known_law_and_flags_edge(tmp_path):
    make_sweep_dir(tmp_path, noise=0.0003, best_lr_edge_at="m")
    fit = fit_sweep(load_local(str(tmp_path)), "logloss", n_resamples=300)
    fam = fit.families["wukong"]
    assert fam.choice.chosen in ("saturating", "power", "loglinear")
    sat = fam.fits["saturating"]
    assert sat.ok and abs(sat.params["alpha"] - ALPHA) < 0.15
    assert any(f.startswith("size m: best learning_rate is on the edge of its grid") for f in fam.flags)
    h1 = next(h for h in fam.holdouts if h.k == 1)
    assert h1.points[0].share_of_gain < 0.5
    assert fit.floor == pytest.approx(0.19)
    assert fam.bootstrap.n_resamples == 300 and math.isfinite(fam.bootstrap.sigma_seed)


def test_compute_multiplier_between_families(tmp_path):
    # dlrm needs exactly 4x the compute of wukong for the same quality: y_dlrm(x) = law(x / 4)
    make_sweep_dir(tmp_path, noise=0.0, family="wukong", with_failed=False)
    for size, x in SIZES.items():
        r = _record(f"dlrm-{size}", "dlrm", size, 0, 3e-3, law(x / 4.0))
        os.makedirs(tmp_path / r["run_id"])
        (tmp_path / r["run_id"] / "result.json").write_text(json.dumps(r))
    fit = fit_sweep(load_local(str(tmp_path)), "logloss", n_resamples=200)
    assert fit.comparisons["wukong"].multiplier == pytest.approx(4.0, rel=0.05)


def test_cli_fit_plot_compare_write_their_files(tmp_path):
    make_sweep_dir(tmp_path, noise=0.0003)
    out = run_cli("fit", str(tmp_path), "--resamples", "200")
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "report.md").read_text()
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert "## wukong" in report and "Held-out extrapolation" in report and "scaling fit" in report
    fam = fits["families"]["wukong"]
    assert fam["chosen_form"] in ("saturating", "power", "loglinear")
    assert fits["command"].startswith("scaling fit ")
    # the same law on the train-FLOPs axis: converted parameters predict the same values there
    from analysis.forms import get_form

    x_fwd, x_train = SIZES["m"], 3 * SIZES["m"] * 1e9 * 1000
    form = get_form(fam["chosen_form"])
    assert form.predict(fam["params_on_other_axis"], x_train) == pytest.approx(
        form.predict(fits["families"]["wukong"]["fits"][fam["chosen_form"]]["params"], x_fwd), rel=1e-9)
    plot = run_cli("plot", str(tmp_path), "--resamples", "200", "--relative-to", "wukong:xxs")
    assert plot.returncode == 0, plot.stderr
    for ext in ("png", "svg"):
        assert (tmp_path / "plots" / f"scaling.{ext}").stat().st_size > 10_000
    cmp = run_cli("compare", str(tmp_path))
    assert cmp.returncode == 0 and "wukong" in cmp.stdout and "xl" in cmp.stdout and "1 dropped" in cmp.stdout
    bad = run_cli("plot", str(tmp_path), "--relative-to", "wukong:zz")
    assert bad.returncode == 2 and "--relative-to" in bad.stderr and "Traceback" not in bad.stderr


def test_wandb_runs_load_into_the_same_points(tmp_path):
    """W&B runs carry the run record in their summary: the loader gives the same points as local files."""
    from analysis.wandb_source import load_wandb

    records = make_sweep_dir(tmp_path, noise=0.0003)

    class FakeApi:
        def runs(self, path, filters):
            assert path == "team/proj" and filters == {"group": "fake"}
            out = [types.SimpleNamespace(id=r["run_id"], state="finished", summary=r,
                                         config={**r["config"], "size": r["size"]}) for r in records]
            out.append(types.SimpleNamespace(id="other", state="crashed", summary={"loss": 1.0}, config={}))
            return out

    remote = load_wandb("team/proj", "fake", api=FakeApi())
    local = load_local(str(tmp_path))
    assert [p.mean for p in scale_points(remote)] == [p.mean for p in scale_points(local)]
    assert ("other", "W&B state crashed: no run record in its summary") in remote.dropped


def test_model_and_data_sweep_fits_the_two_variable_law(tmp_path):
    """Runs over sizes x data sizes: the Chinchilla form recovers its exponents; 1-D fits use the most data."""
    e, a, b, alpha, beta = 0.2, 2.0, 30.0, 0.35, 0.45
    for size, x in SIZES.items():
        n = x * 1e9 / 2
        for steps in (100, 300, 1000, 3000):
            d = steps * 100
            r = _record(f"wukong-{size}-{steps}", "wukong", size, 0, 3e-3, e + a / n**alpha + b / d**beta)
            r["examples_seen"] = d
            r["config"]["train"] = {"steps": steps}
            os.makedirs(tmp_path / r["run_id"])
            (tmp_path / r["run_id"] / "result.json").write_text(json.dumps(r))
    fit = fit_sweep(load_local(str(tmp_path)), "logloss", n_resamples=100)
    ds = fit.data_scaling["wukong"]
    assert ds.fit.ok and ds.n_points == 24
    assert ds.fit.params["alpha"] == pytest.approx(alpha, abs=0.01)
    assert ds.fit.params["beta"] == pytest.approx(beta, abs=0.01)
    assert ds.fit.a == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert {p.examples for p in fit.families["wukong"].points} == {300_000}


def test_ranking_metric_sweep_reads_the_validation_picked_eval_and_fits_upward(tmp_path):
    """Next-item records: the evaluation picked on validation NDCG@10 (best_eval) is what the curve
    reads, HR@10 rises with compute and is fitted as 1 - HR@10, the oracle is the ceiling, and
    `scaling fit` takes the sweep's metric and SASRec as the reference by default."""
    root = str(tmp_path / "seq")
    for size, x in SIZES.items():
        for family, gap in (("hstu", 0.0), ("sasrec", 0.01)):
            hr = 0.45 - 0.002 * x ** -0.3 - gap  # 1 - HR = 0.55 + 0.002 x^-0.3: saturating in 1 - HR
            rec = _record(f"{family}-{size}", family, size, 0, 1e-3, 0.0)
            rec["final_eval"] = {"hr@10": hr - 0.05, "valid_hr@10": hr - 0.05, "test_hr@10": hr - 0.05}
            rec["best_eval"] = {"hr@10": hr, "valid_hr@10": hr, "test_hr@10": hr, "valid_ndcg@10": hr / 2}
            rec["data_reference"] = {"test_oracle_hr@10": 0.5}
            os.makedirs(os.path.join(root, rec["run_id"]))
            with open(os.path.join(root, rec["run_id"], "result.json"), "w") as f:
                json.dump(rec, f)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"name": "seq", "tune": [], "metric": "hr@10"}, f)
    runs = load_local(root)
    points = {(p.family, p.size): p.mean for p in scale_points(runs, "hr@10")}
    assert points[("hstu", "xl")] == pytest.approx(0.45 - 0.002 * SIZES["xl"] ** -0.3)  # best_eval, not final_eval
    fit = fit_sweep(runs, "hr@10", reference="sasrec", n_resamples=200)
    assert fit.fitted_quantity == "1 - hr@10" and fit.floor == 0.5
    assert fit.families["hstu"].y[0] > fit.families["hstu"].y[-1]  # the fitted error falls with compute
    result = run_cli("fit", root, "--resamples", "100")
    assert result.returncode == 0, result.stderr
    report = open(os.path.join(root, "report.md")).read()
    assert "--metric hr@10" in report and "--reference sasrec" in report and "Oracle hr@10" in report
