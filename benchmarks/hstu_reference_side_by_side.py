"""HSTU attention side by side: generative-recommenders' Triton `triton_hstu_mha` (PyTorch) against
this repo's Pallas kernel and XLA reference (JAX), on the same shapes, without the relative bias.

    python -m benchmarks.hstu_reference_side_by_side [--gr-path DIR] [--out FILE] [--smoke]
        [--lengths 512,1024,2048,4096,8192] [--dims 128,64] [--tokens 32768] [--heads 4]
        [--iters 20] [--impls gr,pallas,mosaic,mosaic_serial,mosaic_fused,xla]

--gr-path (or the GR_PATH environment variable): a directory holding the `generative_recommenders`
package (a checkout of github.com/meta-recsys/generative-recommenders; only PyTorch and Triton are
needed to import its Triton attention). If it cannot be imported, or PyTorch sees no CUDA device,
the `gr` rows are skipped with the reason in `gr_skipped` and the JAX rows still run.

Both compute, per sequence and head, out_i = sum_{j <= i} silu(q_i . k_j) / N v_j (alpha = 1,
norm = N, causal with the diagonal, no bias): GR on its jagged [B * L, h, d] layout with
seq_offsets, this repo on [B, L, h, d] with lengths. The shapes follow benchmarks/kernels.py: for
each length L and head dim d, B = tokens / L full-length sequences, bf16. Times are wall clock per
call after a warm-up call (GR's warm-up includes its Triton autotuning, reported as
`first_call_s`), median of --iters calls, synchronised (torch.cuda.synchronize /
block_until_ready). FLOPs: kernels.py's causal model FLOPs (fwd 4 d B h L (L + 1) / 2,
fwd + bwd 3.5x). The pallas and mosaic rows also report `vs_gr_max_rel_err`, max |out - out_gr| /
max |out_gr| of the forward on the same inputs, and the rows after pallas `vs_pallas_max_rel_err`
likewise. `mosaic` is the Mosaic GPU kernels (scaling/kernels/hstu_attention_mgpu.py) as they
default, `mosaic_serial` the same without the consumers' ping-pong, `mosaic_fused` with one dK/dV
kernel where the default splits it (d > 64).

JAX is told not to preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless set) so
that PyTorch and JAX share the device. --smoke: tiny shapes (on CPU the Pallas kernel is
interpreted and the gr rows are skipped) to check that the script runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


def _median_time(call, sync, iters: int) -> tuple[float, float]:
    """(first call seconds, median seconds of the next `iters` calls)."""
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def load_gr(path: str):
    """(GR's triton_hstu_mha, None) or (None, why not)."""
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return None, f"PyTorch not importable: {type(err).__name__}: {err}"
    if not torch.cuda.is_available():
        return None, "PyTorch sees no CUDA device (GR's Triton kernel needs one)"
    if path:
        if not os.path.isdir(os.path.join(path, "generative_recommenders")):
            return None, f"{path!r} holds no generative_recommenders/ package"
        sys.path.insert(0, os.path.abspath(path))
    try:
        module = importlib.import_module("generative_recommenders.ops.triton.triton_hstu_attention")
        return module.triton_hstu_mha, None
    except Exception as err:  # noqa: BLE001
        where = path or "sys.path (no --gr-path / GR_PATH given)"
        return None, f"generative_recommenders' triton_hstu_mha not importable from {where}: {type(err).__name__}: {err}"


def gr_caller(fn, length: int, offsets):
    """fn's keyword arguments for causal, alpha = 1, norm = N attention (the signature has changed
    between GR versions: N / max_seq_len, an explicit causal flag, an attn_scale tensor)."""
    import torch

    params = inspect.signature(fn).parameters
    fixed = {"alpha": 1.0, "seq_offsets": offsets}
    fixed["N" if "N" in params else "max_seq_len"] = length
    if "causal" in params:
        fixed["causal"] = True
    if "attn_scale" in params and params["attn_scale"].default is inspect.Parameter.empty:
        fixed["attn_scale"] = torch.tensor(1.0 / length, device=offsets.device)
    if "invalid_attn_mask_type" in params:
        fixed["invalid_attn_mask_type"] = "lower_triangular"

    def call(q, k, v):
        return fn(q=q, k=k, v=v, **fixed)

    return call


def bench_gr(fn, arrays, length: int, iters: int) -> tuple[dict, np.ndarray]:
    import torch

    q, k, v, cot = (torch.from_numpy(a).to("cuda", torch.bfloat16) for a in arrays)
    batch, _, heads, dim = q.shape
    jag = [t.reshape(batch * length, heads, -1).contiguous() for t in (q, k, v, cot)]
    offsets = torch.arange(0, (batch + 1) * length, length, dtype=torch.int64, device="cuda")
    call = gr_caller(fn, length, offsets)

    def sync(_):
        torch.cuda.synchronize()

    qg, kg, vg = (t.clone().requires_grad_(True) for t in jag[:3])
    row = {}
    row["fwd_first_call_s"], fwd = _median_time(lambda: call(*jag[:3]), sync, iters)

    def forward_backward():
        o = call(qg, kg, vg)
        return torch.autograd.grad(o, (qg, kg, vg), jag[3])

    row["fwd_bwd_first_call_s"], both = _median_time(forward_backward, sync, iters)
    row["fwd_ms"], row["fwd_bwd_ms"] = 1e3 * fwd, 1e3 * both
    with torch.no_grad():
        out = call(*jag[:3])
    return row, out.float().reshape(batch, length, heads, -1).cpu().numpy()


def bench_jax(impl: str, arrays, length: int, iters: int, blocks) -> tuple[dict, np.ndarray]:
    import jax
    import jax.numpy as jnp

    from scaling.kernels.hstu_attention import hstu_mha
    from scaling.kernels.hstu_attention_mgpu import MosaicBlocks, mosaic_mha

    q, k, v, cot = (jnp.asarray(a, jnp.bfloat16) for a in arrays)
    lengths = jnp.full((q.shape[0],), length, jnp.int32)

    def forward(q, k, v):
        if impl.startswith("mosaic"):
            variant = MosaicBlocks(pingpong=impl != "mosaic_serial",
                                   split_dkdv=False if impl == "mosaic_fused" else None)
            return mosaic_mha(q, k, v, lengths, norm=float(length), blocks=variant)
        return hstu_mha(q, k, v, lengths, norm=float(length), impl=impl, blocks=blocks if impl == "pallas" else None)

    def forward_backward(q, k, v):
        out, pullback = jax.vjp(forward, q, k, v)
        return out, pullback(cot)

    fwd_fn, both_fn = jax.jit(forward), jax.jit(forward_backward)
    row = {}
    row["fwd_first_call_s"], fwd = _median_time(lambda: fwd_fn(q, k, v), jax.block_until_ready, iters)
    row["fwd_bwd_first_call_s"], both = _median_time(lambda: both_fn(q, k, v), jax.block_until_ready, iters)
    row["fwd_ms"], row["fwd_bwd_ms"] = 1e3 * fwd, 1e3 * both
    return row, np.asarray(fwd_fn(q, k, v).astype(jnp.float32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gr-path", default=os.environ.get("GR_PATH", ""),
                        help="directory holding generative_recommenders/ (default: $GR_PATH)")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--dims", default="128,64", help="head dims, in order (128 first: a run cut short keeps "
                        "the d = 128 rows the speed targets are read from)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / L)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--impls", default="gr,pallas,mosaic,mosaic_serial,mosaic_fused,xla",
                        help="any of gr (GR's Triton), pallas, mosaic, mosaic_serial, mosaic_fused (Mosaic "
                        "GPU), xla")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: interpreted Pallas, no gr)")
    parser.add_argument("--out", default="", help="also write the JSON here (rewritten after every row)")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    known = {"gr", "pallas", "mosaic", "mosaic_serial", "mosaic_fused", "xla"}
    if set(impls) - known:
        parser.error(f"unknown --impls entries: {sorted(set(impls) - known)}")

    import jax

    from benchmarks.kernels import hstu_forward_flops
    from scaling.atomic_json import write_json
    from scaling.kernels.hstu_attention import Blocks

    if args.smoke:
        lengths, dims, tokens, heads, iters, blocks = [32, 64], [64], 128, 2, 1, Blocks.uniform(16)
    else:
        lengths, dims = [int(x) for x in args.lengths.split(",")], [int(x) for x in args.dims.split(",")]
        tokens, heads, iters, blocks = args.tokens, args.heads, args.iters, None

    gr, why = (None, "not asked for (--impls)") if "gr" not in impls else load_gr(args.gr_path)
    if "gr" in impls and gr is None:
        print(f"hstu_reference_side_by_side: skipping GR's Triton hstu_mha: {why}", file=sys.stderr)
    result = {"benchmark": "hstu_reference_side_by_side", "jax_device": jax.devices()[0].device_kind,
              "jax_backend": jax.default_backend(), "interpret": jax.default_backend() != "gpu", "smoke": args.smoke,
              "gr_path": args.gr_path, "gr_skipped": None if gr is not None else why, "tokens": tokens,
              "flops_convention": "causal model FLOPs: fwd = 4 d B h L(L+1)/2, fwd+bwd = 3.5 x fwd", "rows": []}
    if gr is not None:
        import torch

        result["torch"], result["torch_device"] = torch.__version__, torch.cuda.get_device_name()

    def emit(row):
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
        if args.out:
            write_json(args.out, result, indent=2)

    for dim in dims:
        for length in lengths:
            batch = max(1, tokens // length)
            rng = np.random.default_rng(0)
            arrays = [(rng.normal(size=(batch, length, heads, dim)) * 0.5).astype(np.float32) for _ in range(4)]
            fwd_flops = hstu_forward_flops(batch, heads, length, dim)
            gr_out = pallas_out = None
            for impl in impls:
                if impl == "gr" and gr is None:
                    continue
                row = {"impl": impl, "L": length, "d": dim, "heads": heads, "batch": batch, "dtype": "bfloat16",
                       "fwd_gflop": fwd_flops / 1e9}
                try:
                    if impl == "gr":
                        timing, gr_out = bench_gr(gr, arrays, length, iters)
                    else:
                        timing, out = bench_jax(impl, arrays, length, iters, blocks)
                        for name, other in (("gr", gr_out), ("pallas", pallas_out)):
                            if other is not None:
                                row[f"vs_{name}_max_rel_err"] = float(np.abs(out - other).max()
                                                                      / max(np.abs(other).max(), 1e-12))
                        pallas_out = out if impl == "pallas" else pallas_out
                    row.update(timing)
                    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
                except Exception as err:  # noqa: BLE001 - e.g. out of memory at the largest L
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                emit(row)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
