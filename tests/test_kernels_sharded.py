"""The Pallas kernels on a multi-device mesh (scaling/kernels/sharded.py).

The 8-device cases run in one subprocess (tests/kernel_sharding_cases.py: XLA_FLAGS must be set
before JAX starts): HSTU attention, M-FALCON's candidate attention, the FM block and the softmax
attention, HSTU's fused projection and LayerNorms and the Wukong layer's residual LayerNorm with impl=pallas (interpreted) under data=8, data=4 x fsdp=2 and data=2 x fsdp=2 x
tensor=2 meshes equal the single-device xla path in fp32 (forward and every gradient, rtol 1e-5),
and a one-layer HSTU, Wukong and OneTrans trained through the partitioner give the same losses
with the kernels on and off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cases() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_sharding_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_on_8_devices_equal_the_single_device_reference(cases):
    kernels = cases["kernels"]
    for mesh in ("data8", "data4_fsdp2", "data2_fsdp2_tensor2"):
        assert f"{mesh}/hstu" in kernels, mesh
    assert "data8/fm" in kernels and "data4_fsdp2/fm" in kernels and "data4_fsdp2/candidates" in kernels
    assert "data8/flash" in kernels and "data2_fsdp2_tensor2/flash" in kernels
    assert all(f"{mesh}/projected" in kernels for mesh in ("data8", "data4_fsdp2", "data2_fsdp2_tensor2"))
    assert "data8/norm" in kernels and "data4_fsdp2/norm" in kernels
    assert "data8/rownorm" in kernels and "data4_fsdp2/rownorm" in kernels
    for name, case in kernels.items():
        assert case["sharded"], f"{name}: the kernel did not run under shard_map"
        for tensor, err in case["errors"].items():
            assert err <= 1e-5, f"{name} {tensor}: relative error {err}"


def test_the_compiled_kernel_branch_traces_on_the_mesh(cases):
    assert cases["auto_traced"] and all(cases["auto_traced"].values())


def test_train_steps_with_and_without_the_kernels_agree(cases):
    assert set(cases["steps"]) == {"hstu", "wukong", "onetrans"}
    for family, losses in cases["steps"].items():
        assert len(losses["pallas"]) == len(losses["xla"]) >= 2
        for got, want in zip(losses["pallas"], losses["xla"]):
            assert got == pytest.approx(want, rel=1e-5), family
