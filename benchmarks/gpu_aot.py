"""Compile the bf16 training steps for an NVIDIA H100 or H200 on a machine without one, and read
what XLA made of them: whether the step fits in the GPU's memory, what it launches, and a roofline
of where its time would go.

    python -m benchmarks.gpu_aot [--gpu h100|h200] [--cases hstu,wukong,hstu_stu,onetrans] [--impls pallas,xla]
        [--devices 1] [--top 12] [--hlo-dir DIR] [--triton-python PY] [--dtype bfloat16|float32]
        [--smoke] [--out FILE]

`--dtype float32` compiles the steps at the project's default compute dtype instead (the roofline
then takes the dots at the TF32 peak, 494.7 TFLOP/s, which is how XLA and the kernels run fp32
dots by default).

Needs JAX's CUDA plugin (`pip install -e '.[cuda12]'`), not a GPU: JAX's compile-only client
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`) compiles for
the GPU described below with XLA's real GPU pipeline (fusion, Triton gemms, the Pallas kernels'
Triton lowering to PTX), without autotuning. The steps are those of benchmarks/train_step.py (its
CASES, the same large sizes), built by scaling/train/setup.py as a run builds them, on a mesh of
`--devices` compile-only GPUs. `--impls pallas` runs the kernels through `impl=auto`, which lowers
the kernel branch for the CUDA target; `--impls mosaic` the Mosaic GPU attention of the cases that
have it (train_step.MOSAIC_CASES).

Per case it reports:
  memory    XLA's buffer assignment: arguments + temporaries + outputs not aliased to inputs, per
            device, against the GPU's memory (`fits`)
  kernels   how many launches of each kind (matmul fusions, Pallas kernels, memory-bound fusions,
            gathers/scatters, copies, collectives)
  roofline  benchmarks/hlo_roofline.py on the optimized HLO, at the GPU's datasheet peaks: a lower
            bound on the step's time, its split by kind, the largest items by source line, and
            `mfu_ceiling` = model FLOPs / (bound x peak), the most the step could reach as compiled
            (with the collectives hidden behind the compute, the bound's best case),
            and `matmul_utilization_ceiling`, the same for the matmul FLOPs the program executes.
            The HSTU kernels' FLOPs count the causal pairs of the real batch's lengths (they skip
            blocks past a sequence's end); HSTU's model FLOPs count every position's attention.

These are estimates from the compiled program, not measurements: the GPU session's
benchmarks/train_step.py measures the step. XLA also compiles a Triton kernel that could not
launch (more shared memory than a block may have) without complaint, so with --triton-python PY
every Triton module the step's lowering made (the real shapes, tiles and warps) is also compiled
by benchmarks/kernel_compile.py's ptxas path: registers, spills, shared memory and `fits`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

from benchmarks.gpu_targets import GPUS, GpuTarget, causal_pair_fraction, step_roofline
from benchmarks.json_report import emit
from benchmarks.kernel_compile import compile_ttir
from benchmarks.triton_ir import captured
from benchmarks.train_step import CASES, case_overrides, impls_of


def launch_params(text: str) -> dict[str, tuple[int, int]]:
    """{Pallas kernel name: (num_warps, num_stages)} from the Triton custom calls of HLO text."""
    params = {}
    for m in re.finditer(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text):
        params.setdefault(m.group(1), (int(m.group(3)), int(m.group(2))))
    return params


def kernel_registers(modules: dict[str, str], text: str, triton_python: str) -> list[dict]:
    """Each Triton module the step lowered, compiled for sm_90a by kernel_compile's child process:
    registers, spills, shared memory and whether it fits (XLA's own compile does not check that a
    kernel can launch)."""
    params = launch_params(text)
    jobs, rows = [], []
    for key, path in sorted(modules.items()):
        warps, stages = params.get(key.split("#")[0], (4, 2))
        jobs.append({"ttir": path, "num_warps": warps, "num_stages": stages})
        rows.append({"kernel": key, "num_warps": warps, "num_stages": stages})
    _, results = compile_ttir(jobs, triton_python)
    return [{**row, **result} for row, result in zip(rows, results, strict=True)]


def compile_case(name: str, impl: str, gpu: GpuTarget, devices: list, smoke: bool, top: int, hlo_dir: str,
                 triton_python: str = "", dtype: str = "bfloat16") -> dict:
    """Compile one case's train step for `devices` and read its memory, kernels and roofline (and,
    with `triton_python`, every Pallas kernel's registers and shared memory)."""
    from scaling.config import load_run_config
    from scaling.train.loop import dataset_of
    from scaling.train.setup import prepare

    # the kernels through impl=auto: its CUDA branch lowers for the compile-only GPU
    path, overrides = case_overrides(name, "auto" if impl == "pallas" else impl, smoke=smoke, dtype=dtype)
    config = load_run_config(path, overrides)
    dataset = dataset_of(config.data)
    t0 = time.perf_counter()
    setup = prepare(config, dataset, devices=devices)
    made: list = []
    with setup.partitioner.activate(), tempfile.TemporaryDirectory() as where:
        if triton_python and impl == "pallas":
            # a step may hold no kernel: a block past what its kernel holds runs through XLA
            modules = captured(lambda: made.append(setup.compile_train_step()), where, abstract_mesh=False,
                               required=False)
        else:
            modules = {}
            made.append(setup.compile_train_step())
        compiled = made[0]
        compile_s = time.perf_counter() - t0
        text = compiled.as_text()
        kernels = None
        if triton_python and impl == "pallas":
            kernels = kernel_registers(modules, text, triton_python) if modules else []
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}_{impl}.hlo.txt"), "w") as f:
            f.write(text)
    batch = next(iter(setup.task.train_iterator(config.train.batch_size, config.seed)))
    fraction = causal_pair_fraction(batch)
    mem = compiled.memory_analysis()
    per_device = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    report = step_roofline(text, gpu, fraction, len(devices), top, dtype)
    peak = gpu.peak_flops(dtype)
    model_flops = 3 * float(config.model.flops_per_example(dataset.spec)) * config.train.batch_size / len(devices)
    best = report["seconds_overlapped"]
    return {
        "model": name, "impl": impl, "dtype": dtype, "devices": len(devices), "batch_size": config.train.batch_size,
        "overrides": overrides, "compile_s": compile_s,
        "memory": {"argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                   "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
                   "per_device_bytes": per_device, "device_bytes": gpu.memory_bytes,
                   "fits": per_device <= gpu.memory_bytes},
        "causal_pair_fraction": fraction,
        "model_tflops_per_device_step": model_flops / 1e12,
        "compiled_matmul_tflops": report["flops"] / 1e12,
        "bound_ms": 1e3 * report["seconds"],
        "bound_overlapped_ms": 1e3 * report["seconds_overlapped"],
        "mfu_ceiling": model_flops / (best * peak) if best else 0.0,
        "matmul_utilization_ceiling": report["flops"] / (best * peak) if best else 0.0,
        "by_kind": report["by_kind"],
        "top": report["top"],
        "warnings": report["warnings"],
        **({"pallas_kernels": kernels} if kernels is not None else {}),
    }


