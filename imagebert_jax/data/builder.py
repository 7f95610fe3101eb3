"""Writing datasets in TFDS's format: streamed, sharded, deterministic, with a report.

A build writes, for each split, TFRecord shards named `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`
and beside each shard a small JSON report (records, caption pairs, bytes); the shards may be
written by many workers at once (`build_pipeline`). `finalize` then checks that every shard of
every split is there, writes the TFDS metadata (so `tfds.builder_from_directory` reads the folder)
and the dataset summary `imagebert_dataset.json`. Memory stays bounded: records are serialized
and written one at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import time
from typing import Any

from imagebert_jax import paths
from imagebert_jax.data import records

_REPORT = re.compile(r"^(?P<name>.+)-(?P<split>[^-]+)\.report-(?P<i>\d{5})-of-(?P<n>\d{5})\.json$")


def shard_path(out_dir: str, name: str, split: str, index: int, num_shards: int) -> str:
  return paths.join(out_dir, f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}")


def report_path(out_dir: str, name: str, split: str, index: int, num_shards: int) -> str:
  return paths.join(out_dir, f"{name}-{split}.report-{index:05d}-of-{num_shards:05d}.json")


@dataclasses.dataclass
class ShardReport:
  """What one shard holds."""

  records: int = 0
  pairs: int = 0
  num_bytes: int = 0
  seconds: float = 0.0

  def to_json(self) -> dict:
    return {"records": self.records, "pairs": self.pairs, "num_bytes": self.num_bytes,
            "seconds": round(self.seconds, 2)}

  def summary(self) -> str:
    return f"{self.records} records ({self.pairs} caption pairs)"


class ShardWriter:
  """Writes one shard of one split; use as a context manager. Streams: nothing is held."""

  def __init__(self, out_dir: str, name: str, split: str, opts: records.RecordOptions, *,
               shard_index: int = 0, num_shards: int = 1):
    import tensorflow as tf  # local: the TF side of the data code

    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
    paths.makedirs(out_dir)
    self.out_dir, self.name, self.split = out_dir, name, split
    self.index, self.num_shards = shard_index, num_shards
    self.opts = opts
    self.features = records.features_dict(opts)
    self.report = ShardReport()
    self._path = shard_path(out_dir, name, split, shard_index, num_shards)
    self._tmp = self._path + ".incomplete"
    self._writer = tf.io.TFRecordWriter(self._tmp)
    self._start = time.time()

  def write(self, example: dict) -> None:
    data = self.features.serialize_example(example)
    self._writer.write(data)
    self.report.records += 1
    self.report.pairs += len(example["caption_lengths"])
    self.report.num_bytes += len(data)

  def close(self) -> ShardReport:
    self._writer.close()
    # The shard appears whole or not at all (on a bucket the rename is a copy, and the shard's
    # report, written after it, is what finalize looks for).
    paths.replace(self._tmp, self._path)
    self.report.seconds = time.time() - self._start
    paths.write_json(report_path(self.out_dir, self.name, self.split, self.index,
                                 self.num_shards),
                     {"split": self.split, "shard_index": self.index,
                      "num_shards": self.num_shards, **self.report.to_json()})
    logging.debug("%s %s shard %d/%d done in %.1fs: %s", self.name, self.split, self.index,
                  self.num_shards, self.report.seconds, self.report.summary())
    return self.report

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
    else:
      self._writer.close()


def finalize(out_dir: str, name: str, opts: records.RecordOptions, *,
             extra_info: dict[str, Any] | None = None) -> dict:
  """Checks every shard is present and writes the TFDS metadata and the dataset summary."""
  import tensorflow_datasets as tfds

  others = sorted(paths.basename(p) for p in paths.glob(paths.join(out_dir, "*.tfrecord-*"))
                  if not paths.basename(p).startswith(f"{name}-"))[:3]
  if others:
    raise ValueError(f"{out_dir}: holds the records of other datasets too ({others}); give each "
                     "dataset a folder of its own")
  reports: dict[str, dict[int, dict]] = collections.defaultdict(dict)
  expected: dict[str, int] = {}
  for path in paths.glob(paths.join(out_dir, f"{name}-*.report-*-of-*.json")):
    m = _REPORT.match(paths.basename(path))
    if not m or m["name"] != name:
      continue
    split, i, n = m["split"], int(m["i"]), int(m["n"])
    if expected.setdefault(split, n) != n:
      raise ValueError(f"{path}: split {split} has shards of both {expected[split]} and {n}")
    reports[split][i] = paths.read_json(path)
  if not reports:
    raise ValueError(f"{out_dir}: no shard reports for dataset {name!r}; nothing was built")
  split_infos, summary = [], {}
  for split, by_index in sorted(reports.items()):
    missing = sorted(set(range(expected[split])) - set(by_index))
    if missing:
      raise ValueError(f"{out_dir}: split {split} lacks shards {missing} of {expected[split]}; "
                       "build them before finalising")
    shard_lengths = [by_index[i]["records"] for i in range(expected[split])]
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=shard_lengths,
        num_bytes=sum(by_index[i]["num_bytes"] for i in by_index),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=out_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name, split=split, filetype_suffix="tfrecord")))
    summary[split] = {"records": sum(shard_lengths),
                      "pairs": sum(r["pairs"] for r in by_index.values())}
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=records.features_dict(opts), split_infos=split_infos,
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", check_data=False,
      description="ImageBERT region-feature dataset: one record per image with its captions.")
  info = {"name": name, "options": opts.to_json(), "splits": summary, **(extra_info or {})}
  paths.write_json(paths.join(out_dir, records.INFO_FILE), info)
  for split, s in summary.items():
    logging.info("dataset %s split %s: %d records, %d pairs", name, split, s["records"],
                 s["pairs"])
  return info
