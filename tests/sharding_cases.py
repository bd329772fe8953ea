"""The multi-device sharding cases, run in one subprocess that sees 8 host CPU devices
(tests/test_sharding.py starts it; XLA_FLAGS must be set before JAX starts). Prints one JSON line:

    {"losses": {family: {"1": [20 losses on one device], layout: [20 losses on 8 devices]}},
     "golden": {"family/layout": {param path: {"shape": [...], "spec": [...]}}},
     "restore": {"placed": bool, "same_values": bool, "split_leaves": int},
     "relayout": {"row_wise/4" etc.: {"same_rows", "placed", "moved"}, "unconverted_same_rows": bool},
     "loop": {"status", "logloss", "sharding": the run record's summary, "devices"},
     "item_traffic": {"table_bytes", "collective_bytes"} of an HSTU step with row-wise tables,
     "shares": {"wukong_s/fsdp" or "hstu_s/fsdp": {replicated_param_share, dense_replicated_share, ...}}}

Every family trains the same 20 batches from the same init on one device (a 1-device mesh) and on
8 devices under each layout, so the losses must agree up to float reassociation.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_cases [family ...]
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20

# Tiny members of each family on its synthetic world; batch 16 splits over 8 devices.
_COMMON = ["train.batch_size=16", "train.eval_batch_size=16", "train.steps=100", "logging.progress=false"]
FAMILIES = {
    "wukong": ("quickstart.yaml", ["model.size=xxs"]),
    "dlrm": ("quickstart.yaml", ["model.name=dlrm", "model.size=xxs"]),
    "hstu": ("hstu_synthetic.yaml", ["model.size=xs", "model.num_heads=2", "model.qk_dim=12", "model.v_dim=12", "data.num_users=300", "data.num_items=200", "data.num_negatives=16"]),
    "onetrans": ("onetrans_synthetic.yaml", ["model.size=xs", "data.num_users=300", "data.num_items=200", "data.seq_len=8",
                                             "data.interest_window=8", "data.eval_examples=256"]),
}
# Each layout on the 8-device mesh that exercises it (every mesh axis it splits over is > 1), and
# fsdp with row-wise sharded embedding tables (capacity ample: no id may be dropped in 20 steps).
_FSDP_MESH = ["sharding.mesh.data=2", "sharding.mesh.fsdp=4"]
LAYOUTS = {
    "dp": ["sharding.layout=dp", "sharding.mesh.data=8"],
    "fsdp": ["sharding.layout=fsdp", *_FSDP_MESH],
    "fsdp_tp": ["sharding.layout=fsdp_tp", "sharding.mesh.data=2", "sharding.mesh.fsdp=2", "sharding.mesh.tensor=2"],
    "fsdp_row_wise": ["sharding.layout=fsdp", *_FSDP_MESH, "sharding.embedding=row_wise", "sharding.embedding_capacity=8"],
}
# The other two layouts, on the families with attention heads and wide MLPs (no golden dumps):
# hsdp (parameters over fsdp=4, replicated over data=2) and tp (tensor=2 over heads and MLPs: HSTU
# here has 2 heads).
MORE_LAYOUTS = {
    "hsdp": ["sharding.layout=hsdp", *_FSDP_MESH],
    "tp": ["sharding.layout=tp", "sharding.mesh.data=4", "sharding.mesh.tensor=2"],
}
MORE_LAYOUT_FAMILIES = ("wukong", "hstu")


def config(family: str, extra: list[str]):
    from scaling.config import load_run_config

    path, overrides = FAMILIES[family]
    return load_run_config(os.path.join(ROOT, "sweeps", path), [*overrides, *_COMMON, *extra])


def family_losses(family: str) -> tuple[dict[str, list[float]], dict[str, list]]:
    """{'1' or layout: STEPS losses} and {layout: placements}. One init (on one device) and one set
    of batches serve every run; each run copies the initial state into its own layout."""
    import jax

    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    reference = config(family, [])
    dataset = dataset_of(reference.data)
    layouts = {**LAYOUTS, **(MORE_LAYOUTS if family in MORE_LAYOUT_FAMILIES else {})}
    setups = {layout: prepare(config(family, overrides), dataset) for layout, overrides in layouts.items()}
    first = setups["1"] = prepare(reference, dataset, devices=jax.devices()[:1])
    batches = first.task.train_iterator(reference.train.batch_size, reference.seed)
    batches = [next(batches) for _ in range(STEPS)]
    with first.partitioner.activate():
        initial = first.partitioner.init(first.init_state, first.abstract)
    losses, placements = {}, {}
    for name, setup in setups.items():
        p = setup.partitioner
        fresh = jax.tree.map(lambda x: x.copy(), initial)  # device_put may reuse device 0's buffer: donated
        with p.activate():
            if p.embedding == "replicated":  # the same initial state, copied into this layout
                state = jax.device_put(fresh, p.state_shardings(setup.abstract))
            else:  # stored tables differ per placement: init draws the same natural values
                state = p.init(setup.init_state, setup.abstract)
            step = setup.compile_train_step()
            out, dropped = [], 0
            for batch in batches:
                state, metrics = step(state, p.shard_batch(batch))
                out.append(metrics["loss"])
                dropped += int(metrics["embedding_overflow"])
        assert dropped == 0, f"{family} {name}: {dropped} embedding ids dropped for capacity"
        losses[name] = [float(x) for x in jax.device_get(out)]
        placements[name] = p.placements(setup.abstract)
    return losses, placements


def golden(placements) -> dict:
    from scaling.sharding.rules import spec_to_json

    return {p.path: {"shape": list(p.shape), "spec": spec_to_json(p.spec)} for p in placements}


def restore_across_layouts() -> dict:
    """A checkpoint written under `dp` restored into the `fsdp` layout through the partitioner's
    sharded abstract state: every leaf lands in its fsdp sharding, with the saved values."""
    import tempfile

    import jax
    import numpy as np

    from scaling.train.checkpoint import Checkpointer
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    dp, fsdp = (config("wukong", LAYOUTS[layout]) for layout in ("dp", "fsdp"))
    saved_setup, target_setup = prepare(dp, dataset_of(dp.data)), prepare(fsdp, dataset_of(fsdp.data))
    with tempfile.TemporaryDirectory() as directory:
        with saved_setup.partitioner.activate():
            saved = saved_setup.partitioner.init(saved_setup.init_state, saved_setup.abstract)
            writer = Checkpointer(directory, 1)
            writer.save(0, saved, {}, {})
            writer.close()
        p = target_setup.partitioner
        with p.activate():
            restored, _, _ = Checkpointer(directory, 1).restore(0, p.sharded_abstract(target_setup.abstract))
    want = jax.tree.leaves(p.state_shardings(target_setup.abstract))
    got = jax.tree.leaves(restored)
    placed = all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in zip(got, want, strict=True))
    same = all(np.array_equal(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                              jax.random.key_data(b) if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key) else b)
               for a, b in zip(got, jax.tree.leaves(saved), strict=True))
    split = sum(any(e is not None for e in w.spec) for w in want)
    return {"placed": placed, "same_values": same, "split_leaves": split}


def _natural_rows(partitioner, abstract, state) -> dict:
    """{leaf path: natural-order rows} of every table and optimizer leaf that mirrors one."""
    import jax
    import numpy as np

    from scaling.sharding.embedding import to_natural
    from scaling.sharding.partitioner import leaf_path
    from scaling.sharding.relayout import mirrored_table

    layouts = {tuple(k.split("/")): (v, v) for k, v in partitioner.table_layouts(abstract).items()}
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        found = mirrored_table(leaf_path(keypath), layouts, leaf.shape)
        if found is not None:
            out["/".join(leaf_path(keypath))] = np.asarray(to_natural(np.asarray(leaf), found[0]))
    return out


def relayout_restore() -> dict:
    """A DLRM checkpoint written with row-wise tables on 8 devices after 3 steps (so Adagrad's
    accumulators are not zero) restored row-wise on 4 devices, table-wise on 8 and replicated on
    1, and row-wise on 6 (whose shards the saved 472 rows do not divide): every table and
    accumulator row must come back to the same natural row, in this run's sharding. Restoring
    without the relayout (the arrays as saved, same shape) must not."""
    import tempfile

    import jax
    import numpy as np

    from scaling.sharding.relayout import RestorePlan, layouts_json
    from scaling.train.checkpoint import Checkpointer
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    capacity = "sharding.embedding_capacity=8"
    saved_cfg = config("dlrm", ["sharding.mesh.data=8", "sharding.embedding=row_wise", capacity])
    # row_wise over 6: 474 stored rows, and the saved 472 do not split over 6 devices
    targets = {"row_wise/4": (["sharding.mesh.data=4", "sharding.embedding=row_wise", capacity], 4),
               "row_wise/6": (["sharding.mesh.data=6", "sharding.embedding=row_wise", capacity,
                               "train.batch_size=48", "train.eval_batch_size=48"], 6),
               "table_wise/8": (["sharding.mesh.data=8", "sharding.embedding=table_wise", capacity], 8),
               "replicated/1": ([], 1)}
    out: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        setup = prepare(saved_cfg, dataset_of(saved_cfg.data))
        p = setup.partitioner
        with p.activate():
            state = p.init(setup.init_state, setup.abstract)
            step, batches = setup.compile_train_step(), setup.task.train_iterator(16, 0)
            for _ in range(3):
                state, _ = step(state, p.shard_batch(next(batches)))
            writer = Checkpointer(directory, 1, layouts_json(p, setup.abstract))
            writer.save(0, state, {}, {})
            writer.close()
            saved = _natural_rows(p, setup.abstract, state)
        for name, (overrides, devices) in targets.items():
            target = prepare(config("dlrm", overrides), dataset_of(saved_cfg.data), devices=jax.devices()[:devices])
            q = target.partitioner
            with q.activate():
                reader = Checkpointer(directory, 1)
                plan = RestorePlan.make(q, target.abstract, reader.saved_layouts(0))
                restored = plan.finish(reader.restore(0, plan.target)[0])
                rows = _natural_rows(q, target.abstract, restored)
                want = jax.tree.leaves(q.state_shardings(target.abstract))
                out[name] = {
                    "same_rows": sorted(rows) == sorted(saved) and all(np.array_equal(rows[k], saved[k]) for k in saved),
                    "placed": all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in zip(jax.tree.leaves(restored), want, strict=True)),
                    "moved": len(plan.moves)}
                if name == "row_wise/4":  # same stored shape (472 rows), another order
                    unconverted = reader.restore(0, q.sharded_abstract(target.abstract))[0]
                    rows = _natural_rows(q, target.abstract, unconverted)
                    out["unconverted_same_rows"] = all(np.array_equal(rows[k], saved[k]) for k in saved)
    return out


def item_table_traffic() -> dict:
    """Collective bytes per device of one compiled HSTU train step (20k-item catalogue, row-wise
    tables, fsdp on 8 devices) beside the item table's bytes: the sampled softmax must look up the
    rows it scores, not assemble the table in natural order every step (which all-gathers it and
    all-reduces its gradient: more than the table's bytes)."""
    import numpy as np

    from benchmarks.sharding_lookups import collective_bytes
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    cfg = config("hstu", [*LAYOUTS["fsdp_row_wise"], "data.num_items=20000", "data.num_users=400"])
    setup = prepare(cfg, dataset_of(cfg.data))
    with setup.partitioner.activate():
        hlo = setup.compile_train_step().as_text()
    table = [p for p in setup.partitioner.placements(setup.abstract) if p.path.startswith("embed/")]
    sizes, _ = collective_bytes(hlo)
    return {"table_bytes": int(max(p.bytes for p in table)), "collective_bytes": int(sum(sizes.values())),
            "by_kind": {k: int(v) for k, v in sizes.items() if v}, "item_rows": int(np.prod(table[0].shape[:1]))}


def loop_run() -> dict:
    """The training loop end to end under fsdp with row-wise tables: init, steps, evaluation,
    checkpoint and the run record's sharding summary."""
    import tempfile

    from scaling.train.loop import train

    with tempfile.TemporaryDirectory() as directory:
        cfg = config("wukong", [*LAYOUTS["fsdp_row_wise"], "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                                "train.eval_batch_size=64", "data.eval_examples=256", "logging.wandb.mode=disabled",
                                f"train.output_dir={directory}"])
        record = train(cfg)
    return {"status": record.status, "reason": record.reason, "logloss": record.final_eval.get("logloss"),
            "sharding": record.sharding, "devices": record.device["device_count"]}


def main(families: list[str]) -> None:
    import jax

    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    out = {"losses": {}, "golden": {}, "shares": {}}
    for family in families:
        out["losses"][family], placements = family_losses(family)
        for layout in LAYOUTS:
            out["golden"][f"{family}/{layout}"] = golden(placements[layout])

    out["restore"] = restore_across_layouts()
    out["relayout"] = relayout_restore()
    out["item_traffic"] = item_table_traffic()
    out["loop"] = loop_run()
    # FSDP on a model big enough to matter: parameter placement only (no compile).
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    cfg = config("wukong", ["model.size=s", "sharding.layout=fsdp"])
    setup = prepare(cfg, dataset_of(cfg.data))
    out["shares"]["wukong_s/fsdp"] = setup.partitioner.summary(setup.abstract)
    from scaling.config import load_run_config

    cfg = load_run_config(os.path.join(ROOT, "sweeps", "hstu_synthetic.yaml"),
                          ["model.size=s", "sharding.layout=fsdp", "data.num_users=300", "data.num_items=200"])
    setup = prepare(cfg, dataset_of(cfg.data))
    out["shares"]["hstu_s/fsdp"] = setup.partitioner.summary(setup.abstract)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
