"""Plots of a GPU session's kernel and train-step speed, drawn against the speed aims.

    python -m benchmarks.plot_kernels OUT [--out FILE]

Reads the JSON in a benchmarks/gpu_session.sh OUT folder (benchmarks.aims.load_session) and draws
three panels:

  forward      HSTU attention forward TFLOP/s against L (causal FLOPs, as benchmarks/kernels.py
               counts them), one colour per head dim: ours and the XLA reference with the model's
               relative bias, solid and dashed. The side-by-side step adds GR's Triton hstu_mha, ours
               and the Mosaic GPU forward on the same shapes without bias. Horizontal lines show
               the bf16 matmul TFLOP/s measured in the same run and the 35% aim.
  fwd+bwd      forward + backward speedup against L: the XLA reference's time over ours (aim 3x
               at L >= 2048), and GR's time over ours without bias (aim 1, parity), for the
               Triton kernels and the Mosaic GPU ones.
  train steps  MFU of each model's bf16 train step, with the kernels, with XLA, and for hstu_stu
               (HSTU without the relative bias) with the Mosaic GPU attention (aim 35% for HSTU
               and Wukong).

Rows that failed (e.g. the XLA reference out of memory at L = 8192) are listed under the panels.
Results from interpret mode, i.e. not from a GPU, are titled as such. Writes FILE (default
OUT/kernel_speed.png) and an .svg beside it. The files a device call brings back are read-only,
so pass --out when OUT is such a folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from benchmarks.aims import FORWARD_FRACTION, FWD_BWD_SPEEDUP, GR_RATIO, MFU, Session, load_session

_COLOURS = {64: "#1f77b4", 128: "#d62728"}
_STYLE = {"ours": "-", "XLA": "--", "GR, no bias": ":", "ours, no bias": "-.", "Mosaic GPU, no bias": (0, (5, 1, 1, 1)),
          "Mosaic GPU serial, no bias": (0, (1, 1)), "Mosaic GPU fused dK/dV, no bias": (0, (3, 1))}
_MARKER = {"GR, no bias": "^", "Mosaic GPU, no bias": "s", "Mosaic GPU serial, no bias": "x",
           "Mosaic GPU fused dK/dV, no bias": "+"}
_SIDE_LABELS = {"gr": "GR, no bias", "pallas": "ours, no bias", "mosaic": "Mosaic GPU, no bias",
                "mosaic_serial": "Mosaic GPU serial, no bias", "mosaic_fused": "Mosaic GPU fused dK/dV, no bias"}

_MFU_STYLE = {"pallas": ("kernels", "#d62728"), "mosaic": ("Mosaic GPU attention", "#9467bd"), "xla": ("XLA", "0.6")}


def _colour(dim: int) -> str:
    return _COLOURS.get(dim, "#2ca02c")


def _failed(row: dict) -> bool:
    return "error" in row


def series(session: Session) -> dict:
    """The values the plot draws, computed from the session's rows:

    forward   {(label, d): [(L, TFLOP/s), ...]}, label in ours | XLA | GR, no bias | ours, no bias |
              Mosaic GPU[ serial | fused dK/dV], no bias (the Mosaic GPU kernels as they default,
              without their consumers' ping-pong, with one dK/dV kernel)
    speedup   {(label, d): [(L, ratio), ...]}, label "over XLA" (XLA ms / ours ms, with bias),
              "over GR, no bias" (GR ms / ours ms) or "Mosaic over GR, no bias" (GR ms / Mosaic ms)
    mfu       {(model, impl): MFU} of the train steps
    matmul_tflops  the bf16 matmul TFLOP/s of the kernels run (None without one)
    failed    one line per failed row
    interpret whether any source ran in interpret mode (not a GPU)
    device    the device the kernels or train step ran on
    """
    forward, speedup, failed = defaultdict(list), defaultdict(list), []
    kernels, side, train = session
    interpret = any(bool(src and src.get("interpret")) for src in session)
    hstu = {(r["impl"], r["L"], r["d"]): r for r in (kernels or {}).get("hstu", [])}
    for (impl, length, dim), row in sorted(hstu.items()):
        label = "ours" if impl == "pallas" else "XLA"
        if _failed(row):
            failed.append(f"HSTU {label} L={length} d={dim}: {row['error'][:80]}")
            continue
        if row.get("fwd_tflops"):
            forward[(label, dim)].append((length, row["fwd_tflops"]))
        xla = hstu.get(("xla", length, dim))
        if impl == "pallas" and xla and not _failed(xla) and row.get("fwd_bwd_ms") and xla.get("fwd_bwd_ms"):
            speedup[("over XLA", dim)].append((length, xla["fwd_bwd_ms"] / row["fwd_bwd_ms"]))
    beside = {(r["impl"], r["L"], r["d"]): r for r in (side or {}).get("rows", [])}
    for (impl, length, dim), row in sorted(beside.items()):
        if impl not in _SIDE_LABELS:
            continue
        label = _SIDE_LABELS[impl]
        if _failed(row):
            failed.append(f"side by side {label} L={length} d={dim}: {row['error'][:80]}")
            continue
        if row.get("fwd_tflops"):
            forward[(label, dim)].append((length, row["fwd_tflops"]))
        for mine, label in (("pallas", "over GR, no bias"), ("mosaic", "Mosaic over GR, no bias")):
            ours = beside.get((mine, length, dim))
            if impl == "gr" and ours and not _failed(ours) and row.get("fwd_bwd_ms") and ours.get("fwd_bwd_ms"):
                speedup[(label, dim)].append((length, row["fwd_bwd_ms"] / ours["fwd_bwd_ms"]))
    mfu = {}
    for row in (train or {}).get("rows", []):
        if _failed(row):
            failed.append(f"train step {row['model']} {row['impl']}: {row['error'][:80]}")
        elif row.get("mfu") is not None:
            mfu[(row["model"], row["impl"])] = row["mfu"]
    device = (kernels or {}).get("device") or (train or {}).get("device") or (side or {}).get("jax_device")
    return {"forward": dict(forward), "speedup": dict(speedup), "mfu": mfu,
            "matmul_tflops": (kernels or {}).get("matmul_bf16_tflops"), "failed": failed,
            "interpret": interpret, "device": device}


def _forward_panel(ax, data: dict) -> None:
    for (label, dim), points in sorted(data["forward"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, ls=_STYLE[label], marker=_MARKER.get(label, "o"), ms=3, lw=1.2, color=_colour(dim),
                label=f"{label}, d={dim}")
    peak = data["matmul_tflops"]
    if peak:
        ax.axhline(peak, color="0.3", lw=0.9, label=f"bf16 matmul, {peak:.3g}")
        ax.axhline(FORWARD_FRACTION * peak, color="0.3", lw=0.9, ls=(0, (1, 3)),
                   label=f"aim: {FORWARD_FRACTION:.0%} of matmul")
    ax.set_title("HSTU attention forward, bf16")
    ax.set_ylabel("TFLOP/s (causal FLOPs)")


def _speedup_panel(ax, data: dict) -> None:
    for (label, dim), points in sorted(data["speedup"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs, ys = zip(*sorted(points))
        style = {"over XLA": "-", "over GR, no bias": ":"}.get(label, (0, (5, 1, 1, 1)))
        ax.plot(xs, ys, ls=style, marker="s" if label.startswith("Mosaic") else "o", ms=3, lw=1.2,
                color=_colour(dim), label=f"{label}, d={dim}")
    ax.axhline(FWD_BWD_SPEEDUP, color="0.3", lw=0.9, ls=(0, (1, 3)),
               label=f"aim over XLA: {FWD_BWD_SPEEDUP:g}x, L >= 2048")
    ax.axhline(GR_RATIO, color="0.3", lw=0.9, ls="--", label="aim over GR: parity")
    lengths = [length for points in data["speedup"].values() for length, _ in points]
    if lengths and min(lengths) < 2048:  # the lengths the aim over XLA does not count
        ax.axvspan(min(lengths) / 1.2, 2048 / 1.2 if max(lengths) >= 2048 else max(lengths) * 1.2,
                   color="0.93", zorder=0)
    ax.set_title("HSTU attention forward + backward")
    ax.set_ylabel("speedup (their time / ours)")
    ax.set_ylim(bottom=0)


def _mfu_panel(ax, data: dict) -> None:
    models = sorted({model for model, _ in data["mfu"]})
    impls = [i for i in ("pallas", "mosaic", "xla") if any(key[1] == i for key in data["mfu"])]
    width = 0.8 / max(len(impls), 1)
    for n, impl in enumerate(impls):
        offset = (n - (len(impls) - 1) / 2) * width
        xs = [i + offset for i, m in enumerate(models) if (m, impl) in data["mfu"]]
        ys = [data["mfu"][(m, impl)] for m in models if (m, impl) in data["mfu"]]
        bars = ax.bar(xs, ys, width=0.95 * width, color=_MFU_STYLE[impl][1], label=_MFU_STYLE[impl][0])
        ax.bar_label(bars, labels=[f"{y:.0%}" for y in ys], fontsize=7)
    ax.axhline(MFU, color="0.3", lw=0.9, ls=(0, (1, 3)), label=f"aim: {MFU:.0%} (HSTU, Wukong)")
    ax.set_xticks(range(len(models)), models)
    ax.set_title("train step, bf16")
    ax.set_ylabel("MFU (model FLOPs / measured matmul peak)")


def plot(session: Session, path: str) -> list[str]:
    """Write the three panels to `path` (.png) and the same name as .svg; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(session)
    plt.rcParams.update({"font.size": 8.5, "axes.titlesize": 9, "legend.fontsize": 6.5})
    from matplotlib.ticker import FuncFormatter

    fig, (ax_fwd, ax_speed, ax_mfu) = plt.subplots(1, 3, figsize=(13.5, 5.4))
    _forward_panel(ax_fwd, data)
    _speedup_panel(ax_speed, data)
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    for ax in (ax_fwd, ax_speed):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("sequence length L (fixed total tokens)")
        ax.grid(True, which="both", alpha=0.25, lw=0.5)
    ax_speed.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    _mfu_panel(ax_mfu, data)
    ax_mfu.grid(True, axis="y", alpha=0.25, lw=0.5)
    empty = {ax_fwd: not data["forward"], ax_speed: not data["speedup"], ax_mfu: not data["mfu"]}
    for ax, nothing in empty.items():
        if nothing:  # the step that feeds it did not run or wrote no rows
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.5")
        else:  # below the panel, clear of the curves
            ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    where = data["device"] or "unknown device"
    heading = f"kernel speed on {where}" + ("  (INTERPRET MODE: not GPU speed)" if data["interpret"] else "")
    fig.suptitle(heading, fontsize=10)
    if data["failed"]:
        fig.text(0.01, 0.01, "failed: " + "; ".join(data["failed"]), fontsize=6.5, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if data["failed"] else 0, 1, 1))
    base, _ = os.path.splitext(path)
    paths = [f"{base}.png", f"{base}.svg"]
    for out in paths:
        fig.savefig(out, dpi=200 if out.endswith(".png") else None)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="a benchmarks/gpu_session.sh OUT folder")
    parser.add_argument("--out", help="the PNG to write (default OUT/kernel_speed.png; an .svg goes beside it)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir}: not a folder (expected a gpu_session.sh OUT folder)", file=sys.stderr)
        return 2
    session = load_session(args.out_dir)
    if not any(session):
        print(f"error: {args.out_dir}: no kernels.json, hstu_side_by_side.json, train_step.json or kernels rows "
              "in session.log", file=sys.stderr)
        return 2
    path = args.out or os.path.join(args.out_dir, "kernel_speed.png")
    try:
        written = plot(session, path)
    except OSError as err:
        hint = "" if args.out else "; pass --out"
        print(f"error: {path}: cannot write ({err.strerror}){hint}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
