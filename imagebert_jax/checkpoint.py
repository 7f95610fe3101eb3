"""Checkpoints through Orbax's CheckpointManager.

A checkpoint holds the train state (step, parameters, optimizer state, skip counters), restored
against an abstract target that carries the shardings of the current mesh, so a checkpoint written
on one mesh restores on another. Saves are asynchronous; `wait()` before reading or exiting.
Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint
appears whole or not at all.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from imagebert_jax.state import TrainState


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "skipped": state.skipped, "skipped_in_a_row": state.skipped_in_a_row}


def _from_dict(d: dict) -> TrainState:
  return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"],
                    skipped=d["skipped"], skipped_in_a_row=d["skipped_in_a_row"])


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the newest `keep`."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
    saved = self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state))),
        force=force)
    if saved:
      logging.info("Saving checkpoint at step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract: TrainState) -> TrainState:
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_dict(abstract))))
    return _from_dict(restored["state"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint (e.g. to start another stage from them)."""
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(_restore_args, {"params": abstract_params}),
            partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _restore_args(abstract) -> ocp.ArrayRestoreArgs:
  return ocp.ArrayRestoreArgs(sharding=abstract.sharding, global_shape=abstract.shape,
                              dtype=abstract.dtype)
