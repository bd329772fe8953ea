"""Run records -> the points a scaling fit uses.

    runs = load_local("runs/quickstart")           # every */result.json (+ sweep.json if present)
    points = scale_points(runs.ok, metric="logloss")

Steps, in the order the brief prescribes: drop runs that did not finish ok (each with its logged
reason); among runs that differ only in a tuned key (e.g. the learning rate of a per-size grid),
keep the value with the best mean *validation* metric and flag it when it sits on the grid's edge;
then aggregate seeds per (family, size): mean, standard error, n.

Metric names: `metric="logloss"` reads `valid_logloss` for selection and `test_logloss` for the
curve when the runs report the two halves of the held-out set, else `logloss` for both (the report
says which). Any key of a record's `final_eval` works (e.g. `teacher_logloss`, `ne`, `auc`).
Next-item runs evaluate several times and pick the evaluation with the best validation NDCG@10
(the record's `best_eval`); that evaluation is the one read here (`hr@10`, `ndcg@10`, `mrr`, ...).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished (or failed) run, from its result.json or its W&B summary."""

    run_id: str
    family: str
    size: str
    seed: int
    status: str
    reason: str
    gflops_per_example: float
    train_flops: float
    examples: int
    params_dense: int
    params_embedding: int
    final_eval: Mapping[str, float]
    data_reference: Mapping[str, float]
    config: Mapping[str, Any]
    wall_time_s: float = 0.0
    fit: Mapping[str, float] = dataclasses.field(default_factory=dict)  # fitted baselines' fit facts

    def get(self, key: str) -> Any:
        """A config value by dotted key, e.g. `optimizer.dense.learning_rate` (None if absent)."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def metric(self, metric: str, split: str) -> float | None:
        """`split` is 'valid' or 'test': the half of the held-out set, when the run reports it."""
        value = self.final_eval.get(f"{split}_{metric}", self.final_eval.get(metric))
        return None if value is None or not math.isfinite(value) else float(value)


@dataclasses.dataclass(frozen=True)
class RunSet:
    ok: tuple[Run, ...]
    dropped: tuple[tuple[str, str], ...]  # (run_id, why)
    tune: tuple[str, ...]
    source: str


_HIGHER_IS_BETTER = ("auc", "hr@", "ndcg@", "mrr", "coverage@", "recall@")


def higher_is_better(metric: str) -> bool:
    """AUC and the ranking metrics improve upwards; losses and NE downwards."""
    return metric.startswith(_HIGHER_IS_BETTER)


def _reported_eval(record: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation a record reports: the validation-picked one for next-item runs, else the final."""
    best = record.get("best_eval") or {}
    return dict(best if "valid_ndcg@10" in best else (record.get("final_eval") or {}))


def run_from_record(record: Mapping[str, Any]) -> Run:
    """A result.json dict (or a W&B run summary holding the same keys) -> Run."""
    return Run(
        run_id=str(record["run_id"]),
        family=str(record["family"]),
        size=str(record.get("size", "custom")),
        seed=int(record.get("seed", 0)),
        status=str(record.get("status", "failed")),
        reason=str(record.get("reason", "")),
        gflops_per_example=float(record.get("flops_per_example_analytic", 0.0)) / 1e9,
        train_flops=float(record.get("train_flops", 0.0)),
        examples=int(record.get("examples_seen", 0)),
        params_dense=int(record.get("params_dense", 0)),
        params_embedding=int(record.get("params_embedding", 0)),
        final_eval=_reported_eval(record),
        data_reference=dict(record.get("data_reference") or {}),
        config=dict(record.get("config") or {}),
        wall_time_s=float(record.get("wall_time_s") or 0.0),
        fit=dict(record.get("fit") or {}),
    )