def summary_line(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:9s} {row['impl']:6s} error: {row['error']}"
    mem = row["memory"]
    kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in sorted(row["by_kind"].items(), key=lambda kv: -kv[1]["seconds"])
                      if v["share"] >= 0.01)
    launches = sum(v["kernels"] for v in row["by_kind"].values())
    extra = (f" ({row['bound_overlapped_ms']:.2f} with collectives hidden)"
             if row["bound_overlapped_ms"] < row["bound_ms"] else "")
    if row.get("pallas_kernels") == []:
        extra += ", no Pallas kernel (the blocks run through XLA)"
    elif "pallas_kernels" in row:
        misfits = [k["kernel"] for k in row["pallas_kernels"] if not k.get("fits")]
        extra += (f", kernels that would spill or not launch: {', '.join(misfits)}" if misfits
                  else f", all {len(row['pallas_kernels'])} Pallas kernels fit")
    return (f"{row['model']:9s} {row['impl']:6s} {mem['per_device_bytes'] / 2**30:6.1f} GiB "
            f"({'fits' if mem['fits'] else 'DOES NOT FIT'}), {launches} launches, bound {row['bound_ms']:.2f} ms{extra} "
            f"[{kinds}], MFU ceiling {row['mfu_ceiling']:.0%} (executed matmuls {row['matmul_utilization_ceiling']:.0%})")


