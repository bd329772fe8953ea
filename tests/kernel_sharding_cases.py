"""The Pallas kernels on an 8-device mesh, run in one subprocess that sees 8 host CPU devices
(tests/test_kernels_sharded.py starts it; XLA_FLAGS must be set before JAX starts). Prints one
JSON line:

    {"kernels": {"<mesh>/<case>": {"sharded": bool, "errors": {tensor: max |got - want| / max |want|}}},
     "auto_traced": {"<mesh>": bool},
     "steps": {family: {"pallas": [losses], "xla": [losses]}},
     "seconds": float}

Kernel cases (impl=pallas, interpreted) under jax.set_mesh + the mesh's layout rules against the
xla reference on one device, no mesh: HSTU attention with the relative bias and candidates
(forward and the gradients of q, k, v, pos_w, ts_w), M-FALCON's candidate attention (forward),
the FM block (forward and the gradients of x, y, scale, bias), the softmax attention in
OneTrans's layout (forward and the gradients of q, k, v) and HSTU's fused projection and attention
(`projected_mha`: u, the attention, and the gradients of the pre-activation and both tables; on
the tensor mesh its heads stay whole, replicated over tensor), the Wukong layer's residual
LayerNorm and HSTU's gated LayerNorm (forward and every gradient). `sharded`: the traced program
runs the kernel under shard_map. `auto_traced`: impl=auto (the CUDA branch: compiled kernels,
check_vma on) traces forward and backward on the mesh. Steps: a one-layer HSTU, Wukong and
OneTrans trained two steps from the same init through the partitioner (fsdp layout, data=4 x
fsdp=2) with the kernels on and off (the second loss sees the first step's gradients); HSTU with
16-wide heads, so its kernel path is the fused projection.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.kernel_sharding_cases
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MESHES = {"data8": ((8, 1, 1), "dp"), "data4_fsdp2": ((4, 2, 1), "fsdp"), "data2_fsdp2_tensor2": ((2, 2, 2), "fsdp_tp")}
# which kernel cases run on which mesh (the tensor mesh: the heads split over tensor by fsdp_tp)
CASES = {"data8": ("hstu", "fm", "flash", "projected", "norm", "rownorm"),
         "data4_fsdp2": ("hstu", "candidates", "fm", "projected", "norm", "rownorm"),
         "data2_fsdp2_tensor2": ("hstu", "flash", "projected")}
N, HEADS, DIM, B = 24, 2, 8, 8
STEPS = 2


def _hstu_inputs():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(B, N, HEADS, DIM)), jnp.float32) for _ in range(4))
    ts = jnp.asarray(1_600_000_000 + np.cumsum(rng.integers(0, 40_000, size=(B, N)), axis=1), jnp.int32)
    pos_w = jnp.asarray(rng.normal(size=2 * N - 1), jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=33), jnp.float32)
    lengths = jnp.asarray([0, 1, 16, 24, 5, 17, 24, 9], jnp.int32)
    cands = jnp.asarray([0, 1, 3, 2, 0, 1, 0, 4], jnp.int32)
    return (q, k, v, pos_w, ts_w), dict(lengths=lengths, ts=ts, cands=cands, cot=cot)


def _jit_vjp(f, cot):
    """jit(args -> (f(*args), the gradients of <f(*args), cot>))."""
    import jax

    def run(*args):
        out, pullback = jax.vjp(f, *args)
        return out, pullback(cot)

    return jax.jit(run)


def _hstu_vjp(impl, fixed):
    from scaling.kernels.hstu_attention import Blocks, hstu_mha

    def f(q, k, v, pos_w, ts_w):
        return hstu_mha(q, k, v, fixed["lengths"], norm=float(N), pos_w=pos_w, ts_w=ts_w, timestamps=fixed["ts"],
                        num_candidates=fixed["cands"], impl=impl, blocks=Blocks.uniform(16))

    return _jit_vjp(f, fixed["cot"])


def _projected_inputs():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(4)
    pre = jnp.asarray(rng.normal(size=(B, N, 4 * HEADS * 16)), jnp.float32)
    cot_u, cot = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((B, N, HEADS * 16), (B, N, HEADS, 16)))
    return pre, (cot_u, cot)


def _projected_vjp(impl, fixed, cot):
    from scaling.kernels.hstu_attention import Blocks, projected_mha

    def f(pre, pos_w, ts_w):
        return projected_mha(pre, fixed["lengths"], heads=HEADS, norm=float(N), alpha=0.5, pos_w=pos_w, ts_w=ts_w,
                             timestamps=fixed["ts"], impl=impl, blocks=Blocks.uniform(16))

    return _jit_vjp(f, cot)


def _norm_inputs():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(6)
    first, second = (jnp.asarray(rng.normal(size=(B, n, 24)), jnp.float32) for n in (5, 3))
    res, cot = (jnp.asarray(rng.normal(size=(B, 8, 24)), jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.normal(size=24), jnp.float32) for _ in range(2))
    return (first, second, res, scale, bias), cot


def _norm_vjp(impl, cot):
    from scaling.kernels.residual_norm import residual_layer_norm

    return _jit_vjp(functools.partial(residual_layer_norm, impl=impl), cot)


def _rownorm_vjp(impl, cot):
    from scaling.kernels.row_norm import gated_layer_norm

    return _jit_vjp(functools.partial(gated_layer_norm, impl=impl), cot)


def _candidate_inputs():
    import jax.numpy as jnp
    import numpy as np

    from scaling.models.hstu_attention import candidate_bias

    rng = np.random.default_rng(1)
    hist, m, max_len = 16, 3, 24
    kh, vh = (jnp.asarray(rng.normal(size=(B, hist, HEADS, DIM)), jnp.float32) for _ in range(2))
    q, k, v = (jnp.asarray(rng.normal(size=(B, m, HEADS, DIM)), jnp.float32) for _ in range(3))
    ts = jnp.asarray(1_000 + np.cumsum(rng.integers(0, 5000, size=(B, hist)), axis=1), jnp.int32)
    now = ts[:, -1] + 7
    pos_w = jnp.asarray(rng.normal(size=2 * max_len - 1), jnp.float32)
    ts_w = jnp.asarray(rng.normal(size=33), jnp.float32)
    lengths = jnp.asarray([16, 1, 9, 0, 12, 16, 3, 7], jnp.int32)
    rab_hist, rab_self = candidate_bias(pos_w, ts_w, ts, lengths, now)
    return (q, k, v, kh, vh, lengths), dict(norm=24.0, rab_hist=rab_hist, rab_self=rab_self, pos_w=pos_w, ts_w=ts_w,
                                             timestamps=ts, request_time=now)


def _flash_inputs():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(3)
    q, cot = (jnp.asarray(rng.normal(size=(B, 12, HEADS, DIM)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, N, HEADS, DIM)), jnp.float32) for _ in range(2))
    return (q, k, v), dict(key_start=jnp.asarray([0, 3, 24, 10, 23, 0, 7, 12], jnp.int32), cot=cot)


def _flash_vjp(impl, fixed):
    from scaling.kernels.flash_attention import FlashBlocks, flash_mha

    def f(q, k, v):  # OneTrans's layout: 12 queries ending at the last of N keys
        return flash_mha(q, k, v, key_start=fixed["key_start"], q_offset=N - 12, impl=impl,
                         blocks=FlashBlocks.uniform(16))

    return _jit_vjp(f, fixed["cot"])


def _fm_inputs():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(2)
    b, n, d, k = 16, 7, 5, 3
    x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, k)) / np.sqrt(n), jnp.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=n * k), jnp.float32)
    bias = jnp.asarray(0.3 * rng.normal(size=n * k), jnp.float32)
    return (x, y, scale, bias), jnp.asarray(rng.normal(size=(b, n * k)), jnp.float32)


def _fm_vjp(impl, cot):
    from scaling.kernels.fm_block import fm_block

    return _jit_vjp(functools.partial(fm_block, eps=1e-5, impl=impl, block_b=4), cot)


def _errors(names, got, want) -> dict[str, float]:
    import jax
    import numpy as np

    out = {}
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        out[name] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6))
    return out


def kernel_cases() -> tuple[dict, dict]:
    import jax
    from jax.sharding import AxisType

    from scaling.kernels.hstu_attention import Blocks, candidate_mha
    from scaling.sharding.rules import load_layout, use_rules

    hstu_args, fixed = _hstu_inputs()
    cand_args, cand_kw = _candidate_inputs()
    fm_args, fm_cot = _fm_inputs()
    flash_args, flash_fixed = _flash_inputs()
    pre, proj_cot = _projected_inputs()
    norm_args, norm_cot = _norm_inputs()
    rownorm_args, rownorm_cot = (norm_args[2], norm_args[2][..., ::-1]), norm_cot  # x and a gate [B, 8, 24]
    proj_args = (pre, *hstu_args[3:])

    def candidates(impl):
        return jax.jit(functools.partial(candidate_mha, impl=impl, blocks=Blocks.uniform(16), **cand_kw))

    # references: the xla path on one device, no mesh
    want = {"hstu": _hstu_vjp("xla", fixed)(*hstu_args), "candidates": candidates("xla")(*cand_args),
            "fm": _fm_vjp("xla", fm_cot)(*fm_args), "flash": _flash_vjp("xla", flash_fixed)(*flash_args),
            "projected": _projected_vjp("xla", fixed, proj_cot)(*proj_args),
            "norm": _norm_vjp("xla", norm_cot)(*norm_args),
            "rownorm": _rownorm_vjp("xla", rownorm_cot)(*rownorm_args)}
    names = {"hstu": ("out", "dq", "dk", "dv", "dpos_w", "dts_w"), "candidates": ("out",),
             "fm": ("out", "dx", "dy", "dscale", "dbias"), "flash": ("out", "dq", "dk", "dv"),
             "projected": ("u", "out", "dpre", "dpos_w", "dts_w"),
             "norm": ("out", "dfirst", "dsecond", "dres", "dscale", "dbias"),
             "rownorm": ("out", "dx", "dgate")}
    results, traced = {}, {}
    for mesh_name, (shape, layout) in MESHES.items():
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        with jax.set_mesh(mesh), use_rules(load_layout(layout)):
            fns = {"hstu": (_hstu_vjp("pallas", fixed), hstu_args), "candidates": (candidates("pallas"), cand_args),
                   "fm": (_fm_vjp("pallas", fm_cot), fm_args), "flash": (_flash_vjp("pallas", flash_fixed), flash_args),
                   "projected": (_projected_vjp("pallas", fixed, proj_cot), proj_args),
                   "norm": (_norm_vjp("pallas", norm_cot), norm_args),
                   "rownorm": (_rownorm_vjp("pallas", rownorm_cot), rownorm_args)}
            for case in CASES[mesh_name]:
                fn, args = fns[case]
                sharded = "shard_map" in str(fn.trace(*args).jaxpr)
                results[f"{mesh_name}/{case}"] = {"sharded": sharded, "errors": _errors(names[case], fn(*args), want[case])}
            if mesh_name == "data4_fsdp2":  # the CUDA branch (compiled kernels, check_vma on): traced, fwd + bwd
                auto = [_hstu_vjp("auto", fixed).trace(*hstu_args), _fm_vjp("auto", fm_cot).trace(*fm_args),
                        _flash_vjp("auto", flash_fixed).trace(*flash_args),
                        _projected_vjp("auto", fixed, proj_cot).trace(*proj_args),
                        _norm_vjp("auto", norm_cot).trace(*norm_args),
                        _rownorm_vjp("auto", rownorm_cot).trace(*rownorm_args)]
                traced[mesh_name] = all(str(t.jaxpr).count("shard_map") >= 2 for t in auto)
    return results, traced


def train_steps() -> dict:
    import jax

    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare
    from tests.sharding_cases import config

    mesh = ["sharding.layout=fsdp", "sharding.mesh.data=4", "sharding.mesh.fsdp=2", "model.num_layers=1"]
    extra = {"hstu": ["model.qk_dim=16", "model.v_dim=16"]}  # heads the fused projection takes
    out = {}
    for family, knobs in {"hstu": "model.attention_impl,model.norm_impl", "wukong": "model.fm_impl,model.norm_impl",
                          "onetrans": "model.attention_impl"}.items():
        setups = {impl: prepare(cfg, dataset_of(cfg.data))
                  for impl, cfg in ((impl, config(family, [*mesh, *extra.get(family, []), *(f"{k}={impl}" for k in knobs.split(","))])) for impl in ("pallas", "xla"))}
        first = setups["xla"]
        batches = first.task.train_iterator(first.config.train.batch_size, first.config.seed)
        batches = [next(batches) for _ in range(STEPS)]
        with first.partitioner.activate():  # one init serves both: the knob changes no parameter
            initial = first.partitioner.init(first.init_state, first.abstract)
        losses = {}
        for impl, setup in setups.items():
            p = setup.partitioner
            with p.activate():
                state = jax.tree.map(lambda x: x.copy(), initial)  # the step donates its state
                step = setup.compile_train_step()
                values = []
                for batch in batches:
                    state, metrics = step(state, p.shard_batch(batch))
                    values.append(metrics["loss"])
            losses[impl] = [float(x) for x in jax.device_get(values)]
        out[family] = losses
    return out


def main() -> None:
    import jax

    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    start = time.perf_counter()
    kernels, traced = kernel_cases()
    steps = train_steps()
    print(json.dumps({"kernels": kernels, "auto_traced": traced, "steps": steps,
                      "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
