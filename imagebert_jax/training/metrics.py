"""Metric writers (clu): the console, TensorBoard and `workdir/metrics.jsonl`; progress reports and
profiling (clu periodic actions).

Every scalar goes to all three. metrics.jsonl holds one JSON object per line with the stage, the
step and every scalar, so scripts and tests read runs without TensorBoard. Only process 0 writes
files. clu is imported where it is used: its metric writers import TensorFlow.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
import numpy as np

from imagebert_jax import paths


class JsonlWriter:
  """Appends {"stage", "step", scalars...} lines to a file (clu MetricWriter interface)."""

  def __init__(self, path: str, stage: str):
    self.path = path
    self.stage = stage
    paths.makedirs(paths.dirname(path) or ".")
    self._f = paths.open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"stage": self.stage, "step": int(step)}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else str(v)
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    del step, point_clouds, point_colors, configs

  def write_hparams(self, hparams):
    del hparams

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class Writer:
  """clu's default writer (the console log, and TensorBoard events in `<workdir>/<stage>`) and a
  JsonlWriter on `<workdir>/metrics.jsonl`, in one clu MultiWriter. Off process 0 only the
  console: the values are global, so one process writes the files."""

  def __init__(self, workdir: str, stage: str):
    from clu import metric_writers  # local: imports TensorFlow / TensorBoard
    main = jax.process_index() == 0
    # collection=stage: TensorBoard events go to <workdir>/<stage>, console lines name the stage.
    writers = [metric_writers.create_default_writer(
        workdir if main else None, just_logging=not main, asynchronous=False, collection=stage)]
    if main:
      writers.append(JsonlWriter(paths.join(workdir, "metrics.jsonl"), stage))
    self.writer = metric_writers.MultiWriter(writers)

  def scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if scalars:
      self.writer.write_scalars(step, scalars)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


class Progress:
  """Progress reports and profiling through clu's periodic actions; call it after every step.

  clu's ReportProgress logs steps/s, the share done and the time left every `every_steps` steps
  and at the last one. What it measures (steps/s, uptime) is not written as rows of its own:
  `timings()` hands it, with samples/s, to the log row of the same step, so each logged step is
  one line of metrics.jsonl. With `profile_steps` > 0, clu's Profile records a jax.profiler trace
  of that many steps after step `profile_first_step` into `logdir/plugins/profile/`, where
  TensorBoard's profile plugin finds it.
  """

  def __init__(self, *, logdir: str, num_steps: int, start_step: int, every_steps: int,
               batch_size: int, profile_steps: int = 0, profile_first_step: int = 1):
    from clu import periodic_actions
    self._batch = batch_size
    self._values: dict[str, float] = {}
    self._report = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=self, every_steps=every_steps, every_secs=None)
    self._report(start_step)  # the first call only starts the clock
    self._profile = None
    if profile_steps:
      self._profile = periodic_actions.Profile(
          logdir=logdir, num_profile_steps=profile_steps, profile_duration_ms=None,
          first_profile=profile_first_step, every_steps=None, every_secs=None)

  def __call__(self, step: int) -> None:
    self._report(step)
    if self._profile is not None:
      self._profile(step)

  def timed(self, name: str):
    """A context that counts its time as `name` in the progress reports (e.g. 'eval')."""
    return self._report.timed(name)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """What ReportProgress measured (it takes this object as its metric writer)."""
    del step
    self._values.update({k: float(v) for k, v in scalars.items()})

  def timings(self) -> dict[str, float]:
    """steps_per_sec, samples_per_sec and uptime of the last report (empty when none is new)."""
    values, self._values = self._values, {}
    if "steps_per_sec" in values:
      values["samples_per_sec"] = values["steps_per_sec"] * self._batch
    return values

  def close(self) -> None:
    """Ends a profile that the run's end (or a stop) cut short."""
    if self._profile is not None:
      try:
        jax.profiler.stop_trace()
      except RuntimeError:  # none running: it ended on its own
        pass


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Means over steps of per-step device scalars (fetched once)."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  keys = fetched[0].keys()
  return {k: float(np.mean([float(h[k]) for h in fetched])) for k in keys}


def read_jsonl(path: str) -> list[dict]:
  with paths.open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