def has_cuda_plugin() -> bool:
    """Whether JAX's CUDA 12 plugin (the `cuda12` extra) is installed."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def compile_only_devices(gpu: GpuTarget, count: int) -> list:
    """`count` compile-only devices of the target GPU (one host), from JAX's CUDA plugin."""
    import jax
    from jax.experimental import topologies

    jax.config.update("jax_platforms", "cpu")  # no GPU here: the CPU client runs, the GPU one only compiles
    topology = topologies.get_topology_desc(platform="cuda", target_config=gpu.target_config(),
                                            topology=f"1x1x{count}")
    return list(topology.devices)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--impls", default="pallas,xla",
                        help="pallas (the kernels, via impl=auto), xla, mosaic (cases with the Mosaic GPU attention)")
    parser.add_argument("--devices", type=int, default=1, help="GPUs on the mesh (one host)")
    parser.add_argument("--top", type=int, default=12, help="largest roofline items to list per case")
    parser.add_argument("--hlo-dir", default="", help="also write each optimized HLO text here")
    parser.add_argument("--smoke", action="store_true", help="the tiny sizes of train_step --smoke")
    parser.add_argument("--triton-python", default="",
                        help="a Python with the `triton` package: also compile every Pallas kernel of the step "
                             "for sm_90a and report registers, spills and shared memory (kernel_compile)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="train.compute_dtype (float32: the dots at the TF32 peak, as XLA runs them by default)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    bad_impls = [i for i in args.impls.split(",") if i not in ("pallas", "xla", "mosaic")]
    if unknown or bad_impls or args.devices < 1:
        print(f"gpu_aot: --cases must name {', '.join(CASES)} (got {', '.join(unknown) or 'ok'}), --impls "
              f"pallas, xla or mosaic (got {', '.join(bad_impls) or 'ok'}), --devices >= 1", file=sys.stderr)
        return 2
    if args.triton_python and shutil.which(args.triton_python) is None:
        print(f"gpu_aot: --triton-python {args.triton_python!r} is not an executable Python", file=sys.stderr)
        return 2
    if not has_cuda_plugin():
        print("gpu_aot: JAX's CUDA plugin is not installed; pip install -e '.[cuda12]' (no GPU needed)", file=sys.stderr)
        return 2
    gpu = GPUS[args.gpu]
    devices = compile_only_devices(gpu, args.devices)
    import jax

    rows = []
    for name in args.cases.split(","):
        for impl in impls_of(name, args.impls.split(",")):
            try:
                row = compile_case(name, impl, gpu, devices, args.smoke, args.top, args.hlo_dir, args.triton_python,
                                   args.dtype)
            except Exception as err:  # noqa: BLE001 - one case failing to compile leaves the others
                row = {"model": name, "impl": impl, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            rows.append(row)
            print(summary_line(row), file=sys.stderr)
    emit({"benchmark": "gpu_aot", "gpu": gpu.description, "devices": args.devices, "jax": jax.__version__,
          "dtype": args.dtype, "peak_tflops": gpu.peak_flops(args.dtype) / 1e12, "hbm_tb_per_s": gpu.bandwidth / 1e12,
          "smoke": args.smoke, "estimate": "compiled without a GPU; roofline bounds, not measurements",
          "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
