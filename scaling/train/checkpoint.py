"""Orbax checkpoints of the train state, the data iterator position and the loop's progress.

A checkpoint at step s holds four items:
  state     the TrainState pytree (params, optimizer states, step)
  data      the grain iterator state, so the next batch after restore is batch s; in a
            multi-process run every process's state, keyed by process index
            ({'process_count': n, 'processes': [state of process 0, ...]}), each process
            restoring its own
  progress  JSON: examples seen, wall time so far, eval history and best eval
  layouts   JSON: each embedding table's stored layout (scaling.sharding.relayout), so a run
            resumed under another placement or device count re-lays its tables out
Saves are atomic (orbax writes to a temporary directory and renames), so a SIGKILL mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from scaling.sharding.distributed import gather_json


class Checkpointer:
    """Keep-last-N orbax checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str, keep: int, layouts: dict | None = None):
        """layouts: the run's embedding table layouts (`relayout.layouts_json`), written with every save."""
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.layouts = layouts or {}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "progress", "layouts"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, progress: dict) -> None:
        """Every process calls it (orbax writes each process's shards; process 0 the JSON items)."""
        if jax.process_count() > 1:
            data_state = {"process_count": jax.process_count(), "processes": gather_json(data_state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                progress=ocp.args.JsonSave(progress),
                layouts=ocp.args.JsonSave(self.layouts),
            ),
            force=True,
        )

    def saved_layouts(self, step: int) -> dict | None:
        """The table layouts recorded at `step`; None for a checkpoint written before they were."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "layouts")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(layouts=ocp.args.JsonRestore())).layouts

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore step `step` into the shapes/shardings of `abstract_state` (its numpy leaves are
        restored as numpy arrays, whole, on the host)."""
        target = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(x),
                              abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, own_data_state(restored.data), restored.progress

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def own_data_state(saved: dict) -> dict:
    """This process's iterator state from a checkpoint's `data` item. A state saved by another
    number of processes serves too when all of them agree: the iterator position counts global
    batches, whichever rows of them a process reads."""
    if "processes" not in saved:
        return saved
    states = saved["processes"]
    if int(saved.get("process_count", len(states))) == jax.process_count():
        return states[jax.process_index()]
    if any(s != states[0] for s in states):
        raise ValueError(f"the checkpoint holds the data iterator states of {len(states)} processes, which differ; "
                         f"resume it with {len(states)} processes")
    return states[0]
