"""Sharded embedding lookups (scaling.sharding.embedding) on 8 simulated CPU devices.

Every 8-device case runs in ONE subprocess (XLA_FLAGS must be set before JAX is imported; one
process compiles each program once) that prints a JSON report; the tests below read it. The
single-device layout tests run in this process.

Tolerance: forward outputs must match the dense jnp.take reference exactly (the same rows are
gathered and pooled the same way); table gradients to 1e-6 absolute (duplicate ids' cotangents are
summed in another order once ids are deduplicated and exchanged).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from scaling.sharding.embedding import (
    STRATEGIES, EmbeddingPlacement, TableLayout, convert_table, lookup, lookup_bags, lookup_fields, stored_positions,
    to_natural, to_stored,
)
from tests.conftest import ROOT

GRAD_TOL = 1e-6
MESHES = {"data8": (8, 1, 1), "data4_fsdp2": (4, 2, 1), "data2_fsdp2_tensor2": (2, 2, 2)}

_SCRIPT = r'''
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding
from scaling.config import MeshConfig, ModelConfig
from scaling.config_schema import build
from scaling.data.spec import CTRFeatureSpec
from scaling.models.registry import build_model
from scaling.sharding import embedding as E
from scaling.sharding.mesh import make_mesh
from scaling.train.optimizers import rowwise_adagrad
from scaling.train.step import StepFunctions, split_model

MESHES = json.loads(os.environ["MESHES"])
rng = np.random.default_rng(0)
# A field table: 4 single-hot fields and 2 bags of length 4 (unequal cardinalities, 6 tables on 8
# devices: table_wise pads with dummy slots), and an item table of 37 rows (not a multiple of 8).
SINGLES, BAGS, L, D = (5, 13, 3, 9), (7, 12), 4, 3
BLOCKS = SINGLES + BAGS
field_nat = jnp.asarray(rng.normal(size=(sum(BLOCKS), D)), jnp.float32)
item_nat = jnp.asarray(rng.normal(size=(37, D)), jnp.float32)
sparse = np.stack([rng.integers(0, c, 16) for c in SINGLES], 1)
sparse[0] = 0                                                     # id 0 is a real single-hot id
history = np.stack([rng.integers(0, c, (16, L)) for c in BAGS], 1)
history[1, 0] = 0                                                 # an empty bag
history[2, 1, 2:] = 0                                             # padding inside a bag
items = rng.integers(0, 37, (12, 5)); items[3] = 0; items[4, :3] = 11   # padding and repeats; 60 ids
sparse, history, items = (jnp.asarray(a, jnp.int32) for a in (sparse, history, items))
w_fields = jnp.asarray(rng.normal(size=(16, len(SINGLES), D)), jnp.float32)
w_bags = jnp.asarray(rng.normal(size=(16, len(BAGS), D)), jnp.float32)
w_items = jnp.asarray(rng.normal(size=(12, 5, D)), jnp.float32)
offsets = np.concatenate([[0], np.cumsum(BLOCKS)[:-1]])

def reference(field_t, item_t):
    single = jnp.take(field_t, sparse + offsets[:4], axis=0)
    valid = history > 0
    vec = jnp.take(field_t, history + offsets[4:, None], axis=0)
    pooled = jnp.where(valid[..., None], vec, 0.0).sum(2) / jnp.maximum(valid.sum(-1, keepdims=True), 1)
    item = jnp.take(item_t, items, axis=0)
    loss = jnp.sum(single * w_fields) + jnp.sum(pooled * w_bags) + jnp.sum(item * w_items)
    return loss, (single, pooled, item)

(_, ref_out), ref_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(field_nat, item_nat)

def sharded(field_t, item_t, field_layout, item_layout):
    with E.collect_overflow() as counts:
        single = E.lookup_fields(field_t, sparse, layout=field_layout)
        pooled = E.lookup_bags(field_t, history, layout=field_layout)
        item = E.lookup(item_t, items, layout=item_layout)
    loss = jnp.sum(single * w_fields) + jnp.sum(pooled * w_bags) + jnp.sum(item * w_items)
    return loss, ((single, pooled, item), E.overflow_total(counts))

report = {"lookups": {}, "model": {}}
for name, (data, fsdp, tensor) in MESHES.items():
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    for strategy in E.STRATEGIES:
        # capacity 8 = S: C is the whole local id count, so nothing can overflow here
        placement = E.EmbeddingPlacement(strategy, mesh, 8.0)
        with jax.set_mesh(mesh), E.embedding_placement(placement):
            field_s, field_layout = E.place_table(field_nat, blocks=BLOCKS, singles=len(SINGLES))
            item_s, item_layout = E.place_table(item_nat)
            field_s = jax.device_put(field_s, NamedSharding(mesh, field_layout.spec))
            item_s = jax.device_put(item_s, NamedSharding(mesh, item_layout.spec))
            fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True), static_argnums=(2, 3))
            lowered = fn.lower(field_s, item_s, field_layout, item_layout)
            hlo = lowered.as_text()
            (_, (outs, overflow)), grads = lowered.compile()(field_s, item_s)
        nat_grads = (E.to_natural(grads[0], field_layout), E.to_natural(grads[1], item_layout))
        report["lookups"][f"{name}/{strategy}"] = {
            "layouts": [field_layout.strategy, item_layout.strategy],
            "stored_rows": [int(field_s.shape[0]), int(item_s.shape[0])],
            "forward_err": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs, ref_out)],
            "grad_err": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(nat_grads, ref_grads)],
            # |gradient| on the stored layout's padding rows (to_stored of ones marks the real rows)
            "grad_padding_abs": sum(float(jnp.sum(jnp.abs(g) * (1 - E.to_stored(jnp.ones_like(n), lay))))
                                    for g, n, lay in zip(grads, nat_grads, (field_layout, item_layout))),
            "overflow": int(overflow),
            "all_to_all": hlo.count("all_to_all"),
        }

# Overflow: C = ceil(0.25 * 8 / 8) = 1 unique id per (device, owner) on data=8; a skewed batch.
mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
table = jnp.asarray(rng.normal(size=(64, D)), jnp.float32)
ids = rng.integers(0, 64, 64)
ids[:24] = rng.choice(np.arange(0, 64, 8), 24)    # devices 0-2 ask owner 0 for many ids (repeats too)
ids[30:34] = [9, 9, 17, 25]                      # owner 1 asked twice for 9 by device 3
with jax.set_mesh(mesh), E.embedding_placement(E.EmbeddingPlacement("row_wise", mesh, 0.25)):
    stored, layout = E.place_table(table)
    def f(t):
        with E.collect_overflow() as counts:
            out = E.lookup(t, jnp.asarray(ids, jnp.int32), layout=layout)
        return out, E.overflow_total(counts)
    out, count = jax.jit(f)(stored)
report["overflow"] = {"ids": ids.tolist(), "count": int(count), "out": np.asarray(out).tolist(),
                      "table": np.asarray(table).tolist()}

# A model (DLRM tiny with a bag field) built under each strategy: the same forward as replicated;
# then one train step whose metrics carry the overflow of a tiny capacity.
spec = CTRFeatureSpec(cardinalities=(5, 7, 3, 11), num_dense=3, bag_cardinalities=(9,), bag_length=4)
config = build(ModelConfig, dict(name="dlrm", embed_dim=4, bottom_mlp=(6,), top_mlp=(8, 5)))
batch = {"sparse": jnp.asarray(np.stack([rng.integers(0, c, 16) for c in spec.cardinalities], 1), jnp.int32),
         "dense": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
         "history": jnp.asarray(rng.integers(0, 9, (16, 1, 4)), jnp.int32),
         "label": jnp.asarray(rng.integers(0, 2, 16), jnp.float32)}
reference_out = np.asarray(build_model(config, spec, rngs=nnx.Rngs(3))(batch))

class Task:
    def loss(self, model, batch):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(model(batch), batch["label"]))

mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
# capacity 8 = S: no overflow, so the same function; 0.05: C = 1, the batch overflows
for strategy, capacity in [(s, 8.0) for s in E.STRATEGIES] + [("row_wise", 0.05)]:
    with jax.set_mesh(mesh), E.embedding_placement(E.EmbeddingPlacement(strategy, mesh, capacity)):
        model = build_model(config, spec, rngs=nnx.Rngs(3))
        out = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
        graphdef, embed, dense, rngs = split_model(model)
        fns = StepFunctions(graphdef, optax.sgd(0.1), rowwise_adagrad(0.1), jnp.float32, Task())
        state = fns.init_state(dense, embed, rngs)
        # one train step (a compile each) where the overflow metric says something
        stepped = strategy in ("replicated", "row_wise")
        metrics = jax.jit(fns.train_step)(state, batch)[1] if stepped else {"embedding_overflow": 0, "loss": 0.0}
        def forward_overflow(m, b):
            with E.collect_overflow() as counts:
                m(b)
            return E.overflow_total(counts)
        direct = int(nnx.jit(forward_overflow)(model, batch)) if capacity < 1 else 0
    table_var = model.embedding.table
    acc = jax.tree.leaves(state.opt_embed)[0]
    report["model"][f"{strategy}/{capacity}"] = {
        "max_err": float(np.max(np.abs(out - reference_out))),
        "metric_overflow": int(metrics["embedding_overflow"]), "direct_overflow": direct,
        "stored_rows": int(table_var.shape[0]), "accumulator_shape": list(acc.shape),
        "spec": str(E.table_partition_spec(table_var)), "loss": float(metrics["loss"]) if stepped else None,
    }
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "MESHES": json.dumps(MESHES)}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lookup_forward_and_gradient_match_dense_take(report, mesh, strategy):
    case = report["lookups"][f"{mesh}/{strategy}"]
    # table_wise lays the field table out by tables and the single item table row_wise
    assert case["layouts"] == ([strategy, "row_wise"] if strategy == "table_wise" else [strategy, strategy])
    assert case["forward_err"] == [0.0, 0.0, 0.0]  # single-hot fields, pooled bags, item table
    assert max(case["grad_err"]) <= GRAD_TOL
    assert case["grad_padding_abs"] == 0.0  # padding rows of the stored layout get no gradient
    assert case["overflow"] == 0
    # the exchanges are explicit all_to_alls exactly where the lookup is ours
    assert (case["all_to_all"] > 0) == (strategy in ("row_wise", "table_wise"))


def test_stored_layouts_pad_to_the_mesh(report):
    case = report["lookups"]
    assert case["data8/replicated"]["stored_rows"] == [49, 37]
    assert case["data8/gspmd"]["stored_rows"] == [56, 40]
    assert case["data8/row_wise"]["stored_rows"] == [56, 40]
    # table_wise: 6 tables on 8 devices, one per device: a block holds the largest (13 rows)
    assert case["data8/table_wise"]["stored_rows"] == [8 * 13, 40]
    # on 4 x 2 (tensor 2 too) the batch axes still hold 8 devices (2 x 2 x 2: 4)
    assert case["data2_fsdp2_tensor2/row_wise"]["stored_rows"] == [52, 40]


def _dropped_by_hand(ids: np.ndarray, shards: int, capacity: int) -> np.ndarray:
    """Which positions a row_wise lookup zeroes: per device (its n / S contiguous ids), the unique
    ids in ascending order fill C slots per owner (id mod S); the rest are dropped."""
    dropped = np.zeros(ids.shape, bool)
    for k, chunk in enumerate(np.split(np.arange(ids.size), shards)):
        unique = np.unique(ids[chunk])
        rank = {}
        for u in unique:
            owner = u % shards
            rank[u] = sum(1 for v in unique if v % shards == owner and v < u)
        dropped[chunk] = [rank[u] >= capacity for u in ids[chunk]]
    return dropped


def test_overflow_is_counted_and_zeroed(report):
    case = report["overflow"]
    ids, out, table = np.asarray(case["ids"]), np.asarray(case["out"]), np.asarray(case["table"])
    dropped = _dropped_by_hand(ids, shards=8, capacity=1)
    assert dropped.sum() > 10  # the skewed batch really overflows
    assert case["count"] == int(dropped.sum())
    np.testing.assert_array_equal(out[dropped], 0.0)
    np.testing.assert_array_equal(out[~dropped], table[ids[~dropped]])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_built_under_each_strategy_computes_the_same_function(report, strategy):
    case = report["model"][f"{strategy}/8.0"]
    assert case["max_err"] <= 1e-6  # table_wise: 1e-7 (XLA fuses the model's math differently)
    assert case["metric_overflow"] == case["direct_overflow"] == 0
    if case["loss"] is not None:  # a train step ran (replicated, row_wise)
        assert case["loss"] == pytest.approx(report["model"]["replicated/8.0"]["loss"], abs=1e-6)
    # row-wise Adagrad's accumulator has the stored table's leading dim, so one spec shards both
    assert case["accumulator_shape"] == [case["stored_rows"], 1]
    assert case["spec"] == ("P()" if strategy == "replicated" else "P(('data', 'fsdp'),)")


def test_overflow_reaches_the_train_step_metrics(report):
    case = report["model"]["row_wise/0.05"]
    assert case["metric_overflow"] == case["direct_overflow"] > 0
    assert case["max_err"] > 1e-3  # dropped ids change the function: why the count must be seen


# ---------------------------------------------------------------------------------------------
# Single device: layouts round-trip and the lookups are plain gathers without a placement


@pytest.mark.parametrize("strategy", ["row_wise", "table_wise", "gspmd"])
def test_layouts_round_trip_and_lookups_without_placement(strategy):
    blocks, singles = (3, 10, 4, 6), 3
    natural = jnp.asarray(np.random.default_rng(1).normal(size=(sum(blocks), 2)), jnp.float32)
    layout = TableLayout(strategy, sum(blocks), 4, 2.0, blocks, singles)
    stored = to_stored(natural, layout)
    assert stored.shape[0] == layout.stored_rows and stored.shape[0] % 4 == 0
    np.testing.assert_array_equal(to_natural(stored, layout), natural)
    rows = jnp.arange(sum(blocks))
    np.testing.assert_array_equal(stored[stored_positions(rows, layout)], natural)
    back = convert_table(stored, layout, TableLayout("row_wise", sum(blocks), 8))
    np.testing.assert_array_equal(to_natural(back, TableLayout("row_wise", sum(blocks), 8)), natural)
    sparse = jnp.asarray([[0, 9, 3], [2, 1, 0]], jnp.int32)
    history = jnp.asarray([[[1, 5, 0]], [[0, 0, 0]]], jnp.int32)
    np.testing.assert_array_equal(lookup_fields(stored, sparse, layout=layout), natural[sparse + jnp.asarray([0, 3, 13])])
    pooled = lookup_bags(stored, history, layout=layout)
    np.testing.assert_allclose(pooled[0, 0], (natural[17 + 1] + natural[17 + 5]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(pooled[1, 0], 0.0)
    if strategy != "table_wise":
        np.testing.assert_array_equal(lookup(stored, rows, layout=layout), natural)


def test_collective_bytes_reads_tuples_and_async_ops():
    from benchmarks.sharding_lookups import collective_bytes

    hlo = "\n".join([
        "  %all-to-all = (s32[1,16]{1,0}, /*index=1*/s32[1,16]{1,0}) all-to-all(%a, %b), dimensions={0}",
        "  %ar = f32[32,4]{1,0} all-reduce(f32[32,4]{1,0} %x), to_apply=%add",
        "  %ag = (bf16[2,4]{1,0}, bf16[16,4]{1,0}) all-gather-start(bf16[2,4]{1,0} %y), dimensions={0}",
        "  %agd = bf16[16,4]{1,0} all-gather-done(%ag)",
        "  %gte = s32[1,16]{1,0} get-tuple-element(%all-to-all), index=0",
    ])
    sizes, counts = collective_bytes(hlo)
    assert sizes["all-to-all"] == 2 * 16 * 4 and counts["all-to-all"] == 1
    assert sizes["all-reduce"] == 32 * 4 * 4
    assert sizes["all-gather"] == 16 * 4 * 2 and counts["all-gather"] == 1  # the start's result, once
    assert sizes["collective-permute"] == 0


def test_placement_errors():
    with pytest.raises(ValueError, match="needs a mesh"):
        EmbeddingPlacement("row_wise")
    with pytest.raises(ValueError, match="unknown embedding strategy"):
        EmbeddingPlacement("column_wise")
