"""`scaling` command line.

    scaling train sweeps/quickstart.yaml --set model.size=l      one run (resumes if interrupted)
    scaling sweep sweeps/quickstart.yaml --dry-run               the trials of a sweep, no training
    scaling sweep sweeps/quickstart.yaml --workers 2             run them (relaunch resumes)
    scaling status sweeps/quickstart.yaml                        done / running / failed / pending
    scaling fit runs/quickstart                                  fits.json + report.md
    scaling plot runs/quickstart                                 plots/scaling.png and .svg
    scaling compare runs/quickstart  (or --wandb ENTITY/PROJECT --group quickstart)
    scaling flops sweeps/quickstart.yaml --set model.size=l      FLOPs and parameters of one config
    scaling shard-plan sweeps/quickstart.yaml --devices 8 --set sharding.layout=fsdp
                                                                 each parameter's placement, memory per device

Bad input (unknown key, wrong type, out-of-range value, missing file) prints one line naming the
key or file and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from scaling.config_schema import ConfigError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _config_args(p: argparse.ArgumentParser, what: str = "run or sweep YAML (a sweep's axes are ignored: its base config is used)") -> None:
    p.add_argument("config", help=what)
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.num_layers=3 (repeatable)",
    )


def _default_metric(args: argparse.Namespace) -> None:
    """Fill --metric from the sweep's `metric` (sweep.json) and --reference from the metric's kind."""
    from analysis.records import higher_is_better

    if args.metric is None:
        try:
            with open(os.path.join(args.runs, "sweep.json")) as f:
                args.metric = json.load(f).get("metric") or "logloss"
        except (OSError, ValueError):  # runs of `scaling train`: next-item records say so themselves
            args.metric = "ndcg@10" if _next_item_runs(args.runs) else "logloss"
    if getattr(args, "reference", "") is None:
        args.reference = "sasrec" if higher_is_better(args.metric) and args.metric != "auc" else "dlrm"


def _next_item_runs(directory: str) -> bool:
    import glob

    for path in glob.glob(os.path.join(directory, "*", "result.json"))[:1]:
        try:
            with open(path) as f:
                return "valid_ndcg@10" in (json.load(f).get("best_eval") or {})
        except (OSError, ValueError):
            return False
    return False


def _analysis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="a sweep's run directory, e.g. runs/quickstart")
    p.add_argument("--metric", default=None,
                   help="any final_eval key: logloss, teacher_logloss, ne, auc, hr@10, ndcg@10, mrr (upward metrics "
                        "are fitted as 1 - metric); default: the sweep's `metric`, else logloss")
    p.add_argument("--axis", default="gflops_per_example", choices=["gflops_per_example", "train_flops"],
                   help="x-axis: forward GFLOP/example (default) or total train FLOPs")
    p.add_argument("--reference", default=None,
                   help="family the compute multipliers compare against (default dlrm; sasrec for ranking metrics)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", help="where to write (default: the run directory)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaling",
        description="Scaling laws for recommendation models: train runs and sweeps, fit and plot scaling laws.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model from a YAML config (resumes if interrupted)",
                       description="Train one model; rerunning the same command resumes from the last checkpoint.")
    _config_args(p)
    p.add_argument("--restart", action="store_true", help="delete the run directory and train from scratch")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="override logging.wandb.mode")

    p = sub.add_parser("sweep", help="run every trial of a sweep YAML (relaunching skips finished trials)",
                       description="Expand a sweep YAML into trials and run them. A relaunch skips finished "
                                   "trials and resumes unfinished ones from their checkpoints.",
                       epilog="SLURM options (with --launcher slurm): --slurm.partition=P, --slurm.time=MINUTES, "
                              "--slurm.gpus_per_node=N, --slurm.cpus_per_task=N, --slurm.mem_gb=N, "
                              "--slurm.array_parallelism=N, --slurm.account=A, --slurm.qos=Q; any other "
                              "--slurm.KEY=VALUE is passed to SLURM as slurm_KEY; --slurm.cluster=local runs the "
                              "array on this machine through submitit's local executor.")
    _config_args(p, "sweep YAML: a run config plus a `sweep:` section of axes (a plain run YAML is one trial)")
    p.add_argument("--dry-run", action="store_true", help="print the trials (params, GFLOP/example, train FLOPs) and exit")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local worker processes, each pinned to its own share of cores/GPUs (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local processes, or a SLURM job array via submitit (options: --slurm.KEY=VALUE)")
    p.add_argument("--retry-failed", action="store_true", help="rerun failed / diverged / OOM trials from scratch")
    p.add_argument("--largest-first", action="store_true",
                   help="start the most expensive trials first (shortest total time with several workers)")
    p.add_argument("--wait", action="store_true", help="with --launcher slurm: wait for the jobs and report")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="override logging.wandb.mode")

    p = sub.add_parser("status", help="where each trial of a sweep stands: done / running / failed / pending",
                       description="Read the sweep's run directories and show each trial's status.")
    _config_args(p, "sweep YAML")

    p = sub.add_parser("fit", help="fit scaling laws to a sweep's runs: writes fits.json and report.md",
                       description="Aggregate seeds, pick the learning rate per size, fit power laws with bootstrap "
                                   "CIs and held-out checks; writes fits.json and report.md into the sweep directory.")
    _analysis_args(p)
    p = sub.add_parser("plot", help="scaling plots (PNG and SVG) of a sweep's runs",
                       description="Quality vs compute per family, fitted curves, 80% bands, held-out points, local slopes.")
    _analysis_args(p)
    p.add_argument("--holdout", type=int, default=1, choices=[0, 1, 2],
                   help="draw the fit made without the largest N sizes (open markers), or 0: the fit to all sizes")
    p.add_argument("--relative-to", metavar="FAMILY:SIZE",
                   help="plot %% relative to that point (the Wukong paper's y-axis), e.g. dlrm:xxs")
    p.add_argument("--baselines", metavar="RUNS",
                   help="another sweep's run directory (e.g. runs/baselines_synthetic): its best method is drawn "
                        "as a labelled reference line")
    p = sub.add_parser("compare", help="one table of a sweep's results, from run directories or from W&B",
                       description="Per family and size: FLOPs, params, seeds, chosen lr and the metric. Reads "
                                   "runs/<sweep> or, with --wandb, the runs of a W&B group (online).")
    p.add_argument("runs", nargs="*", help="a sweep's run directory, e.g. runs/quickstart; several are read as one "
                                           "set (e.g. runs/baselines_beauty runs/sasrec_beauty)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead (needs --group)")
    p.add_argument("--group", help="the W&B group: the sweep's name")
    p.add_argument("--metric", default=None, help="any final_eval key (default: the sweep's metric, else logloss)")

    p = sub.add_parser("flops", help="forward GFLOP/example (analytic and XLA), params, embedding bytes",
                       description="Count a model's FLOPs and parameters without training.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("shard-plan", help="where each parameter lives under a layout, and memory per device",
                       description="Place a run's parameters and optimizer states by its sharding config and "
                                   "AOT-compile its train step, without training: per parameter the shape, logical "
                                   "axes, PartitionSpec and bytes per device; the replicated share; the compiled "
                                   "step's memory per device (XLA memory_analysis).")
    _config_args(p)
    p.add_argument("--devices", type=int, metavar="N",
                   help="simulate N host CPU devices (default: the devices JAX sees)")
    p.add_argument("--model", metavar="FAMILY:SIZE",
                   help="a sweep's trial of that family and size (default: the sweep's base config)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
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

    from scaling.sharding.distributed import initialize_from_environment, is_primary

    initialize_from_environment()  # SCALING_* or an srun step of several tasks: join them (before JAX starts)
    from scaling.train.loop import Interrupted, dataset_of, run_directory, train
    from scaling.train.report import print_record

    dataset_of(config.data)  # a missing or malformed data file stops here, before any run directory exists
    primary = is_primary()  # process 0 of a multi-process run speaks for it
    if primary:
        print(f"run directory: {run_directory(config)}", file=sys.stderr)
    try:
        record = train(config, restart=args.restart)
    except Interrupted as stop:
        if primary:
            print(f"interrupted: {stop}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if primary:
        print_record(record)
    return 0 if record.status == "ok" else 1


def cmd_flops(args) -> int:
    config = _load(args)
    from scaling.flops import flop_report
    from scaling.models.registry import is_fitted

    if is_fitted(config.model):
        raise ConfigError("model.name", f"'{config.model.name}' is a fitted baseline: it has no training forward pass "
                                        "to count; its scoring cost is in its run record (fit.scoring_flops)")

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


def cmd_shard_plan(args) -> int:
    from scaling.sharding import plan

    if args.devices is not None:
        if args.devices < 1:
            raise ConfigError("--devices", f"must be >= 1, got {args.devices}")
        if not plan.force_host_devices(args.devices):  # JAX already started: re-run in a fresh interpreter
            import subprocess

            return subprocess.call([sys.executable, "-m", "scaling.cli", *args.argv], env={**os.environ, **plan.forced_env(args.devices)})
    config = plan.pick_config(args.config, args.overrides, args.model)
    result = plan.shard_plan(config)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    from scaling.train.report import wide_console

    plan.print_plan(result, wide_console())
    return 0


def _sweep_overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "wandb", None):
        overrides.append(f"logging.wandb.mode={args.wandb}")
    return overrides + ["logging.progress=false"]  # the launcher draws the progress


def cmd_sweep(args) -> int:
    from scaling.sweep.spec import load_sweep

    slurm_options = {}
    if args.launcher == "slurm":
        from scaling.sweep.slurm import parse_slurm_options

        slurm_options = parse_slurm_options(args.slurm)
    elif args.slurm:
        raise ConfigError(args.slurm[0], "--slurm.* options need --launcher slurm")
    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    sweep = load_sweep(args.config, _sweep_overrides(args))

    from rich.console import Console

    from scaling.sweep.plan import plan, plan_table, states, status_line

    console = Console(stderr=True, soft_wrap=True)
    if args.dry_run:
        from scaling.train.report import wide_console

        wide_console().print(plan_table(sweep, plan(sweep)))
        return 0
    from scaling.sweep.launch import select

    sweep.write_manifest()
    selection = select(sweep, states(sweep), retry_failed=args.retry_failed, largest_first=args.largest_first)
    console.print(f"sweep {sweep.name}: {len(sweep.trials)} trials in {sweep.directory}: {selection.describe()}")
    if args.launcher == "slurm":
        from scaling.sweep.slurm import submit_slurm

        jobs = submit_slurm(sweep, selection.run, slurm_options, restart=selection.restart)
        if jobs:
            console.print(f"submitted {len(jobs)} array tasks (job {jobs[0].job_id.split('_')[0]}); "
                          f"logs in {sweep.directory}/.submitit; `scaling status {args.config}` follows them")
        if args.wait:
            for job in jobs:
                try:
                    job.result()
                except Exception as err:  # the trial's own result.json has the details
                    console.print(f"[red]array task {job.job_id} failed[/]: {str(err).splitlines()[0][:200]}")
            console.print(status_line(states(sweep)))
        return 0
    from scaling.sweep.local import run_local

    summary = run_local(sweep, selection.run, workers=args.workers, restart=selection.restart, console=console)
    console.print(f"sweep {sweep.name}: {status_line(states(sweep))}")
    if summary.interrupted:
        console.print(f"interrupted. Run `scaling sweep {args.config}` again to resume.")
        return EXIT_INTERRUPTED
    return 1 if summary.failed else 0


def cmd_status(args) -> int:
    from scaling.sweep.plan import states, status_table
    from scaling.sweep.spec import load_sweep
    from scaling.train.report import wide_console

    sweep = load_sweep(args.config, list(args.overrides))
    wide_console().print(status_table(sweep, states(sweep)))
    return 0


def _fit(args):
    """Load the runs and fit them; the fit is cached beside the runs until any result.json changes."""
    import hashlib
    import os
    import pickle

    from analysis.records import load_local
    from analysis.scaling_fit import fit_sweep

    if args.resamples < 100:
        raise ConfigError("--resamples", f"must be >= 100, got {args.resamples}")
    try:
        runs = load_local(args.runs)
    except FileNotFoundError as err:
        raise ConfigError("", str(err)) from None
    _default_metric(args)
    known = {k for r in runs.ok for k in r.final_eval}
    base = {k.removeprefix("valid_").removeprefix("test_") for k in known}
    if args.metric not in base:
        raise ConfigError("--metric", f"{args.metric!r} is not in the runs' final_eval; one of {', '.join(sorted(base))}")
    stamp = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(args.runs) if e.is_dir()
                   and os.path.exists(os.path.join(e.path, "result.json")))
    import analysis

    code = os.path.dirname(analysis.__file__)  # a change to the analysis code invalidates the cache too
    code_stamp = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(code) if e.name.endswith(".py"))
    key = hashlib.sha256(repr((stamp, code_stamp, args.metric, args.axis, args.reference, args.resamples)).encode()).hexdigest()
    cache = os.path.join(args.runs, ".fit_cache.pkl")
    try:
        with open(cache, "rb") as f:
            cached_key, fit = pickle.load(f)
        if cached_key == key:
            return runs, fit, args.out or args.runs
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError):
        pass
    fit = fit_sweep(runs, args.metric, axis=args.axis, reference=args.reference, n_resamples=args.resamples)
    with open(cache, "wb") as f:
        pickle.dump((key, fit), f)
    return runs, fit, args.out or args.runs


def cmd_fit(args) -> int:
    import os

    from analysis.report import other_axis_params, render_report
    from analysis.scaling_fit import sweep_fit_json

    _, fit, out = _fit(args)
    os.makedirs(out, exist_ok=True)
    command = f"scaling fit {args.runs} --metric {args.metric} --axis {args.axis} --reference {args.reference} --resamples {args.resamples}"
    payload = sweep_fit_json(fit, command)
    for name, fam in fit.families.items():
        payload["families"][name]["params_on_other_axis"] = other_axis_params(fam)
    with open(os.path.join(out, "fits.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_report(fit, command))
    from analysis.summary import print_fit_summary

    print_fit_summary(fit)
    print(f"wrote {os.path.join(out, 'fits.json')} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_plot(args) -> int:
    import os

    from analysis.plots import plot_sweep

    runs, fit, out = _fit(args)
    relative = None
    if args.relative_to:
        family, _, size = args.relative_to.partition(":")
        point = next((p for fam in fit.families.values() for p in fam.points if p.family == family and p.size == size), None)
        if point is None:
            raise ConfigError("--relative-to", f"no point {args.relative_to!r} among the fitted families' sizes")
        relative = (args.relative_to, point.mean)
    from analysis.records import higher_is_better, load_local, scale_points

    best = max if higher_is_better(args.metric) else min
    references = []
    for family in fit.skipped:  # families without a FLOP scale: their best point as a reference line
        points = [p for p in scale_points(runs, args.metric) if p.family == family]
        if points:
            references.append(best(points, key=lambda p: p.mean))
    if args.baselines:  # the best method of another sweep (the classical baselines) as one more line
        try:
            others = load_local(args.baselines)
        except FileNotFoundError as err:
            raise ConfigError("--baselines", str(err)) from None
        points = [p for p in scale_points(others, args.metric) if p.family not in fit.families]
        if not points:
            raise ConfigError("--baselines", f"{args.baselines}: no finished run reports test {args.metric}")
        references.append(best(points, key=lambda p: p.mean))
    paths = plot_sweep(fit, os.path.join(out, "plots"), holdout=args.holdout, relative_to=relative, references=references)
    print("wrote " + " and ".join(paths))
    return 0


def cmd_compare(args) -> int:
    from analysis.records import load_local, merge_run_sets, scale_points
    from analysis.summary import points_table
    from scaling.train.report import wide_console

    if args.wandb:
        if not args.group:
            raise ConfigError("--group", "required with --wandb: the sweep's name (its W&B group)")
        from analysis.wandb_source import load_wandb

        try:
            runs = load_wandb(args.wandb, args.group)
        except FileNotFoundError as err:
            raise ConfigError("--wandb", str(err)) from None
    elif args.runs:
        try:
            runs = merge_run_sets([load_local(d) for d in args.runs])
        except FileNotFoundError as err:
            raise ConfigError("", str(err)) from None
    else:
        raise ConfigError("runs", "give a run directory or --wandb ENTITY/PROJECT --group SWEEP")
    if args.runs:
        directories, args.runs = args.runs, args.runs[0]  # the first directory's sweep names the metric
        _default_metric(args)
        args.runs = directories
    args.metric = args.metric or "logloss"
    if _is_ranking(args.metric):  # the retrieval track: one row per method, with the data's own rows
        from analysis.retrieval_table import retrieval_table

        wide_console().print(retrieval_table(runs, args.metric))
        return 0
    wide_console().print(points_table(runs, scale_points(runs, args.metric), args.metric))
    return 0


def _is_ranking(metric: str) -> bool:
    return metric.startswith(("hr@", "ndcg@", "mrr", "coverage@"))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    slurm = [a for a in extra if a.startswith("--slurm.")]
    if len(slurm) != len(extra) or (slurm and args.command != "sweep"):
        parser.parse_args(argv)  # reports the unrecognized arguments and exits 2
    args.slurm = slurm
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        commands = {"train": cmd_train, "flops": cmd_flops, "sweep": cmd_sweep, "status": cmd_status, "fit": cmd_fit,
                    "plot": cmd_plot, "compare": cmd_compare, "shard-plan": cmd_shard_plan}
        return commands[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
