"""Training-step benchmark: step time, examples/s and MFU of HSTU, Wukong and OneTrans in bf16,
with the Pallas kernels (`impl=pallas`) against the XLA references (`impl=xla`).

    python -m benchmarks.train_step [--out FILE] [--smoke] [--steps 20] [--cases hstu,wukong,hstu_stu,onetrans]
        [--impls pallas,mosaic,xla]

Each case is a sweep config (sweeps/*.yaml) with large-size overrides, `train.compute_dtype=
bfloat16` and the kernel knobs (HSTU: model.attention_impl and model.norm_impl, its attention and
LayerNorm kernels; OneTrans: model.attention_impl, the softmax attention; Wukong: model.fm_impl
and model.norm_impl, the FM block and the layer output's residual LayerNorm). `hstu_stu` is the
HSTU case without the relative bias, the one `impl=mosaic` applies to: its attention on the Mosaic
GPU kernels, its LayerNorms on the Triton ones. The step is the training code's own: the
model, task, optimizers and `StepFunctions.train_step` are built as scaling/train/loop.py builds
them (one device, state donated), and timed on one real batch repeated `--steps` times after a
compile + warm-up step (wall clock, block_until_ready at the end).

    examples/s = batch x steps / seconds
    MFU        = 3 x forward FLOPs/example (the family's analytic `flops_per_example`, the figure run
                 records carry; HSTU's counts the full N x N attention) x examples/s
                 / the bf16 matmul TFLOP/s measured in the same process

On an H100 / H200 (or any device with --roofline h100) each row also carries the roofline of the
step XLA compiled (benchmarks/hlo_roofline.py at the GPU's datasheet peaks: its bound, the bound's
split by kind and largest source lines) and `fraction_of_roofline` = bound / measured step time:
how close the step ran to what its compiled program allows, and where the rest must have gone.

--smoke runs tiny sizes for 5 timed steps (CPU: the kernels in interpret mode, the Mosaic GPU
attention as the jnp reference) to check the script works. --out is rewritten after each row, so a
run cut short by a time limit keeps the rows it finished ("complete": false).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.json_report import emit
from benchmarks.gpu_targets import GPUS, GpuTarget, causal_pair_fraction, gpu_of, step_roofline
from benchmarks.kernels import matmul_tflops
from scaling.atomic_json import write_json
from scaling.config import load_run_config
from scaling.models.registry import build_model
from scaling.train.loop import dataset_of
from scaling.train.optimizers import dense_optimizer, embedding_optimizer
from scaling.train.step import StepFunctions, split_model
from scaling.train.tasks import make_task

SWEEPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps")

AIMED = ("hstu", "wukong")  # the training-step MFU aims of the kernels' issue are for these
# HSTU at industrial width (d=1024, 8 heads of 128: the kernels' d=128 case) on 1024-event
# histories of mean length 600 (256 users: the step reads one batch of 32)
_HSTU_LARGE = [
    "model.size=custom", "model.embed_dim=1024", "model.num_layers=8", "model.num_heads=8", "model.qk_dim=128",
    "model.v_dim=128", "model.max_len=1024", "model.dropout=0.0", "data.max_length=1024", "data.mean_length=600",
    "data.num_users=256", "data.num_items=20000", "train.batch_size=32",
]
# name -> (sweep config, kernel knobs (comma-separated: all set to the impl), large overrides, smoke overrides)
CASES: dict[str, tuple[str, str, list[str], list[str]]] = {
    "hstu": ("hstu_synthetic.yaml", "model.attention_impl,model.norm_impl", _HSTU_LARGE, [
        "model.size=xs", "model.max_len=32", "model.dropout=0.0", "data.num_users=64", "data.num_items=200",
        "data.num_negatives=8", "train.batch_size=4",
    ]),
    # Wukong at the scale of the paper's Table 5 (l=8, n_F=n_L=48, k=48, FMB MLP 3x4096, d=160: the
    # ladder's xl, at d=16, is memory-bound whatever the kernels do) on a 96-field CTR world.
    "wukong": ("quickstart.yaml", "model.fm_impl,model.norm_impl", [
        "model.size=custom", "model.embed_dim=160", "model.num_layers=8", "model.num_fm=48", "model.num_lcb=48",
        "model.fm_rank=48", "model.fmb_mlp_width=4096", "model.fmb_mlp_depth=3", "model.top_mlp=[1024,512]",
        "model.dense_mlp=[512,256]", "data.num_fields=96", "train.batch_size=8192", "data.eval_examples=4096",
    ], [
        "model.size=xxs", "train.batch_size=16", "data.eval_examples=256",
    ]),
    # The same HSTU without the relative bias (the newer STU form, `relative_bias: false`): the case
    # where impl=mosaic runs the Mosaic GPU attention kernels, against the Triton ones and XLA
    "hstu_stu": ("hstu_synthetic.yaml", "model.attention_impl,model.norm_impl", [
        *_HSTU_LARGE, "model.relative_bias=false",
    ], [
        "model.size=custom", "model.embed_dim=64", "model.num_layers=1", "model.num_heads=1", "model.qk_dim=64",
        "model.v_dim=64", "model.max_len=32", "model.relative_bias=false", "model.dropout=0.0", "data.num_users=64",
        "data.num_items=200", "data.num_negatives=8", "train.batch_size=4",
    ]),
    # OneTrans near the paper's OneTrans-L (8 layers, d=384) on 2 x 256-event sequences
    "onetrans": ("onetrans_synthetic.yaml", "model.attention_impl", [
        "model.size=custom", "model.dim=384", "model.num_layers=8", "model.num_heads=8", "model.ffn_dim=1536",
        "model.num_ns=16", "data.seq_len=256", "train.batch_size=512", "data.eval_examples=2048",
    ], [
        "model.size=xs", "train.batch_size=8", "data.eval_examples=256",
    ]),
}
MOSAIC_CASES = ("hstu_stu",)  # impl=mosaic: the attention on Mosaic GPU, the Triton kernels for the rest


def impls_of(name: str, impls: list[str]) -> list[str]:
    """The impls of `impls` that case `name` runs: mosaic only where MOSAIC_CASES has it."""
    return [i for i in impls if i != "mosaic" or name in MOSAIC_CASES]


def case_overrides(name: str, impl: str, *, smoke: bool, dtype: str = "bfloat16") -> tuple[str, list[str]]:
    """(sweep config path, overrides) of CASES[name] with its kernel knobs at `impl` (auto | pallas
    | xla | mosaic: the attention on Mosaic GPU, the other knobs auto), in `dtype`, without
    evaluation, progress or W&B: what this benchmark and benchmarks/gpu_aot.py compile."""
    path, knobs, large, small = CASES[name]
    # auto: the kernels on a GPU, compile-only ones included (pallas would interpret them there)
    values = [impl if impl != "mosaic" or k == "model.attention_impl" else "auto" for k in knobs.split(",")]
    return os.path.join(SWEEPS, path), [*(small if smoke else large), f"train.compute_dtype={dtype}",
                                        "train.eval_every=0", "logging.progress=false", "logging.wandb.mode=disabled",
                                        *(f"{k}={v}" for k, v in zip(knobs.split(","), values))]


def step_time(config, steps: int, dataset=None, roofline_gpu: GpuTarget | None = None) -> dict:
    """Build the run's step exactly as the training loop does and time it on one batch (`dataset`:
    the config's data, when already built); with `roofline_gpu`, also bound the compiled step at
    that GPU's peaks (benchmarks/gpu_targets.py) and say what fraction of the bound it ran at."""
    dataset = dataset if dataset is not None else dataset_of(config.data)
    spec = dataset.spec
    model = build_model(config.model, spec, rngs=nnx.Rngs(config.seed))
    flops = float(config.model.flops_per_example(spec))
    graphdef, embed, dense, rngs = split_model(model)
    del model
    task = make_task(config, dataset, None)
    tr, opt = config.train, config.optimizer
    fns = StepFunctions(
        graphdef=graphdef,
        dense_tx=dense_optimizer(opt.dense, opt.schedule, tr.steps),
        embed_tx=embedding_optimizer(opt.embedding, opt.dense, opt.schedule, tr.steps),
        compute_dtype=jnp.bfloat16 if tr.compute_dtype == "bfloat16" else jnp.float32,
        task=task,
    )
    state = jax.jit(fns.init_state)(dense, embed, rngs)
    batch = {k: jnp.asarray(v) for k, v in next(iter(task.train_iterator(tr.batch_size, config.seed))).items()}
    t0 = time.perf_counter()
    step = jax.jit(fns.train_step, donate_argnums=0).lower(state, batch).compile()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    row = {"batch_size": tr.batch_size, "gflops_per_example": flops / 1e9, "compile_and_first_step_s": compile_s,
           "step_ms": 1e3 * seconds, "examples_per_s": tr.batch_size / seconds,
           "train_tflops": 3 * flops * tr.batch_size / seconds / 1e12, "loss": float(metrics["loss"])}
    if roofline_gpu is not None:  # the bound of the program that ran, beside its time
        bound = step_roofline(step.as_text(), roofline_gpu, causal_pair_fraction(batch), top=6)
        row.update(roofline_ms=1e3 * bound["seconds"], fraction_of_roofline=bound["seconds"] / seconds,
                   roofline_shares={k: v["share"] for k, v in bound["by_kind"].items()}, roofline_top=bound["top"])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (after one warm-up)")
    parser.add_argument("--impls", default="pallas,mosaic,xla",
                        help="pallas (the kernels), xla (the references), mosaic (hstu_stu's Mosaic GPU attention)")
    parser.add_argument("--smoke", "--small", action="store_true", help="tiny sizes, 5 steps (CPU: interpret mode)")
    parser.add_argument("--roofline", choices=["auto", "none", *GPUS], default="auto",
                        help="bound each compiled step at this GPU's datasheet peaks (auto: the device's, if an H100/H200)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    cases, impls = args.cases.split(","), args.impls.split(",")
    unknown = [c for c in cases if c not in CASES] + [i for i in impls if i not in ("pallas", "xla", "mosaic", "auto")]
    if unknown:
        print(f"train_step: unknown {', '.join(unknown)}: --cases takes {', '.join(CASES)}; --impls pallas, xla, "
              "mosaic, auto", file=sys.stderr)
        return 2
    roofline_gpu = (gpu_of(jax.devices()[0].device_kind) if args.roofline == "auto"
                    else None if args.roofline == "none" else GPUS[args.roofline])
    steps = 5 if args.smoke else args.steps
    peak = matmul_tflops(256 if args.smoke else 8192, 3 if args.smoke else 10)
    rows = []
    datasets: dict = {}  # by data config: the impls of a model share one data set
    # The models the MFU aims are for (HSTU, Wukong) first, impl by impl (the kernels first), then
    # the others case by case: a run cut short by a time limit keeps what the aims need
    plan = [(name, impl) for impl in impls for name in cases if name in AIMED and impl in impls_of(name, impls)]
    plan += [(name, impl) for name in cases if name not in AIMED for impl in impls_of(name, impls)]
    result = {"benchmark": "train_step", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "interpret": jax.default_backend() != "gpu", "jax": jax.__version__, "smoke": args.smoke,
              "matmul_bf16_tflops": peak, "complete": False, "rows": rows}
    for name, impl in plan:
        path, overrides = case_overrides(name, impl, smoke=args.smoke)
        overrides.append(f"train.steps={steps + 1}")
        row = {"model": name, "impl": impl, "overrides": overrides}
        try:
            config = load_run_config(path, overrides)
            if config.data not in datasets:
                datasets[config.data] = dataset_of(config.data)
            row.update(step_time(config, steps, datasets[config.data], roofline_gpu))
            row["mfu"] = row["train_tflops"] / peak
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large size
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if args.out:  # what is finished survives a time limit
            write_json(args.out, result, indent=2)
    result["complete"] = True
    emit(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
