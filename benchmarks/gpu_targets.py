"""What the roofline (benchmarks/hlo_roofline.py) knows about the GPUs and about this repo's kernels:
the datasheet figures of an H100 / H200 (also the TargetConfig XLA compiles for without one), the
matmul FLOPs of the Pallas kernels (HLO reports none for a custom call), the bytes of those that
touch only part of an operand, and one call that bounds
a compiled step. Used by benchmarks/gpu_aot.py (compiled without a GPU) and benchmarks/train_step.py
(compiled on the GPU, beside the measured step time)."""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.hlo_roofline import ITEMSIZE, roofline, shape_dims, top_sources
from benchmarks.kernel_profile import FLOPS_PER_PAIR
from scaling.kernels.flash_attention import flops_per_pair, visible_pairs


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """The datasheet figures XLA's GPU compiler is given (its TargetConfig) and the roofline uses."""

    description: str
    memory_bytes: int
    bandwidth: float          # HBM bytes/s
    bf16_flops: float         # dense bf16 tensor-core FLOP/s
    nvlink: float             # bytes/s each way per GPU (collectives)
    tf32_flops: float = 494.7e12  # dense TF32 tensor-core FLOP/s: what float32 dots run at by default
    sms: int = 132
    clock_ghz: float = 1.98
    l2_bytes: int = 50 * 2**20
    compute_capability: tuple[int, int] = (9, 0)

    def peak_flops(self, dtype: str) -> float:
        """The matmul peak for a step computing in `dtype` (bfloat16, or float32's TF32 dots)."""
        return self.tf32_flops if dtype == "float32" else self.bf16_flops

    def target_config(self) -> str:
        """The TargetConfig text proto (xla/stream_executor/device_description.proto)."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {self.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.description}"
"""


GPUS = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", memory_bytes=80 * 10**9, bandwidth=3.35e12, bf16_flops=989.4e12,
                      nvlink=450e9),
    "h200": GpuTarget("NVIDIA H200", memory_bytes=141 * 10**9, bandwidth=4.8e12, bf16_flops=989.4e12, nvlink=450e9),
}


def pallas_flops(pair_fraction: float):
    """kernel_flops for hlo_roofline: the matmul FLOPs of our Pallas kernels from their operands.

    HSTU attention (operands lengths, n_hist, q [B, N, h, d], ...): FLOPS_PER_PAIR x d x causal
    pairs, the pairs scaled by `pair_fraction` (the batch's sum of L (L + 1) / 2 over B N (N + 1) / 2:
    the kernels skip blocks past a sequence's end). Softmax attention (key_start, key_end, q [B, Nq,
    H, d], k [B, Nk, H, d], v): `flash_attention.flops_per_pair` x the causal pairs of queries
    ending at the last key (OneTrans's layout; key padding, which the kernels skip, is counted).
    Wukong FM block (x [B, n, d], y [n, k], padded): X^T Y and X P, 4 B n d k forward, 12 B n d k
    backward."""

    def flops(name: str, operands: list[str]) -> float:
        arrays = [dims for t in operands for _, dims in shape_dims(t)]
        if name in FLOPS_PER_PAIR and len(arrays) > 2 and len(arrays[2]) == 4:
            b, n, h, d = arrays[2]
            return FLOPS_PER_PAIR[name] * d * b * h * n * (n + 1) / 2 * pair_fraction
        if name.startswith("flash_attention_") and len(arrays) > 4:  # key_start, key_end, q, k, v, ...
            (b, nq, h, d), nk, dv = arrays[2], arrays[3][1], arrays[4][3]
            return flops_per_pair(name, d, dv) * b * h * visible_pairs(nq, nk, nk - nq, True)
        if name.startswith("wukong_fm_block") and len(arrays) > 1:
            (b, n, d), (_, k) = arrays[0], arrays[1]
            return (4 if name.endswith("fwd") else 12) * b * n * d * k
        return 0.0

    return flops


# The share of a packed HSTU projection [B, N, 4, h, d] (sections u, v, q, k) each backward kernel
# touches (scaling/kernels/hstu_attention_bwd.py's `Packed`): dK/dV reads and writes u, v, k; dQ
# reads q's pre-activation and writes q's section of dK/dV's buffer in place, never reading it.
_PACKED_SHARE = {"hstu_attention_dkdv": ((0.75,), 0.75), "hstu_attention_dq": ((0.25, 0.0), 0.25)}


def pallas_bytes(name: str, operands: list[str], result: str) -> float | None:
    """kernel_bytes for hlo_roofline: the bytes HSTU's fused-projection backward kernels touch of
    their packed [B, N, 4, h, d] operands and result (`_PACKED_SHARE`, in operand order); None (whole
    operands) for every other kernel."""
    if name not in _PACKED_SHARE or not any(len(d) == 5 for t in operands for _, d in shape_dims(t)):
        return None
    operand_shares, result_share = _PACKED_SHARE[name]
    packed = iter(operand_shares)
    total = 0.0
    for text in operands:
        for dtype, dims in shape_dims(text):
            share = next(packed, 1.0) if len(dims) == 5 else 1.0
            total += share * ITEMSIZE[dtype] * int(np.prod(dims))
    for dtype, dims in shape_dims(result):
        total += (result_share if len(dims) == 5 else 1.0) * ITEMSIZE[dtype] * int(np.prod(dims))
    return total


def causal_pair_fraction(batch: dict) -> float:
    """Sum of L (L + 1) / 2 over B N (N + 1) / 2 for a sequence batch with `lengths`; 1 otherwise."""
    if "lengths" not in batch or "items" not in batch:
        return 1.0
    lengths = np.asarray(batch["lengths"], np.float64)
    n = np.asarray(batch["items"]).shape[1]
    return float((lengths * (lengths + 1) / 2).sum() / (len(lengths) * n * (n + 1) / 2))


def gpu_of(device_kind: str) -> GpuTarget | None:
    """The target whose name is in a JAX device_kind ('NVIDIA H100 80GB HBM3' -> h100), or None."""
    kind = device_kind.lower()
    return next((gpu for name, gpu in GPUS.items() if name in kind), None)


def step_roofline(text: str, gpu: GpuTarget, pair_fraction: float = 1.0, devices: int = 1, top: int = 12,
                  dtype: str = "bfloat16") -> dict:
    """hlo_roofline's report of a compiled step's HLO text at `gpu`'s peaks for `dtype`,
    summarised (JSON-ready)."""
    report = roofline(text, gpu.peak_flops(dtype), gpu.bandwidth, kernel_flops=pallas_flops(pair_fraction),
                      kernel_bytes=pallas_bytes, collective_bandwidth=gpu.nvlink if devices > 1 else None)
    return {"seconds": report["seconds"], "seconds_overlapped": report["seconds_overlapped"],
            "flops": report["flops"], "bytes": report["bytes"], "by_kind": report["by_kind"],
            "top": top_sources(report["kernels"], top), "warnings": report["warnings"]}
