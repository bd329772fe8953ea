"""The train/eval loop: one run config in, one run directory and run record out.

    runs/<name>/<run_id>/
      config.yaml      the resolved config (reloadable with `scaling train`)
      metrics.jsonl    one line per log interval and per evaluation
      result.json      the run record (scaling/train/run_record.py)
      checkpoints/     orbax, keep-last-N, with the data iterator position
      traceback.txt    only when the run failed

Running the same config again resumes from the latest checkpoint; a finished run is not retrained.
Ctrl-C or SIGTERM saves a checkpoint at the current step before exiting; SIGKILL loses at most the
steps since the last checkpoint.

Multi-process runs (scaling/sharding/distributed.py): every process runs this loop on the same
run directory (a shared file system). Each loads only its rows of every global batch
(`Partitioner.local_rows`), evaluates the whole held-out set (each feeds its devices' rows; the
outputs come back replicated, so every process computes the same metrics), and saves its part of
each checkpoint. Process 0 alone writes config.yaml, metrics.jsonl, result.json and W&B and draws
the progress bar; another process's failure is printed on its stderr, its traceback written to
traceback.p<i>.txt, and it exits non-zero. A stop request (SIGINT/SIGTERM) is agreed on at log
intervals, so that every process saves the same step.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np
from flax import nnx

from scaling.config import RunConfig, dump_yaml, run_id
from scaling.config_schema import ConfigError, to_dict
from scaling.flops import xla_flops_per_example
from scaling.models.base import param_counts
from scaling.models.registry import build_model, is_fitted
from scaling.sharding.distributed import any_process, barrier, is_primary
from scaling.sharding.embedding import OVERFLOW_METRIC
from scaling.sharding.relayout import RestorePlan, layouts_json
from scaling.train.checkpoint import Checkpointer
from scaling.train.fit_run import fit_run
from scaling.train.loggers import MetricsFile, ProgressBar, WandbMirror
from scaling.train.run_record import (
    RunRecord,
    classify_failure,
    compiled_memory,
    device_info,
    library_versions,
    peak_memory_bytes,
    read_record,
)
from scaling.train.setup import prepare


def _ranges_text(rows: np.ndarray) -> str:
    """Sorted row indices as ranges: [0 1 2 3 8 9] -> '0-3, 8-9'."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return ", ".join(f"{int(r[0])}-{int(r[-1])}" if len(r) > 1 else str(int(r[0])) for r in np.split(rows, breaks) if len(r))


def _layout_line(summary: dict[str, Any]) -> str:
    """One line on where the parameters live, e.g. `layout fsdp, mesh data=1 fsdp=8 tensor=1, ...`."""
    mesh = " ".join(f"{k}={v}" for k, v in summary["mesh"].items())
    return (f"layout {summary['layout']} (embedding {summary['embedding']}), mesh {mesh}: parameters "
            f"{summary['param_bytes_per_device'] / 2**20:.2f} of {summary['param_bytes'] / 2**20:.2f} MiB per device, "
            f"{100 * summary['replicated_param_share']:.1f}% replicated")


class Interrupted(Exception):
    """Raised after a checkpoint was saved because the run was asked to stop."""


class Diverged(Exception):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"loss became NaN/inf at step {step}")


def run_directory(config: RunConfig) -> str:
    return os.path.join(config.train.output_dir, config.name, run_id(config))


# A stop request (SIGINT/SIGTERM) outlives the run it interrupted: a sweep worker that was asked to
# stop must not start its next trial, and one asked between trials stops at the next run's first step.
_STOP: dict[str, str | None] = {"stop": None}


