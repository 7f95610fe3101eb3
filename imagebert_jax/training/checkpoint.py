"""Checkpoints through Orbax's CheckpointManager.

A checkpoint holds the train state (step, parameters, optimizer state, skip counters), restored
against an abstract target that carries the shardings of the current mesh, so a checkpoint written
on one mesh restores on another. Saves are asynchronous; `wait()` before reading or exiting.
Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint
appears whole or not at all.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from imagebert_jax import parallel, paths
from imagebert_jax.training.state import TrainState
from imagebert_jax.errors import CheckpointMismatch


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "skipped": state.skipped, "skipped_in_a_row": state.skipped_in_a_row}


def _from_dict(d: dict) -> TrainState:
  return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"],
                    skipped=d["skipped"], skipped_in_a_row=d["skipped_in_a_row"])


class Checkpointer:
  """Saves the steps the training loop asks for; keeps the newest `keep`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = paths.absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState) -> bool:
    saved = self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state))),
        force=True)
    if saved:
      logging.info("Saving checkpoint at step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract: TrainState) -> TrainState:
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_dict(abstract))))
    return _from_dict(restored["state"])

  def restore_latest(self, abstract: TrainState) -> tuple[TrainState | None, int | None]:
    """The newest checkpoint that restores.

    A checkpoint that holds a different train state than `abstract` (another model or optimizer
    setting) is an error naming the first difference. One that cannot be read (damaged) is moved
    to `../damaged_checkpoints/` with a warning and the one before it is tried; with several
    processes they take that decision together.
    """
    wanted = _shapes(_as_dict(abstract))
    for step in sorted(self.all_steps(), reverse=True):
      folder = paths.join(self.directory, str(step), "state")
      try:
        saved = tree_metadata(folder)
      except Exception:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
        saved = None
      if saved is not None:
        difference = _first_difference(_shapes(saved), wanted)
        if difference:
          raise CheckpointMismatch(
              f"{self.directory}/{step}: the checkpoint holds a different train state than this "
              f"config builds ({difference}); was a model or optimizer setting changed? Use a "
              "new work directory, or start from its parameters with init.checkpoint")
      error = None
      try:
        state = self.restore(step, abstract)
      except Exception as e:  # noqa: BLE001 - any failure to read it means it is unusable
        state, error = None, e
      if parallel.all_processes(state is not None):
        return state, step
      logging.warning("Checkpoint at step %d in %s cannot be restored (%s); using the one before "
                      "it", step, self.directory,
                      f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error
                      else "another process could not read it")
      self._set_aside(step)
    return None, None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = paths.join(paths.dirname(self.directory), "damaged_checkpoints")
      paths.makedirs(aside)
      paths.replace(paths.join(self.directory, str(step)),
                    paths.join(aside, f"{step}-{int(time.time())}"))
    parallel.barrier(f"set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


BEST_DIR = "best_checkpoint"  # beside a stage's rolling `checkpoints/`


class BestCheckpoint:
  """The parameters of the step with the highest validation metric, kept apart from the rolling
  checkpoints: `<stage>/best_checkpoint/<step>/state` ({'params'}), the metric in Orbax's
  metadata of that step, one step kept.

  `consider(step, params, value)` saves when `value` beats the best so far (a tie keeps the
  earlier step). The best so far is read back from disk, so a resumed run compares against it;
  an exactly resumed run that validates a step again gets the same value and rewrites nothing.
  """

  def __init__(self, directory: str, metric: str):
    self.directory = paths.absolute(directory)
    self.metric = metric
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           best_fn=lambda m: m[metric], best_mode="max")
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    step = self.manager.best_step()
    self._best = (None, None) if step is None else (
        step, float(self.manager.metrics(step)[metric]))

  def best(self) -> tuple[int | None, float | None]:
    """(step, metric value) of the best checkpoint kept, or (None, None)."""
    return self._best

  def consider(self, step: int, params: Any, value: float) -> bool:
    """Keeps `params` when `value` is better than the best so far; True when it did."""
    best = self._best[1]
    if best is not None and not value > best:
      return False
    if step in self.manager.all_steps():  # a step validated before a resume, now better
      self.manager.delete(step)
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params})), metrics={self.metric: float(value)},
                      force=True)
    self._best = (int(step), float(value))
    return True

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def has_checkpoint(directory: str) -> bool:
  """Whether a CheckpointManager folder holds at least one complete step."""
  return paths.isdir(directory) and any(
      d.isdigit() and paths.isdir(paths.join(directory, d, "state"))
      for d in paths.listdir(directory))