def split_ok(runs: Iterable[Run], tune: Sequence[str], source: str) -> RunSet:
    ok, dropped = [], []
    for run in runs:
        if run.status != "ok":
            dropped.append((run.run_id, f"status {run.status}: {run.reason}"[:200]))
        elif run.gflops_per_example <= 0 and not run.fit:  # fitted baselines have no training forward pass
            dropped.append((run.run_id, "no FLOP count in its record"))
        else:
            ok.append(run)
    return RunSet(tuple(ok), tuple(dropped), tuple(tune), source)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def infer_tuned(runs: Sequence[Run]) -> tuple[str, ...]:
    """Config keys that vary among runs of the same (family, size): what was tuned.

    Seeds, names, logging and the data-size keys (train.steps, train.batch_size: a data-scaling
    axis, fitted by the two-variable law) are not tuning.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        groups[(run.family, run.size)].append(_flatten(run.config))
    varying: set[str] = set()
    for flats in groups.values():
        for key in set().union(*flats):
            if key in ("seed", "name", "train.output_dir", "train.steps", "train.batch_size") or key.startswith("logging."):
                continue
            if len({f.get(key) for f in flats}) > 1:
                varying.add(key)
    return tuple(sorted(varying))


def load_local(directory: str) -> RunSet:
    """Every `<directory>/*/result.json`; `sweep.json` (written by `scaling sweep`) names tuned keys."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory (expected runs/<sweep name>)")
    tune: Sequence[str] = ()
    manifest = os.path.join(directory, "sweep.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            tune = json.load(f).get("tune", ())
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*", "result.json"))):
        with open(path) as f:
            runs.append(run_from_record(json.load(f)))
    if not runs:
        raise FileNotFoundError(f"{directory}: no */result.json run records yet")
    if not os.path.exists(manifest):
        tune = infer_tuned([r for r in runs if r.status == "ok"])
    return split_ok(runs, tune, directory)


def merge_run_sets(sets: Sequence[RunSet]) -> RunSet:
    """Several sweeps' runs read as one set (e.g. the baselines beside SASRec and HSTU on one split)."""
    if len(sets) == 1:
        return sets[0]
    tune = tuple(dict.fromkeys(k for s in sets for k in s.tune))
    return RunSet(tuple(r for s in sets for r in s.ok), tuple(d for s in sets for d in s.dropped), tune,
                  " + ".join(s.source for s in sets))


@dataclasses.dataclass(frozen=True)
class TunedChoice:
    """The best value of the tuned keys for one (family, size, other settings) group."""

    values: tuple[tuple[str, Any], ...]  # the chosen (key, value)s
    on_edge: tuple[str, ...]  # tuned keys whose best value is the smallest or largest tried
    edge_margin: float | None  # how much the best (edge) setting beats the next-best one (mean valid metric)
    tried: tuple[tuple[tuple[tuple[str, Any], ...], float], ...]  # (values, mean valid metric)


@dataclasses.dataclass(frozen=True)
class ScalePoint:
    """One size of one family after selection: the seed mean of the test metric."""

    family: str
    size: str
    gflops_per_example: float
    train_flops: float
    examples: int  # training examples per run (a data-size axis when it varies)
    params_dense: int
    params_embedding: int
    mean: float
    sem: float  # standard error over seeds (nan with one seed)
    n: int
    values: tuple[float, ...]  # per seed
    seeds: tuple[int, ...]
    choice: TunedChoice | None
    run_ids: tuple[str, ...] = ()  # the chosen runs (one per seed)


def _group_key(run: Run, tune: Sequence[str]) -> tuple:
    # Everything that defines the trial except the seed and the tuned keys.
    config = json.loads(json.dumps(run.config))
    config.pop("seed", None)
    config.pop("name", None)
    config.pop("logging", None)
    for key in tune:
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return (run.family, run.size, json.dumps(config, sort_keys=True, default=str))


def _select(runs: list[Run], tune: Sequence[str], metric: str) -> tuple[list[Run], TunedChoice | None]:
    if not tune:
        return runs, None
    by_value: dict[tuple, list[Run]] = collections.defaultdict(list)
    for run in runs:
        by_value[tuple((k, run.get(k)) for k in tune)].append(run)
    scored = []
    for values, members in by_value.items():
        vals = [v for r in members if (v := r.metric(metric, "valid")) is not None]
        if vals:
            scored.append((values, sum(vals) / len(vals)))
    if not scored:
        return [], None
    lower_is_better = not higher_is_better(metric)
    best_values, _ = (min if lower_is_better else max)(scored, key=lambda item: item[1])
    edge = []
    for i, key in enumerate(tune):
        tried = sorted({v[i][1] for v, _ in scored if isinstance(v[i][1], (int, float))})
        if len(tried) >= 2 and best_values[i][1] in (tried[0], tried[-1]):
            edge.append(key)
    others = sorted(m for v, m in scored if v != best_values)
    margin = None
    if edge and others:
        best = min(m for v, m in scored if v == best_values)
        margin = abs((others[0] if lower_is_better else others[-1]) - best)
    choice = TunedChoice(best_values, tuple(edge), margin, tuple(sorted(scored, key=lambda item: str(item[0]))))
    return by_value[best_values], choice


def scale_points(runs: RunSet, metric: str = "logloss") -> list[ScalePoint]:
    """Per (family, size): tuned-key selection on valid_<metric>, then seed mean of test_<metric>."""
    groups: dict[tuple, list[Run]] = collections.defaultdict(list)
    for run in runs.ok:
        groups[_group_key(run, runs.tune)].append(run)
    points = []
    for (family, size, _), members in groups.items():
        chosen, choice = _select(members, runs.tune, metric)
        vals = [(r.seed, v) for r in chosen if (v := r.metric(metric, "test")) is not None]
        if not vals:
            continue
        values = [v for _, v in vals]
        n = len(values)
        mean = sum(values) / n
        sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
        first = chosen[0]
        points.append(ScalePoint(family, size, first.gflops_per_example, first.train_flops, first.examples, first.params_dense,
                                 first.params_embedding, mean, sem, n, tuple(values), tuple(s for s, _ in vals), choice,
                                 tuple(r.run_id for r in chosen)))
    points.sort(key=lambda p: (p.family, p.gflops_per_example, p.examples))
    return points


def reference_floor(runs: RunSet, metric: str) -> float | None:
    """The data's Bayes-optimal value of `metric` on the test half (for ranking metrics the oracle's,
    a ceiling), when the data knows it."""
    keys = {"logloss": ("test_bayes_logloss", "bayes_logloss"),
            "teacher_logloss": ("test_bayes_entropy", "bayes_entropy")}.get(metric, (f"test_oracle_{metric}",))
    for run in runs.ok:
        for key in keys:
            if key in run.data_reference:
                return float(run.data_reference[key])
    return None
