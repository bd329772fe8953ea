"""`scaling` command line: train one run, or count its FLOPs without training.

    scaling train sweeps/quickstart.yaml --set model.num_layers=3 --set train.steps=2000
    scaling flops sweeps/quickstart.yaml --set model.size=l

Bad input (unknown key, wrong type, out-of-range value, missing file) prints one line naming the
key or file and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from scaling.config_schema import ConfigError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run or sweep YAML (a sweep's axes are ignored: its base config is used)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.num_layers=3 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaling",
        description="Scaling laws for recommendation models: train runs and count their FLOPs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model from a YAML config (resumes if interrupted)",
                       description="Train one model; rerunning the same command resumes from the last checkpoint.")
    _config_args(p)
    p.add_argument("--restart", action="store_true", help="delete the run directory and train from scratch")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="override logging.wandb.mode")

    p = sub.add_parser("flops", help="forward GFLOP/example (analytic and XLA), params, embedding bytes",
                       description="Count a model's FLOPs and parameters without training.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _load(args) -> "RunConfig":  # noqa: F821
    from scaling.config import load_run_config

    return load_run_config(args.config, args.overrides)


def cmd_train(args) -> int:
    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("logging.progress=false")
    if args.wandb:
        overrides.append(f"logging.wandb.mode={args.wandb}")
    args.overrides = overrides
    config = _load(args)

    from scaling.train.loop import Interrupted, run_directory, train
    from scaling.train.report import print_record

    print(f"run directory: {run_directory(config)}", file=sys.stderr)
    try:
        record = train(config, restart=args.restart)
    except Interrupted as stop:
        print(f"interrupted: {stop}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_record(record)
    return 0 if record.status == "ok" else 1


def cmd_flops(args) -> int:
    config = _load(args)
    from scaling.flops import flop_report

    report = flop_report(config.model, config.data.feature_spec())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.model.name} ({getattr(config.model, 'size', 'custom')})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in report.to_json().items():
        table.add_row(key, f"{value:,.6g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "flops": cmd_flops}[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