def step_of(path: str) -> int | None:
  """The step of the checkpoint `state_dir(path)` resolves to (None when the path names none)."""
  folder = paths.basename(paths.dirname(state_dir(path)))
  return int(folder) if folder.isdigit() else None


def _shapes(tree: Any) -> Any:
  """Structure and shapes of a train state or of a checkpoint's metadata, in one form: dicts by
  key, lists for sequences, field dicts for named tuples (None when they have no fields)."""
  if isinstance(tree, dict):
    return {str(k): _shapes(v) for k, v in tree.items()}
  if hasattr(tree, "_fields"):
    return {f: _shapes(getattr(tree, f)) for f in tree._fields} if tree._fields else None
  if isinstance(tree, (list, tuple)):
    return [_shapes(v) for v in tree]
  if tree is None:
    return None
  return tuple(getattr(tree, "shape", ()))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
  if type(a) is not type(b):
    return f"{path or '/'}: {type(a).__name__} in the checkpoint, {type(b).__name__} here"
  if isinstance(a, dict):
    if set(a) != set(b):
      extra, missing = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
      return f"{path or '/'}: keys only in the checkpoint {extra}, only here {missing}"
    for k in sorted(a):
      d = _first_difference(a[k], b[k], f"{path}/{k}")
      if d:
        return d
    return ""
  if isinstance(a, list):
    if len(a) != len(b):
      return f"{path or '/'}: {len(a)} entries in the checkpoint, {len(b)} here"
    for i, (x, y) in enumerate(zip(a, b)):
      d = _first_difference(x, y, f"{path}/{i}")
      if d:
        return d
    return ""
  return "" if a == b else f"{path}: shape {a} in the checkpoint, {b} here"


def _restore_args(abstract) -> ocp.ArrayRestoreArgs:
  return ocp.ArrayRestoreArgs(sharding=abstract.sharding, global_shape=abstract.shape,
                              dtype=abstract.dtype)


# ------------------------------------------------------------------------------------------------
# Starting from another run's parameters.
# ------------------------------------------------------------------------------------------------
def state_dir(path: str) -> str:
  """The saved train state inside `path`: a CheckpointManager folder (its newest step), a step
  folder, or the state folder itself. Raises FileNotFoundError naming the path."""
  path = paths.absolute(path)
  if paths.isdir(paths.join(path, "state")):
    return paths.join(path, "state")
  if paths.isdir(path):
    steps = sorted((int(d) for d in paths.listdir(path) if d.isdigit()
                    and paths.isdir(paths.join(path, d, "state"))), reverse=True)
    if steps:
      return paths.join(path, str(steps[0]), "state")
    if paths.exists(paths.join(path, "_METADATA")) or paths.exists(
        paths.join(path, "manifest.ocdbt")):
      return path
  raise FileNotFoundError(f"{path}: no checkpoint there")


def tree_metadata(path: str) -> Any:
  """The saved tree's structure (shapes and dtypes, no data) of one checkpoint item folder."""
  # Read through the item handler: the checkpointer would also look for step metadata, which
  # lives one folder up, and warn that it is missing.
  return ocp.PyTreeCheckpointHandler().metadata(paths.path(path)).tree


