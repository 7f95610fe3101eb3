"""Metric writers: TensorBoard (clu) and `workdir/metrics.jsonl`, plus progress reports.

Every scalar goes to both. metrics.jsonl holds one JSON object per line with the stage, the step
and every scalar, so scripts and tests read runs without TensorBoard. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class JsonlWriter:
  """Appends {"stage", "step", scalars...} lines to a file (clu MetricWriter interface)."""

  def __init__(self, path: str, stage: str):
    self.path = path
    self.stage = stage
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._f = open(path, "a", encoding="utf-8")

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
  """TensorBoard events in `logdir` and JSON lines in `jsonl_path`; a no-op off process 0."""

  def __init__(self, logdir: str, jsonl_path: str, stage: str):
    self.active = jax.process_index() == 0
    self.writers = []
    if self.active:
      from clu import metric_writers  # local: imports TensorFlow / TensorBoard
      self.writers.append(metric_writers.SummaryWriter(logdir))
      self.writers.append(JsonlWriter(jsonl_path, stage))

  def scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


class Progress:
  """Steps/s, samples/s and time left, logged every report."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int, label: str = ""):
    self.total = total_steps
    self.batch = batch_size
    self.label = label
    self._t = time.time()
    self._step = start_step

  def report(self, step: int) -> dict[str, float]:
    now = time.time()
    dt = max(now - self._t, 1e-9)
    rate = (step - self._step) / dt
    self._t, self._step = now, step
    left = (self.total - step) / rate if rate > 0 else float("inf")
    logging.info("%sstep %d/%d: %.2f steps/s, %.1f samples/s, %s left", self.label, step,
                 self.total, rate, rate * self.batch, format_seconds(left))
    return {"steps_per_sec": rate, "samples_per_sec": rate * self.batch}


def format_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s" if s >= 3600 else \
      f"{s // 60}m{s % 60:02d}s"


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Means over steps of per-step device scalars (fetched once)."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  keys = fetched[0].keys()
  return {k: float(np.mean([float(h[k]) for h in fetched])) for k in keys}


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
