"""Fit, evaluate and record a fitted baseline (popularity, kNN, ALS, Funk MF): the fitted families'
counterpart of the training loop, writing the same run directory and run record.

    runs/<name>/<run_id>/config.yaml, metrics.jsonl (one eval line), result.json

The record's `best_eval` and `final_eval` hold the valid_* and test_* metrics of the one fit (and
the test metrics unprefixed, as for trained models); `fit` holds the fit and evaluation times, the
fit's peak host memory (tracemalloc: numpy and Python allocations) and the solver's details.
Evaluation reads each user's whole history (L = the longest history), so no baseline is cut to a
window the sequence models chose.
"""

from __future__ import annotations

import time
import tracemalloc

from scaling.config import RunConfig, run_id
from scaling.config_schema import to_dict
from scaling.train.loggers import MetricsFile, WandbMirror
from scaling.train.run_record import RunRecord, device_info, library_versions, peak_memory_bytes


def fit_run(config: RunConfig, run_dir: str, dataset) -> RunRecord:
    """Fit `config.model` on `dataset`'s training events and evaluate it on valid and test."""
    model = config.model
    t0 = time.time()
    tracemalloc.start()
    try:
        fitted = model.fit(dataset.split, seed=config.seed)
        _, fit_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fit_time = time.time() - t0

    t1 = time.time()
    max_len = int(dataset.log.lengths.max())
    result: dict[str, float] = {}
    for stage in ("valid", "test"):
        metrics = dataset.evaluate(fitted.score, stage, max_len=max_len, batch_size=config.train.eval_batch_size)
        result.update({f"{stage}_{k}": v for k, v in metrics.items()})
    result.update({k[len("test_"):]: v for k, v in result.items() if k.startswith("test_")})
    eval_time = time.time() - t1

    fit = {"fit_time_s": fit_time, "eval_time_s": eval_time, "fit_peak_host_bytes": float(fit_peak),
           "scoring_flops": float(fitted.scoring_flops), "parameters": float(fitted.parameters),
           **{k: float(v) for k, v in fitted.details.items()}}
    rid = run_id(config)
    MetricsFile(run_dir, None).write({"step": 0, "split": "eval", **{f"eval/{k}": v for k, v in result.items()}})
    record = RunRecord(
        run_id=rid, name=config.name, family=model.name, size=getattr(model, "size", "custom"), seed=config.seed,
        status="ok", reason="", config=to_dict(config), params_dense=0, params_embedding=int(fitted.parameters),
        flops_per_example_analytic=0.0, flops_per_example_xla=None, embedding_bytes_per_example=0.0,
        examples_seen=int((dataset.split.train_end - dataset.log.offsets[:-1]).sum()), steps=0, train_flops=0.0,
        final_eval=result, best_eval=result, best_eval_step=0, data_reference=dataset.reference_metrics(),
        wall_time_s=time.time() - t0, examples_per_s=0.0, memory=peak_memory_bytes(), device=device_info(),
        versions=library_versions(), fit=fit,
    )
    record.write(run_dir)
    wandb = WandbMirror(config.logging, config, rid, run_dir, {"params_embedding": int(fitted.parameters),
                                                                "size": getattr(model, "size", "custom")})
    wandb.log({"step": 0, **{f"eval/{k}": v for k, v in result.items()}}, 0)
    wandb.finish(record.to_json() | {f"final/{k}": v for k, v in result.items()})
    return record