def flatten_paths(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  """A nested dict as {path of string keys: leaf} (layer indices become '0', '1', ...)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten_paths(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def nest_like(flat: dict[tuple, Any], like: Any, prefix: tuple = ()) -> Any:
  """Rebuilds `like`'s structure (and key types) from a flat dict keyed by string paths."""
  if isinstance(like, dict):
    return {k: nest_like(flat, v, prefix + (str(k),)) for k, v in like.items()}
  return flat[prefix]


class ParamsDiff(NamedTuple):
  """How a checkpoint's parameters compare with a model's, by path of string keys."""
  common: dict[tuple, Any]      # the model's abstract parameters that the checkpoint also has
  shapes: list[tuple]           # (path, checkpoint shape, model shape) where they differ
  missing: list[str]            # model paths the checkpoint lacks
  unexpected: list[str]         # checkpoint paths the model lacks


def compare_params(directory: str, abstract_params: Any) -> ParamsDiff:
  """Compares the parameters saved in a state folder with `abstract_params` (metadata only).
  Raises ValueError when the checkpoint holds no parameters."""
  meta = tree_metadata(directory)
  if "params" not in meta:
    raise ValueError(f"{directory}: the checkpoint holds no 'params'")
  source = flatten_paths(meta["params"])
  target = flatten_paths(abstract_params)
  shapes = [(p, tuple(source[p].shape), tuple(target[p].shape)) for p in target
            if p in source and tuple(source[p].shape) != tuple(target[p].shape)]
  return ParamsDiff({p: a for p, a in target.items() if p in source}, shapes,
                    sorted("/".join(p) for p in target if p not in source),
                    sorted("/".join(p) for p in source if p not in target))


def restore_leaves(directory: str, leaves: dict[tuple, Any]) -> dict[tuple, Any]:
  """Restores the parameters at `leaves`' paths from a state folder, each placed as its
  abstract value (ShapeDtypeStruct with sharding) says; the checkpoint's others are not read."""
  item: dict = {}
  for p, a in leaves.items():
    node = item.setdefault("params", {})
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = a
  restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=jax.tree.map(_restore_args, item), partial_restore=True))
  return flatten_paths(restored["params"])


def load_params(path: str, abstract_params: Any) -> tuple[dict[tuple, Any], list[str], list[str]]:
  """Restores the parameters of a checkpoint that the target also has, with the target's
  shardings. Returns (restored leaves by path, target paths the checkpoint lacks, checkpoint
  paths the target lacks). A parameter whose shape differs is an error naming it."""
  directory = state_dir(path)
  diff = compare_params(directory, abstract_params)
  if diff.shapes:
    bad = [f"{'/'.join(p)}: checkpoint {s}, model {t}" for p, s, t in diff.shapes]
    raise ValueError(f"{directory}: parameter shapes differ from the model's: {'; '.join(bad)}")
  return restore_leaves(directory, diff.common), diff.missing, diff.unexpected


# ------------------------------------------------------------------------------------------------
# The input pipeline's position, saved beside each checkpoint.
# ------------------------------------------------------------------------------------------------
class DataState:
  """Per-process input-pipeline state and the metrics of the unfinished log interval, one folder
  per checkpointed step: `<stage>/data_state/<step>/process_<i>/`."""

  def __init__(self, stage_dir: str):
    self.directory = paths.join(paths.absolute(stage_dir), "data_state")

  def _dir(self, step: int) -> str:
    return paths.join(self.directory, str(int(step)), f"process_{jax.process_index():05d}")

  def save(self, step: int, iterator: Any, pending_metrics: list[dict]) -> None:
    """Whole or not at all: locally a temporary folder renamed when complete; on a bucket
    (where a folder rename is a copy) the folder is written in place and its
    pending_metrics.json, written last, says it is complete."""
    final = self._dir(step)
    tmp = final if paths.is_url(final) else final + ".tmp"
    paths.rmtree(tmp)
    paths.makedirs(tmp)
    iterator.save(paths.join(tmp, "iterator"))
    paths.write_json(paths.join(tmp, _COMPLETE), pending_metrics, indent=None)
    if tmp != final:
      paths.rmtree(final)
      paths.replace(tmp, final)

  def has(self, step: int) -> bool:
    return paths.isfile(paths.join(self._dir(step), _COMPLETE))

  def restore(self, step: int, iterator: Any) -> list[dict] | None:
    """Restores the iterator; returns the pending metrics, or None when nothing was saved."""
    folder = self._dir(step)
    if not self.has(step):
      return None
    iterator.restore(paths.join(folder, "iterator"))
    return paths.read_json(paths.join(folder, _COMPLETE))

  def prune(self, keep_steps: list[int]) -> None:
    """Removes the states of steps that no longer have a checkpoint."""
    if jax.process_index() != 0 or not paths.isdir(self.directory):
      return
    keep = {str(int(s)) for s in keep_steps}
    for name in paths.listdir(self.directory):
      if name.isdigit() and name not in keep:
        paths.rmtree(paths.join(self.directory, name))


_COMPLETE = "pending_metrics.json"  # written last: a data-state folder without it is incomplete
