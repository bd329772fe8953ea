"""The kernels' speed aims, read from a GPU session's JSON (benchmarks/gpu_session.sh OUT).

    python -m benchmarks.aims OUT [--json]

Each aim is computed from the rows the session's benchmarks wrote, never assumed:

  hstu_forward_vs_matmul   HSTU attention forward, L = 4096, d = 128, bf16 (the model's relative
                           bias): its TFLOP/s (causal FLOPs, benchmarks/kernels.py) over the bf16
                           matmul TFLOP/s measured in the same run; aim >= 0.35
  hstu_fwd_bwd_vs_xla      forward + backward time of the XLA reference over the kernel's, at every
                           L >= 2048 and head dim the grid ran; aim >= 3 at each (an XLA row that
                           failed, e.g. out of memory at L = 8192, is listed, not counted)
  hstu_vs_gr               generative-recommenders' Triton hstu_mha time over ours, forward and
                           forward + backward, same shapes without bias
                           (benchmarks/hstu_reference_side_by_side.py); aim >= 1 (parity or better)
  hstu_mosaic_vs_gr        the same for the Mosaic GPU kernels (scaling/kernels/hstu_attention_mgpu.py),
                           listed last: the model runs them only with attention_impl: mosaic
  train_step_mfu           HSTU and Wukong bf16 train steps with the kernels: model FLOPs over the
                           measured matmul peak (benchmarks/train_step.py); aim >= 0.35

A row of ours that failed makes its aim not met. An aim with no rows (a step that did not run or
was cut short) says so, and one with some rows missing is only partly measured: `met` is None for
both. gpu_session.sh appends this table to OUT/summary.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple

FORWARD_FRACTION, FWD_BWD_SPEEDUP, GR_RATIO, MFU = 0.35, 3.0, 1.0, 0.35


def _load(path: str) -> dict | None:
    """The JSON at path, or None when it is missing or unreadable (a step killed mid-write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def kernels_from_log(log_path: str) -> dict | None:
    """What benchmarks/kernels.py printed before it was cut short (its JSON is written at the end):
    the matmul peak line and the HSTU rows it printed as JSON lines within the session log's
    kernels step (gpu_session.sh heads each step's output with "== NAME (timeout ..."); None
    without both."""
    peak, interpret, rows, step = None, False, [], None
    try:
        with open(log_path) as f:
            for line in f:
                if line.startswith("== "):
                    step = line[3:].split(" ", 1)[0]
                    continue
                if step != "kernels" or not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if "matmul_bf16_tflops" in obj and "op" not in obj:
                    peak, interpret = obj["matmul_bf16_tflops"], bool(obj.get("interpret"))
                elif obj.get("op") == "hstu_attention":
                    rows.append(obj)
    except OSError:
        return None
    if peak is None or not rows:
        return None
    return {"matmul_bf16_tflops": peak, "hstu": rows, "interpret": interpret, "from_log": True}


def _aim(name: str, target: float, values: list[dict], missing: str | None = None) -> dict:
    """{aim, target, values, worst, met} from value entries: {..., "value": x} counted;
    {..., "failed": reason} (our kernel's row errored) makes the aim not met; {..., "note": ...}
    without a value is listed and, unless "excluded" (the XLA reference failed: no ratio to take),
    leaves a met aim unproven (met None: partly measured)."""
    counted = [v["value"] for v in values if v.get("value") is not None]
    worst = min(counted) if counted else None
    met = None if worst is None else worst >= target
    if any("failed" in v for v in values):
        met = False
    elif met and any(v.get("value") is None and not v.get("excluded") for v in values):
        met = None
    out = {"aim": name, "target": target, "values": values, "worst": worst, "met": met}
    if missing and not values:
        out["missing"] = missing
    return out


def _ok(row: dict, *keys: str) -> bool:
    return "error" not in row and all(row.get(k) for k in keys)


def _failure(row: dict) -> str:
    return row.get("error", "no time")


def kernel_aims(kernels: dict | None) -> list[dict]:
    """The two HSTU kernel aims from benchmarks/kernels.py's JSON."""
    if kernels is None:
        why = "no kernels.json (the kernels step did not run)"
        return [_aim("hstu_forward_vs_matmul", FORWARD_FRACTION, [], why),
                _aim("hstu_fwd_bwd_vs_xla", FWD_BWD_SPEEDUP, [], why)]
    if kernels.get("interpret"):
        why = "kernels.json was run in interpret mode (not on a GPU)"
        return [_aim("hstu_forward_vs_matmul", FORWARD_FRACTION, [], why),
                _aim("hstu_fwd_bwd_vs_xla", FWD_BWD_SPEEDUP, [], why)]
    peak = kernels.get("matmul_bf16_tflops")
    by_shape = {(r["impl"], r["L"], r["d"]): r for r in kernels.get("hstu", [])}
    forward = []
    target_row = by_shape.get(("pallas", 4096, 128))
    if target_row is not None:
        entry = {"L": 4096, "d": 128, "matmul_tflops": peak}
        if not _ok(target_row, "fwd_tflops"):
            entry["failed"] = _failure(target_row)
        elif peak:
            entry.update(fwd_tflops=target_row["fwd_tflops"], value=target_row["fwd_tflops"] / peak)
        else:
            entry["note"] = "no matmul peak"
        forward.append(entry)
    speedups = []
    for (impl, length, dim), row in sorted(by_shape.items()):
        if impl != "pallas" or length < 2048:
            continue
        entry = {"L": length, "d": dim}
        xla = by_shape.get(("xla", length, dim))
        if not _ok(row, "fwd_bwd_ms"):
            entry["failed"] = _failure(row)
        elif xla is None:
            entry.update(pallas_ms=row["fwd_bwd_ms"], note="no xla row")
        elif not _ok(xla, "fwd_bwd_ms"):  # e.g. the reference's [B, h, L, L] scores out of memory
            entry.update(pallas_ms=row["fwd_bwd_ms"], note=f"xla failed: {_failure(xla)}", excluded=True)
        else:
            entry.update(pallas_ms=row["fwd_bwd_ms"], xla_ms=xla["fwd_bwd_ms"], value=xla["fwd_bwd_ms"] / row["fwd_bwd_ms"])
        speedups.append(entry)
    aims = [_aim("hstu_forward_vs_matmul", FORWARD_FRACTION, forward, "no pallas row at L = 4096, d = 128"),
            _aim("hstu_fwd_bwd_vs_xla", FWD_BWD_SPEEDUP, speedups, "no pallas row at L >= 2048")]
    if kernels.get("from_log"):
        for aim in aims:
            aim["source"] = "session.log (the kernels step was cut short before writing kernels.json)"
    return aims


def gr_aim(side_by_side: dict | None, impl: str = "pallas") -> dict:
    """Ours against GR's Triton kernel (hstu_reference_side_by_side.py's JSON), at every shape GR
    ran: the Triton kernels (impl pallas: the aim), or the Mosaic GPU ones (impl mosaic: the same
    comparison, reported beside it; the model runs them only with attention_impl: mosaic)."""
    name = "hstu_vs_gr" if impl == "pallas" else f"hstu_{impl}_vs_gr"
    if side_by_side is None:
        return _aim(name, GR_RATIO, [], "no hstu_side_by_side.json (the gr step did not run)")
    if side_by_side.get("gr_skipped"):
        return _aim(name, GR_RATIO, [], f"GR's kernel did not run: {side_by_side['gr_skipped']}")
    by_shape = {(r["impl"], r["L"], r["d"]): r for r in side_by_side.get("rows", [])}
    values = []
    for (row_impl, length, dim), gr in sorted(by_shape.items()):
        if row_impl != "gr" or not _ok(gr, "fwd_ms", "fwd_bwd_ms"):
            continue
        ours = by_shape.get((impl, length, dim))
        for part in ("fwd", "fwd_bwd"):
            entry = {"L": length, "d": dim, "part": part, "gr_ms": gr[f"{part}_ms"]}
            if ours is None:
                entry["note"] = f"no {impl} row"
            elif not _ok(ours, f"{part}_ms"):
                entry["failed"] = _failure(ours)
            else:
                entry.update(ours_ms=ours[f"{part}_ms"], value=gr[f"{part}_ms"] / ours[f"{part}_ms"])
            values.append(entry)
    return _aim(name, GR_RATIO, values, "no shape where GR's kernel ran")


def train_aim(train: dict | None) -> dict:
    """MFU of the kernels' HSTU and Wukong train steps (train_step.py's JSON): both must be there."""
    if train is None:
        return _aim("train_step_mfu", MFU, [], "no train_step.json (the train step did not run)")
    if train.get("interpret"):
        return _aim("train_step_mfu", MFU, [], "train_step.json was run in interpret mode (not on a GPU)")
    rows = {r["model"]: r for r in train.get("rows", []) if r.get("impl") == "pallas"}
    values = []
    for model in ("hstu", "wukong"):
        row = rows.get(model)
        if row is None:
            cut = "" if train.get("complete", True) else ": the train step was cut short"
            values.append({"model": model, "note": f"no row (not run{cut})"})
        elif not _ok(row, "mfu"):
            values.append({"model": model, "failed": _failure(row)})
        else:
            values.append({"model": model, "step_ms": row["step_ms"], "train_tflops": row["train_tflops"],
                           "value": row["mfu"],
                           **({"fraction_of_roofline": row["fraction_of_roofline"]}
                              if "fraction_of_roofline" in row else {})})
    return _aim("train_step_mfu", MFU, values)


class Session(NamedTuple):
    """What a gpu_session.sh OUT folder holds; None where a step wrote nothing readable."""

    kernels: dict | None  # benchmarks/kernels.py (or, cut short, its rows in session.log)
    side_by_side: dict | None  # benchmarks/hstu_reference_side_by_side.py
    train: dict | None  # benchmarks/train_step.py


def load_session(out_dir: str) -> Session:
    """The benchmarks' JSON from a gpu_session.sh OUT folder."""
    return Session(
        kernels=_load(os.path.join(out_dir, "kernels.json")) or kernels_from_log(os.path.join(out_dir, "session.log")),
        side_by_side=_load(os.path.join(out_dir, "hstu_side_by_side.json")),
        train=_load(os.path.join(out_dir, "train_step.json")))


def evaluate(out_dir: str) -> list[dict]:
    """Every aim from the JSON files a gpu_session.sh OUT folder holds."""
    session = load_session(out_dir)
    return [*kernel_aims(session.kernels), gr_aim(session.side_by_side), train_aim(session.train),
            gr_aim(session.side_by_side, "mosaic")]


def table(aims: list[dict]) -> str:
    """The aims as plain-text lines: one per aim (worst value, target, met), then its values."""
    lines = []
    for aim in aims:
        verdict = {True: "met", False: "NOT met"}.get(aim["met"], "not measured" if aim["worst"] is None
                                                       else "partly measured")
        worst = "-" if aim["worst"] is None else f"{aim['worst']:.3g}"
        notes = [aim[k] for k in ("missing", "source") if k in aim]
        lines.append(f"{aim['aim']}: worst {worst}, target {aim['target']:g}: {verdict}"
                     + "".join(f" ({note})" for note in notes))
        for value in aim["values"]:
            shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in value.items()}
            lines.append("    " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="a benchmarks/gpu_session.sh OUT folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir}: not a folder (expected a gpu_session.sh OUT folder)", file=sys.stderr)
        return 2
    aims = evaluate(args.out_dir)
    print(json.dumps(aims, indent=2) if args.json else table(aims))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
