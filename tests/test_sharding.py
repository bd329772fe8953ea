"""Layouts, logical-axis rules, the partitioner and `scaling shard-plan`.

The multi-device cases (8 simulated CPU devices) run in ONE subprocess (tests/sharding_cases.py),
since XLA_FLAGS must be set before JAX starts: Wukong, DLRM, HSTU and OneTrans train 20 steps on
one device and on 8 under dp, fsdp, fsdp_tp and fsdp with row-wise embedding tables, and the losses must agree to RTOL (float32; the
runs differ only in the order of reductions, measured differences are ~1e-7). Golden sharding dumps
per (family, layout) live in tests/golden/sharding/; regenerate them with
SCALING_REGEN_GOLDEN=1 pytest tests/test_sharding.py (then review the diff).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from scaling.config import load_run_config
from scaling.config_schema import ConfigError
from scaling.sharding.rules import Rules, constrain, load_layout, resolve, use_rules
from scaling.train.loop import run_directory
from tests.conftest import ROOT, run_cli, tiny
from tests.sharding_cases import FAMILIES, LAYOUTS, MORE_LAYOUT_FAMILIES, MORE_LAYOUTS

GOLDEN = os.path.join(ROOT, "tests", "golden", "sharding")
REGENERATE = os.environ.get("SCALING_REGEN_GOLDEN") == "1"
RTOL = 1e-5
QUICK = os.path.join(ROOT, "sweeps", "quickstart.yaml")
MESH = {"data": 2, "fsdp": 4, "tensor": 1}


# -- rules (no devices needed) -----------------------------------------------------------------
def test_fsdp_splits_the_largest_divisible_dimension():
    fsdp = load_layout("fsdp")
    assert resolve((8, 64), ("embed", "mlp"), fsdp, MESH).spec == P(None, ("data", "fsdp"))
    assert resolve((64, 8), ("mlp", "embed"), fsdp, MESH).spec == P(("data", "fsdp"), None)
    # 12 takes fsdp (4) but not data too (12 % 8); the next dimension takes data: each axis once.
    assert resolve((12, 6), ("embed", "mlp"), fsdp, MESH).spec == P("fsdp", "data")
    odd = resolve((17, 3), ("fields", "rank"), fsdp, MESH)
    assert odd.replicated and odd.fallbacks and "17" in odd.fallbacks[0]
    assert resolve((16,), ("embed",), fsdp, {"data": 1, "fsdp": 1, "tensor": 1}).replicated  # size-1 axes skipped


def test_tensor_rules_and_positional_activations():
    tp = load_layout("fsdp_tp")
    mesh = {"data": 1, "fsdp": 2, "tensor": 4}
    assert resolve((32, 4, 8), ("embed", "heads", "kv"), tp, mesh).spec == P("fsdp", "tensor", None)
    assert resolve((32, 2, 8), ("embed", "heads", "kv"), tp, mesh).fallbacks  # 2 heads over 4 devices
    # Activations claim axes in position order: the batch takes data x fsdp before `seq` could.
    fsdp = load_layout("fsdp")
    assert resolve((16, 64, 8), ("batch", "seq", None), fsdp, MESH, largest_first=False).spec == P(("data", "fsdp"), None, None)
    assert load_layout("dp").axes_for("embed") == ()


def test_unknown_logical_name_and_bad_layouts_are_clear_errors():
    partial = Rules("partial", (("embed", ("fsdp",)),))
    with pytest.raises(ConfigError, match=r"no rule for logical axis 'mlp' of parameter dense/x"):
        resolve((4, 4), ("embed", "mlp"), partial, MESH, what="parameter dense/x")
    with pytest.raises(ConfigError, match=r"unknown layout 'fsdq' \(did you mean 'fsdp'\?\)"):
        load_run_config(QUICK, ["sharding.layout=fsdq"])
    with pytest.raises(ConfigError, match=r"sharding.rules\[0\].*unknown mesh axis 'tensr'"):
        load_run_config(QUICK, ["sharding.rules=[mlp=tensr]"])
    custom = load_layout("dp", ["mlp=tensor+fsdp", "rank="])
    assert custom.axes_for("mlp") == ("tensor", "fsdp") and custom.axes_for("rank") == ()


def test_constrain_is_a_no_op_outside_a_mesh():
    import jax.numpy as jnp

    x = jnp.ones((4, 3))
    with use_rules(load_layout("fsdp")):
        assert constrain(x, ("batch",)) is x


def _abstract(overrides):
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    cfg = load_run_config(QUICK, ["model.size=xs", "train.batch_size=16", "train.eval_batch_size=16", *overrides])
    return cfg, prepare(cfg, dataset_of(cfg.data))


def test_optimizer_state_follows_its_parameter_and_unannotated_names_fail():
    from scaling.sharding.partitioner import Partitioner

    cfg, setup = _abstract(["optimizer.embedding.name=rowwise_adagrad"])
    mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    p = Partitioner(mesh, load_layout("fsdp"))
    specs = p.state_specs(setup.abstract)
    kernel = specs.dense["layers"][0]["fmb"]["mlp"]["layers"][0]["kernel"]
    assert kernel == P(("data", "fsdp"), None)  # [136, 64]: the 136 side
    adam = specs.opt_dense[1][0]
    assert adam.mu["layers"][0]["fmb"]["mlp"]["layers"][0]["kernel"] == kernel
    assert adam.nu["layers"][0]["fmb"]["mlp"]["layers"][0]["kernel"] == kernel
    assert adam.count == P() and specs.step == P()
    split = [s for s in __import__("jax").tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) if any(e for e in s)]
    assert len(split) > 20
    missing = Rules("no-fields", tuple((k, v) for k, v in load_layout("fsdp").table if k != "fields"))
    with pytest.raises(ConfigError, match=r"logical axis 'fields' of parameter dense/layers/0/fmb/y"):
        Partitioner(mesh, missing).placements(setup.abstract)


# -- 8 simulated devices, one subprocess -----------------------------------------------------------
@pytest.fixture(scope="module")
def cases():
    # Optimization level 0: these tiny programs cost far more to compile than to run, and every
    # run being compared is compiled with the same flags.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-m", "tests.sharding_cases"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layouts_give_the_losses_of_one_device(cases, family):
    runs = cases["losses"][family]
    reference = np.asarray(runs["1"])
    assert len(reference) == 20 and np.all(np.isfinite(reference)) and len(set(reference.tolist())) > 1
    layouts = [*LAYOUTS, *(MORE_LAYOUTS if family in MORE_LAYOUT_FAMILIES else ())]
    assert set(runs) == {"1", *layouts}
    for layout in layouts:
        np.testing.assert_allclose(runs[layout], reference, rtol=RTOL, err_msg=f"{family} under {layout} on 8 devices")


@pytest.mark.parametrize("key", [f"{f}/{lay}" for f in FAMILIES for lay in LAYOUTS])
def test_golden_sharding_dumps(cases, key):
    family, layout = key.split("/")
    path = os.path.join(GOLDEN, f"{family}_{layout}.json")
    mesh = {k: int(v) for k, v in (o.rsplit(".", 1)[-1].split("=") for o in LAYOUTS[layout] if ".mesh." in o)}
    dump = {"mesh": mesh, "params": cases["golden"][key]}
    if REGENERATE or not os.path.exists(path):
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:  # one parameter per line: a layout change reads as a short diff
            rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(dump["params"].items())]
            f.write(f'{{"mesh": {json.dumps(mesh)},\n "params": {{\n' + ",\n".join(rows) + "\n}}\n")
        if not REGENERATE:
            pytest.fail(f"wrote the missing golden {path}; review and commit it")
    with open(path) as f:
        golden = json.load(f)
    changed = sorted(k for k in set(golden["params"]) | set(dump["params"]) if golden["params"].get(k) != dump["params"].get(k))
    assert not changed, (f"{key}: placements changed for {changed[:5]} (SCALING_REGEN_GOLDEN=1 to accept): "
                         + "; ".join(f"{k}: {golden['params'].get(k)} -> {dump['params'].get(k)}" for k in changed[:3]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_row_wise_tables_are_split_and_fsdp_dense_parameters_too(cases, family):
    placements = cases["golden"][f"{family}/fsdp_row_wise"]
    tables = {k: v for k, v in placements.items() if k.startswith("embed/")}
    assert tables and all(v["spec"][0] == ["data", "fsdp"] for v in tables.values()), tables
    assert not any(any(e is not None for e in v["spec"]) for k, v in cases["golden"][f"{family}/dp"].items())
    kernels = [v for k, v in cases["golden"][f"{family}/fsdp"].items() if k.startswith("dense/") and len(v["shape"]) >= 2]
    assert sum(any(e is not None for e in v["spec"]) for v in kernels) >= len(kernels) / 2


@pytest.mark.parametrize("model", ["wukong_s", "hstu_s"])
def test_fsdp_leaves_under_two_percent_of_dense_bytes_replicated(cases, model):
    share = cases["shares"][f"{model}/fsdp"]
    assert share["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # the default mesh: fsdp splits over data
    assert share["dense_replicated_share"] < 0.02, share  # HSTU: its padded relative-bias tables are split too
    if model == "wukong_s":  # (HSTU's item table, replicated by default, is most of its bytes)
        assert share["param_bytes_per_device"] < share["param_bytes"] / 4


def test_checkpoint_restores_into_another_layout(cases):
    restore = cases["restore"]
    assert restore["placed"] and restore["same_values"] and restore["split_leaves"] > 10


def test_checkpointed_tables_are_re_laid_out_for_another_placement_or_device_count(cases):
    relayout = cases["relayout"]
    assert relayout.pop("unconverted_same_rows") is False  # the same shape read as it is: rows misplaced
    for name, result in relayout.items():
        assert result["same_rows"] and result["placed"], name
        assert result["moved"] == 2, name  # the table and its Adagrad accumulator


def test_sampled_softmax_under_row_wise_tables_moves_rows_not_the_table(cases):
    traffic = cases["item_traffic"]
    assert traffic["item_rows"] >= 20000
    # measured: 0.21 of the table's bytes (mostly the all-to-alls of the rows scored); assembling
    # the table in natural order instead: 3.1 (all-gather of the table, all-reduce of its gradient)
    assert traffic["collective_bytes"] < 0.5 * traffic["table_bytes"], traffic


def test_training_loop_runs_and_records_its_layout(cases):
    loop = cases["loop"]
    assert loop["status"] == "ok", loop["reason"]
    assert loop["devices"] == 8 and np.isfinite(loop["logloss"])
    sharding = loop["sharding"]
    assert sharding["layout"] == "fsdp" and sharding["embedding"] == "row_wise"
    assert sharding["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding["param_bytes_per_device"] < sharding["param_bytes"] / 4 and sharding["replicated_param_share"] < 0.05


def test_a_run_with_row_wise_tables_resumes_on_another_device_count(tmp_path):
    """Trained 10 steps on 8 devices; the same run (default mesh: same run id) resumed from its
    step-5 checkpoint on 4 devices reaches the uninterrupted run's numbers."""
    overrides = [o for o in tiny(tmp_path) if not o.startswith("train.steps")]
    overrides += ["model.name=dlrm", "model.size=xxs", "train.steps=10", "train.checkpoint_every=5", "train.eval_every=5",
                  "train.batch_size=16", "sharding.embedding=row_wise", "sharding.embedding_capacity=8"]
    args = ["train", QUICK, *sum((["--set", o] for o in overrides), [])]

    def devices(n):
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}

    first = run_cli(*args, env=devices(8))
    assert first.returncode == 0, first.stderr
    run_dir = run_directory(load_run_config(QUICK, overrides))
    clean = json.load(open(os.path.join(run_dir, "result.json")))
    os.remove(os.path.join(run_dir, "result.json"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "10"))
    resumed = run_cli(*args, env=devices(4))
    assert resumed.returncode == 0, resumed.stderr
    assert "re-laid out from row_wise over 8 devices to row_wise over 4 devices" in resumed.stderr
    again = json.load(open(os.path.join(run_dir, "result.json")))
    assert again["resumed_from"] == [5] and again["device"]["device_count"] == 4
    for key, value in clean["final_eval"].items():
        assert again["final_eval"][key] == pytest.approx(value, rel=RTOL), key


# -- the command -------------------------------------------------------------------------------
def test_shard_plan_command(tmp_path):
    out = run_cli("shard-plan", QUICK, "--devices", "8", "--set", "sharding.layout=fsdp", "--model", "wukong:xxxs", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["devices"] == 8 and plan["model"] == "wukong:xxxs" and plan["layout"] == "fsdp"
    kernels = [p for p in plan["params"] if p["path"].endswith("kernel")]
    assert kernels and all(p["bytes_per_device"] <= p["bytes"] for p in plan["params"])
    assert any(p["bytes_per_device"] * 8 == p["bytes"] for p in kernels)
    assert plan["compiled_step"]["total"] > 0 and plan["replicated_param_share"] < 1.0
    bad = run_cli("shard-plan", QUICK, "--devices", "8", "--model", "wukong:huge")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--model" in bad.stderr, bad.stderr
    bad = run_cli("shard-plan", QUICK, "--set", "sharding.layout=zero3")
    assert bad.returncode == 2 and "unknown layout 'zero3'" in bad.stderr and bad.stderr.count("\n") == 1