def request_stop(signum: int, frame=None) -> None:
    """Signal handler: SIGINT/SIGTERM asks for a checkpoint and a clean exit; a second Ctrl-C gives up.

    A repeated SIGTERM never escalates: a launcher forwards it to workers that may already have had
    the terminal's SIGINT, and they must still save.
    """
    if _STOP["stop"] is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _STOP["stop"] = signal.Signals(signum).name


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop, if any."""
    return _STOP["stop"]


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (never mid-step)."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread
            pass
    try:
        yield _STOP
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@functools.lru_cache(maxsize=1)
def dataset_of(config):
    """The data set of a data config, built once per process (sweep workers run many trials on it;
    `scaling train` builds it before anything else so bad data stops with one line)."""
    return config.build()


def _reference_logloss(path: str) -> float | None:
    if not path:
        return None
    record = read_record(path)
    return float(record["final_eval"]["logloss"])


def train(config: RunConfig, *, restart: bool = False) -> RunRecord:
    """Train (or resume, or return the finished record of) the run described by `config`."""
    run_dir = run_directory(config)
    result_path = os.path.join(run_dir, "result.json")
    primary = is_primary()
    if restart and os.path.isdir(run_dir) and primary:
        shutil.rmtree(run_dir)
    barrier("scaling-train-start")  # every process sees the directory as process 0 left it
    if os.path.exists(result_path):
        existing = read_record(result_path)
        if existing.get("status") == "ok":
            return RunRecord(**{k: v for k, v in existing.items() if k in RunRecord.__dataclass_fields__})
    os.makedirs(run_dir, exist_ok=True)
    if primary:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(config))
    return _Run(config, run_dir).execute()


class _Run:
    def __init__(self, config: RunConfig, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.rid = run_id(config)
        self.t0 = time.time()
        self.prior_wall = 0.0
        self.primary = is_primary()

    # -- record helpers -------------------------------------------------------------------------
    def _record(self, status, reason, *, counts=None, flops=(0.0, None), emb_bytes=0.0, step=0,
                progress=None, reference=None, rate=0.0) -> RunRecord:
        cfg = self.config
        progress = progress or {}
        examples = step * cfg.train.batch_size
        evals = progress.get("evals", [])
        final = evals[-1]["metrics"] if evals else {}
        key, mode = getattr(self, "selection", ("logloss", "min"))
        pick = max if mode == "max" else min
        best = pick(evals, key=lambda e: e["metrics"][key]) if evals else {"metrics": {}, "step": -1}
        return RunRecord(
            run_id=self.rid,
            name=cfg.name,
            family=cfg.model.name,
            size=getattr(cfg.model, "size", "custom"),
            seed=cfg.seed,
            status=status,
            reason=reason,
            config=to_dict(cfg),
            params_dense=counts.dense if counts else 0,
            params_embedding=counts.embedding if counts else 0,
            flops_per_example_analytic=float(flops[0]),
            flops_per_example_xla=None if flops[1] is None else float(flops[1]),
            embedding_bytes_per_example=float(emb_bytes),
            examples_seen=examples,
            steps=step,
            train_flops=3.0 * float(flops[0]) * examples,
            final_eval=final,
            best_eval=best["metrics"],
            best_eval_step=best["step"],
            data_reference=reference or {},
            wall_time_s=self.prior_wall + time.time() - self.t0,
            examples_per_s=rate,
            memory={**peak_memory_bytes(), **getattr(self, "step_memory", {})},
            sharding=getattr(self, "sharding", {}),
            device=device_info(),
            versions=library_versions(),
            resumed_from=list(progress.get("resumed_from", [])),
            embedding_overflow=int(progress.get("embedding_overflow", 0)),
            eval_embedding_overflow=int(progress.get("eval_embedding_overflow", 0)),
        )

    def execute(self) -> RunRecord:
        try:
            return self._train()
        except (Interrupted, ConfigError):  # bad input (e.g. a malformed data file) is the user's to fix
            raise
        except Diverged as err:
            record = self._record("diverged", str(err), **self.partial)
            if self.primary:
                record.write(self.run_dir)
            return record
        except Exception as err:
            name = "traceback.txt" if self.primary else f"traceback.p{jax.process_index()}.txt"
            with open(os.path.join(self.run_dir, name), "w") as f:
                f.write(traceback.format_exc())
            record = self._record(classify_failure(err), f"{type(err).__name__}: {err}", **getattr(self, "partial", {}))
            if self.primary:
                record.write(self.run_dir)
            else:  # the record is process 0's to write; this process's failure must not go unseen
                print(f"error on process {jax.process_index()}: {record.reason} "
                      f"(traceback in {os.path.join(self.run_dir, name)})", file=sys.stderr, flush=True)
            return record

    # -- the loop -------------------------------------------------------------------------------
    def _train(self) -> RunRecord:
        cfg = self.config
        self.partial: dict[str, Any] = {}
        if is_fitted(cfg.model):  # a classical baseline with its own solver: fit, evaluate, record
            if jax.process_count() > 1:
                raise ConfigError("model.name", f"'{cfg.model.name}' is fitted by a one-process solver; run it as one "
                                                "process (no SCALING_COORDINATOR, no multi-task srun step)")
            return fit_run(cfg, self.run_dir, dataset_of(cfg.data))
        dataset = dataset_of(cfg.data)
        spec = dataset.spec
        reference = dataset.reference_metrics()
        # Counted on an abstract model built outside the mesh: natural table sizes, and XLA's FLOPs
        # of the whole program (under the mesh the layout's constraints would partition it).
        model = nnx.eval_shape(lambda: build_model(cfg.model, spec, rngs=nnx.Rngs(cfg.seed)))
        counts = param_counts(model)
        analytic = cfg.model.flops_per_example(spec)
        emb_bytes = cfg.model.embedding_bytes_per_example(spec)
        xla = xla_flops_per_example(model, spec, max_len=getattr(cfg.model, "max_len", None))
        del model
        setup = prepare(cfg, dataset, _reference_logloss(cfg.train.reference_run))
        partitioner, task, abstract = setup.partitioner, setup.task, setup.abstract
        self.selection = task.selection
        self.sharding = partitioner.summary(abstract)
        self.partial = dict(counts=counts, flops=(analytic, xla), emb_bytes=emb_bytes, reference=reference)

        with partitioner.activate():
            checkpointer = Checkpointer(self.run_dir, cfg.train.keep_checkpoints, layouts_json(partitioner, abstract))
            start_step, progress, data_state = 0, {"evals": [], "wall_time_s": 0.0}, None
            latest = checkpointer.latest_step()
            if latest is not None:  # restored into this run's layout (orbax reshards; tables re-laid out)
                plan = RestorePlan.make(partitioner, abstract, checkpointer.saved_layouts(latest))
                state, data_state, progress = checkpointer.restore(latest, plan.target)
                state = plan.finish(state)
                for note in plan.notes if self.primary else ():
                    print(note, file=sys.stderr, flush=True)
                start_step = latest
                progress["resumed_from"] = [*progress.get("resumed_from", []), latest]
                self.prior_wall = float(progress.get("wall_time_s", 0.0))
            else:
                state = partitioner.init(setup.init_state, abstract)

            # This process reads only the rows of each global batch its devices hold.
            batch_size = cfg.train.batch_size
            rows = partitioner.local_rows(batch_size)
            iterator = task.train_iterator(batch_size, cfg.seed, rows=rows if len(rows) < batch_size else None)
            if data_state is not None:
                iterator.set_state(data_state)
            if jax.process_count() > 1:
                self.sharding["process_rows"] = partitioner.process_rows(batch_size)
                print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.local_devices())} devices, "
                      f"rows {_ranges_text(rows)} of each global batch of {batch_size}", file=sys.stderr, flush=True)

            step_fn = setup.compile_train_step()
            self.step_memory = compiled_memory(step_fn)
            eval_step = partitioner.jit_eval_step(setup.fns.eval_outputs, abstract)

            def evaluator(state) -> tuple[dict, int]:
                """(held-out metrics, lookups that got zero vectors for row_wise capacity)."""
                dropped = []

                def outputs(chunk):
                    out, overflow = eval_step(state, partitioner.shard_batch(chunk))
                    dropped.append(overflow)
                    return out

                metrics = task.evaluate(outputs)
                return metrics, sum(int(x) for x in jax.device_get(dropped))

            primary = self.primary  # one process writes the run's files and draws its progress
            metrics_file = MetricsFile(self.run_dir, start_step if latest is not None else None, enabled=primary)
            wandb = WandbMirror(cfg.logging, cfg, self.rid, self.run_dir, {
                "params_dense": counts.dense, "params_embedding": counts.embedding,
                "gflops_per_example": analytic / 1e9, "size": getattr(cfg.model, "size", "custom"),
            }, enabled=primary)
            bar = ProgressBar(cfg.logging.progress, cfg.train.steps, start_step, f"{cfg.model.name}:{getattr(cfg.model, 'size', '')}",
                              silent=not primary)
            bar.note(_layout_line(self.sharding))
            if self.step_memory:
                mb = {k: v / 2**20 for k, v in self.step_memory.items()}
                bar.note(f"compiled train step: arguments {mb['step_argument_bytes']:.1f} MiB, "
                         f"temporaries {mb['step_temp_bytes']:.1f} MiB, outputs {mb['step_output_bytes']:.1f} MiB per device")
            rate = 0.0
            try:
                with _stop_requests() as stop:
                    state, rate = self._loop(state, step_fn, evaluator, iterator,
                                             functools.partial(partitioner.shard_local_batch, global_batch=batch_size),
                                             checkpointer, metrics_file, wandb, bar, progress, start_step, stop)
            finally:
                bar.close()
            steps = cfg.train.steps
            record = self._record("ok", "", counts=counts, flops=(analytic, xla), emb_bytes=emb_bytes,
                                  step=steps, progress=progress, reference=reference, rate=rate)
            if primary:
                record.write(self.run_dir)
            wandb.finish(record.to_json() | {f"final/{k}": v for k, v in record.final_eval.items()})
            checkpointer.close()
            return record

    def _loop(self, state, step_fn, evaluator, iterator, shard_batch, checkpointer, metrics_file,
              wandb, bar, progress, start_step, stop):
        cfg = self.config.train
        window: list[dict[str, jax.Array]] = []
        timed_from, timed_steps, rate = None, 0, 0.0
        step = start_step
        several = jax.process_count() > 1

        def stopping() -> bool:
            """Whether to stop after this step: at once with one process; agreed on at log
            intervals with several (a host collective), so that all save the same step."""
            if not several:
                return stop["stop"] is not None
            if step % cfg.log_every and step != cfg.steps:
                return False
            return any_process(stop["stop"] is not None)

        def save(at_step: int) -> None:
            if checkpointer.latest_step() == at_step:  # e.g. a stop request right after a periodic save
                return
            progress["wall_time_s"] = self.prior_wall + time.time() - self.t0
            # the overflow of steps not yet logged belongs to the checkpoint too (they are not rerun)
            pending = int(sum(int(m[OVERFLOW_METRIC]) for m in jax.device_get(window)))
            saved = {**progress, "embedding_overflow": int(progress.get("embedding_overflow", 0)) + pending}
            checkpointer.save(at_step, state, iterator.get_state(), saved)

        def evaluate(at_step: int) -> None:
            result, overflow = evaluator(state)
            progress["evals"].append({"step": at_step, "metrics": result})
            row = {"step": at_step, "split": "eval", **{f"eval/{k}": v for k, v in result.items()},
                   f"eval/{OVERFLOW_METRIC}": overflow}
            progress["eval_embedding_overflow"] = int(progress.get("eval_embedding_overflow", 0)) + overflow
            if overflow:  # these scores were computed from zero vectors
                bar.warn(f"step {at_step}: evaluation dropped {overflow} embedding lookups past the row_wise capacity "
                         "(their vectors were zeros); raise sharding.embedding_capacity")
            metrics_file.write(row)
            wandb.log(row, at_step)

        while step < cfg.steps:
            batch = shard_batch(next(iterator))
            state, step_metrics = step_fn(state, batch)
            window.append(step_metrics)
            step += 1
            if timed_from is None:  # exclude compile/warm-up from throughput
                jax.block_until_ready(step_metrics["loss"])
                timed_from, timed_steps = time.time(), 0
            else:
                timed_steps += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                fetched = jax.device_get(window)
                window = []
                nonfinite = int(jax.device_get(state.nonfinite_step))
                if nonfinite >= 0:
                    self.partial.update(step=nonfinite, progress=progress)
                    raise Diverged(nonfinite)
                elapsed = time.time() - timed_from
                rate = timed_steps * cfg.batch_size / elapsed if elapsed > 0 and timed_steps else 0.0
                loss = float(np.mean([m["loss"] for m in fetched]))
                overflow = int(sum(int(m[OVERFLOW_METRIC]) for m in fetched))
                progress["embedding_overflow"] = int(progress.get("embedding_overflow", 0)) + overflow
                row = {"step": step, "split": "train", "train/loss": loss,
                       "train/grad_norm_dense": float(np.mean([m["grad_norm_dense"] for m in fetched])),
                       f"train/{OVERFLOW_METRIC}": overflow,
                       "examples_seen": step * cfg.batch_size, "examples_per_s": rate,
                       "wall_time_s": self.prior_wall + time.time() - self.t0}
                metrics_file.write(row)
                wandb.log(row, step)
                if overflow:  # never silent: these lookups trained on zero vectors
                    bar.warn(f"step {step}: {overflow} embedding lookups in the last {len(fetched)} steps got zero vectors, "
                             f"their ids dropped past the row_wise capacity ({progress['embedding_overflow']} in all); "
                             "raise sharding.embedding_capacity")
                bar.update(step, loss, rate)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                evaluate(step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                save(step)
            if step < cfg.steps and stopping():
                save(step)
                checkpointer.close()
                signal_name = stop["stop"] or "a stop request to another process"
                raise Interrupted(f"{signal_name} at step {step}; checkpoint saved in {checkpointer.directory}")
        return state, rate
