"""Orbax checkpoints of the train state, the data iterator position and the loop's progress.

A checkpoint at step s holds three items:
  state     the TrainState pytree (params, optimizer states, step)
  data      the grain iterator state, so the next batch after restore is batch s
  progress  JSON: examples seen, wall time so far, eval history and best eval
Saves are atomic (orbax writes to a temporary directory and renames), so a SIGKILL mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keep-last-N orbax checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "progress"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, progress: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                progress=ocp.args.JsonSave(progress),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore step `step` into the shapes/shardings of `abstract_state`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data, restored.progress

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
