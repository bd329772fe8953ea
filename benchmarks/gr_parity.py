"""Numerical parity with generative-recommenders' Triton HSTU attention, without a GPU.

    python -m benchmarks.gr_parity --gr-path DIR --torch-python PY [--out FILE]

Runs GR's `triton_hstu_mha` (forward and the gradients of q, k, v) in Triton's interpreter on CPU,
in a child process of PY (an interpreter with PyTorch and Triton; this project needs neither), and
this repo's HSTU attention, the Pallas kernel (interpret mode) and the XLA reference, here, on the
same float32 inputs: jagged lengths and, in a second case, target (candidate) tokens, which GR
calls num_targets. Reports max |ours - GR| / max |GR| over the valid rows of each tensor.

DIR holds the `generative_recommenders` package (a checkout of meta-recsys/generative-recommenders).
Nothing of it is imported here or kept: the child copies the package to a temporary folder and
adapts three things there, for the interpreter only:
  - mask lines `m = m or (x)` / `m = m and x`. Compiled Triton rewrites them into element-wise
    or/and; the interpreter runs them as Python, which keeps the left operand (only the diagonal
    would attend). They become `m = m | (x)` / `m = m & (x)`;
  - `libdevice.fast_expf` / `fast_dividef` (no interpreter implementation) become exp and `/`;
  - autotuning cannot time configs without a device: every config reports 1 ms, and the first wins.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile

import numpy as np

from benchmarks.json_report import emit

# name -> (padded length N, heads, head dim, lengths, num_targets or None)
CASES = {
    "jagged": (40, 2, 32, (0, 1, 16, 37, 40), None),
    "targets": (40, 2, 32, (0, 1, 16, 37, 40), (0, 1, 3, 5, 2)),
    "longer": (128, 2, 64, (128, 100, 65, 7), (0, 4, 1, 2)),
}

_CHILD = r'''
import os, re, shutil, sys, tempfile
import numpy as np, torch, triton, triton.testing
import triton.language as tl
import triton.language.extra.libdevice as libdevice

gr_path, inputs, outputs = sys.argv[1:4]
work = tempfile.mkdtemp()
shutil.copytree(os.path.join(gr_path, "generative_recommenders"), os.path.join(work, "generative_recommenders"))
module = os.path.join(work, "generative_recommenders", "ops", "triton", "triton_hstu_attention.py")
text = open(module).read()
text = re.sub(r"^(\s*)(\w+) = \2 or \((.*)\)$", r"\1\2 = \2 | (\3)", text, flags=re.M)
text = re.sub(r"^(\s*)(\w+) = \2 and (.+)$", r"\1\2 = \2 & (\3)", text, flags=re.M)
open(module, "w").write(text)
triton.testing.do_bench = lambda fn, *a, quantiles=None, **k: [1.0, 1.0, 1.0] if quantiles else 1.0

@triton.jit
def _expf(x):
    return tl.exp(x)

@triton.jit
def _dividef(a, b):
    return a / b

libdevice.fast_expf, libdevice.fast_dividef = _expf, _dividef
sys.path.insert(0, work)
from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha

data, out = np.load(inputs), {}
for name in data["names"]:
    q, k, v, cot = (torch.from_numpy(data[f"{name}/{x}"]) for x in ("q", "k", "v", "cot"))
    lengths = data[f"{name}/lengths"].astype(np.int64)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    jag = [torch.cat([t[b, : lengths[b]] for b in range(t.shape[0])]).contiguous() for t in (q, k, v, cot)]
    qj, kj, vj = (t.clone().requires_grad_(True) for t in jag[:3])
    targets = torch.from_numpy(data[f"{name}/targets"].astype(np.int64)) if f"{name}/targets" in data else None
    o = triton_hstu_mha(N=q.shape[1], alpha=1.0, q=qj, k=kj, v=vj, seq_offsets=offsets, num_targets=targets)
    grads = torch.autograd.grad(o, (qj, kj, vj), jag[3])
    for key, t in zip(("out", "dq", "dk", "dv"), (o, *grads)):
        full = np.zeros(q.shape[:2] + t.shape[1:], np.float32)
        for b in range(q.shape[0]):
            full[b, : lengths[b]] = t[offsets[b] : offsets[b + 1]].detach().numpy()
        out[f"{name}/{key}"] = full
np.savez(outputs, **out)
'''


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"names": np.array(list(CASES))}
    for name, (n, heads, dim, lengths, targets) in CASES.items():
        for x in ("q", "k", "v", "cot"):
            arrays[f"{name}/{x}"] = (rng.normal(size=(len(lengths), n, heads, dim)) * 0.5).astype(np.float32)
        arrays[f"{name}/lengths"] = np.asarray(lengths, np.int32)
        if targets is not None:
            arrays[f"{name}/targets"] = np.asarray(targets, np.int32)
    return arrays


def ours(arrays: dict[str, np.ndarray], name: str, impl: str) -> dict[str, np.ndarray]:
    """This repo's out, dq, dk, dv for one case (16 x 16 tiles, so the small cases span blocks)."""
    import jax
    import jax.numpy as jnp

    from scaling.kernels.hstu_attention import Blocks, hstu_mha

    q, k, v, cot = (jnp.asarray(arrays[f"{name}/{x}"]) for x in ("q", "k", "v", "cot"))
    lengths = jnp.asarray(arrays[f"{name}/lengths"])
    targets = arrays.get(f"{name}/targets")
    candidates = None if targets is None else jnp.asarray(targets)

    def attention(q, k, v):
        return hstu_mha(q, k, v, lengths, norm=float(q.shape[1]), num_candidates=candidates, impl=impl,
                        blocks=Blocks.uniform(16))

    out, pullback = jax.vjp(attention, q, k, v)
    return dict(zip(("out", "dq", "dk", "dv"), (np.asarray(t) for t in (out, *pullback(cot)))))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gr-path", default=os.environ.get("GR_PATH", ""), required="GR_PATH" not in os.environ,
                        help="directory holding generative_recommenders/ (default: $GR_PATH)")
    parser.add_argument("--torch-python", required=True, help="a Python with PyTorch and Triton")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    if shutil.which(args.torch_python) is None:
        parser.error(f"--torch-python {args.torch_python!r} is not an executable Python")
    if not os.path.isdir(os.path.join(args.gr_path, "generative_recommenders")):
        parser.error(f"--gr-path {args.gr_path!r} holds no generative_recommenders/ package")

    arrays = make_inputs()
    with tempfile.TemporaryDirectory() as work:
        inputs, outputs = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(inputs, **arrays)
        child = subprocess.run([args.torch_python, "-c", _CHILD, args.gr_path, inputs, outputs],
                               capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"},
                               timeout=1800)
        if child.returncode != 0:
            raise SystemExit(f"error: GR's kernel failed in the interpreter: {child.stderr.strip().splitlines()[-1]}")
        theirs = dict(np.load(outputs))

    report = {"benchmark": "gr_parity", "reference": "generative-recommenders triton_hstu_mha, Triton interpreter",
              "dtype": "float32", "metric": "max |ours - GR| / max |GR| over valid rows", "cases": {}}
    for name, (n, heads, dim, lengths, targets) in CASES.items():
        valid = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
        row = {"N": n, "heads": heads, "d": dim, "lengths": list(lengths), "num_targets": targets}
        for impl in ("pallas", "xla"):
            got = ours(arrays, name, impl)
            row[impl] = {key: float(np.abs(got[key][valid] - theirs[f"{name}/{key}"][valid]).max()
                                    / max(np.abs(theirs[f"{name}/{key}"][valid]).max(), 1e-30))
                         for key in ("out", "dq", "dk", "dv")}
        report["cases"][name] = row
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
