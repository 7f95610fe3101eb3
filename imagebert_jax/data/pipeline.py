"""tf.data pipelines: dataset records in, fixed-shape numpy batches out (this process's share).

Training: this process's share of the split (`tfds.split_for_jax_process`), records shuffled
(seeded), repeated, flattened to (image, caption) pairs, pairs shuffled again in a smaller buffer,
padded to fixed shapes, batched `global_batch / process_count` per process, prefetched. Everything
is deterministic for a given seed.

Batch fields (numpy, leading dimension = this process's batch):
  text_ids     int32 [b, T]         [CLS] words [SEP], padded with the pad id
  region_feat  float16 [b, R, D]
  region_loc   float32 [b, R, 5]    (x1/W, y1/H, x2/W, y2/H, box area / image area)
  num_regions  int32 [b]
  region_class int32 [b, R]         detector's top class; -1 where unknown or padding
  region_probs float16 [b, R, C]    only if asked for and stored
  image_key    int32 [b]            a hash of the image id (equal for captions of one image)
  image_index  int32 [b]            the record's index in this process's split (evaluation)
  caption_index int32 [b]           the caption's index within its record (evaluation)
  mask         bool [b]             False for padding rows (evaluation)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

from imagebert_jax.data import records
from imagebert_jax.model.inputs import region_locations


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  data_dir: str
  split: str
  batch_size: int              # global batch; each process gets batch_size / process_count
  max_text_len: int
  max_regions: int
  pad_id: int = 0
  sep_id: int = 102
  seed: int = 0
  shuffle_buffer: int = 1000   # records
  pair_shuffle_buffer: int = 256
  with_class_probs: bool = False
  num_parallel_calls: int = -1  # -1: autotune
  threadpool_size: int = 0      # 0: TF's default
  prefetch: int = 2
  ram_budget_gb: float = 0.0    # 0: TF's default autotune RAM budget


def hide_gpus_from_tf() -> None:
  """TensorFlow must not take accelerator memory: it only reads data here."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised: nothing visible to change any more
    pass


def open_dataset(data_dir: str):
  """(tfds builder, dataset summary) for a built dataset folder; clear errors when it is not."""
  import tensorflow_datasets as tfds
  info = records.read_info(data_dir)
  try:
    builder = tfds.builder_from_directory(data_dir)
  except Exception as e:  # noqa: BLE001 - name the folder in the one-line error
    raise ValueError(f"{data_dir}: cannot open the dataset ({e})") from e
  return builder, info


def split_names(data_dir: str) -> list[str]:
  return sorted(records.read_info(data_dir)["splits"])


def _local_batch(batch_size: int) -> int:
  import jax
  n = jax.process_count()
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} processes")
  return batch_size // n


def _options(cfg: PipelineConfig):
  import tensorflow as tf
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op inside tf.data: its parallelism comes from parallel maps and batching,
  # and op-level threads only contend with the accelerator host's other work.
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  if cfg.threadpool_size:
    options.threading.private_threadpool_size = cfg.threadpool_size
  if cfg.ram_budget_gb:
    options.autotune.ram_budget = int(cfg.ram_budget_gb * 2**30)
  return options


def _image_fields(ex, cfg: PipelineConfig, stored_probs: bool):
  """Region inputs of one record, padded to max_regions."""
  import tensorflow as tf
  import tensorflow.experimental.numpy as tnp
  r = cfg.max_regions
  feats = ex["features"][:r]
  n = tf.shape(feats)[0]
  pad = [[0, r - n], [0, 0]]
  boxes = ex["boxes"][:r]
  loc = region_locations(boxes, ex["image_w"], ex["image_h"], xp=tnp)
  out = {
      "region_feat": tf.ensure_shape(tf.pad(feats, pad), [r, None]),
      "region_loc": tf.ensure_shape(tf.pad(loc, pad), [r, 5]),
      "num_regions": tf.cast(n, tf.int32),
      "region_class": tf.ensure_shape(
          tf.pad(ex["object_id"][:r], [[0, r - n]], constant_values=-1), [r]),
      "image_key": tf.cast(tf.strings.to_hash_bucket_fast(ex["image_id"], 2**31 - 1), tf.int32),
  }
  if cfg.with_class_probs:
    if not stored_probs:
      raise ValueError(f"{cfg.data_dir}: the dataset stores no class distributions, which "
                       "config.objective.moc_loss='kl' needs")
    out["region_probs"] = tf.ensure_shape(tf.pad(ex["class_probs"][:r], pad), [r, None])
  return out


def _caption_ids(ex, cfg: PipelineConfig):
  """[K, T] token ids: each caption truncated to T (keeping its final [SEP]) and padded."""
  import tensorflow as tf
  t = cfg.max_text_len
  lengths = ex["caption_lengths"]
  ragged = tf.RaggedTensor.from_row_lengths(ex["caption_tokens"], tf.cast(lengths, tf.int64))
  dense = ragged.to_tensor(default_value=cfg.pad_id)[:, :t]
  dense = tf.pad(dense, [[0, 0], [0, t - tf.shape(dense)[1]]], constant_values=cfg.pad_id)
  last = tf.range(t)[None, :] == t - 1
  ids = tf.where((lengths[:, None] > t) & last, tf.constant(cfg.sep_id, tf.int32), dense)
  return tf.ensure_shape(ids, [None, t])


def _pairs(ds, cfg: PipelineConfig, stored_probs: bool):
  """Record dataset -> dataset of (image fields, caption fields) pairs.

  The per-record work (region padding, box locations, caption truncation) runs in a parallel map;
  the flattening only pairs the record's image fields with each caption, without copying them.
  """
  import tensorflow as tf

  def prepare(index, ex):
    image = _image_fields(ex, cfg, stored_probs)
    image["image_index"] = tf.cast(index, tf.int32)
    return image, _caption_ids(ex, cfg)

  def expand(image, text):
    k = tf.shape(text)[0]
    captions = tf.data.Dataset.from_tensor_slices(
        {"text_ids": text, "caption_index": tf.range(k, dtype=tf.int32)})
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(image).repeat(), captions))

  ds = ds.enumerate().map(prepare, num_parallel_calls=cfg.num_parallel_calls)
  return ds.flat_map(expand)


def _merge(image, caption):
  return {**image, **caption}


def data_dirs(data_dir: str) -> list[str]:
  """A comma-separated list of dataset folders (e.g. Conceptual Captions and SBU together)."""
  dirs = [d.strip() for d in str(data_dir).split(",") if d.strip()]
  if not dirs:
    raise ValueError("config.stages.<stage>.data.dir is empty")
  return dirs


def _split_names(split: str) -> list[str]:
  """The split names of a TFDS split expression ('train+restval', 'train[:10%]')."""
  return [re.match(r"^[\w-]*", part.strip()).group(0) for part in split.split("+")]


def has_split(info: dict, split: str) -> bool:
  return all(name in info["splits"] for name in _split_names(split))


def local_records(data_dir: str, split: str) -> int:
  """Records of `split` in this process's share (0 when the split has fewer records than there
  are processes and this one gets none)."""
  import tensorflow_datasets as tfds
  builder, info = open_dataset(data_dir)
  if not has_split(info, split):
    return 0
  return int(builder.info.splits[tfds.split_for_jax_process(split)].num_examples)


def _read_one(data_dir: str, cfg: PipelineConfig, *, shuffle_files: bool,
              whole_split: bool = False):
  """This process's share of the split (all of it with `whole_split`)."""
  import tensorflow_datasets as tfds
  builder, info = open_dataset(data_dir)
  if not has_split(info, cfg.split):
    raise ValueError(f"{data_dir}: no split {cfg.split!r}; it has {sorted(info['splits'])}")
  read_config = tfds.ReadConfig(shuffle_seed=cfg.seed, interleave_cycle_length=4,
                                try_autocache=False, options=_options(cfg), add_tfds_id=False)
  split = cfg.split if whole_split else tfds.split_for_jax_process(cfg.split)
  ds = builder.as_dataset(split=split,
                          shuffle_files=shuffle_files, read_config=read_config,
                          decoders={"captions": tfds.decode.SkipDecoding()})
  return ds.with_options(_options(cfg)), info, "class_probs" in builder.info.features


def _pair_stream(data_dir: str, cfg: PipelineConfig):
  """One dataset's endless, shuffled stream of (image, caption) pairs, and its pair count."""
  ds, info, stored_probs = _read_one(data_dir, cfg, shuffle_files=True)
  ds = ds.repeat()
  if cfg.shuffle_buffer > 1:
    ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed)
  pairs = sum(info["splits"][name]["pairs"] for name in _split_names(cfg.split))
  return _pairs(ds, cfg, stored_probs), max(pairs, 1)


def train_dataset(cfg: PipelineConfig):
  """An infinite tf.data.Dataset of this process's training batches.

  With several dataset folders, pairs are drawn from each in proportion to its size.
  """
  import tensorflow as tf
  import jax
  dirs = data_dirs(cfg.data_dir)
  mine = [d for d in dirs if local_records(d, cfg.split)]
  if not mine:
    raise ValueError(f"{cfg.data_dir}: split {cfg.split!r} has no records for process "
                     f"{jax.process_index()} of {jax.process_count()}; a training split needs at "
                     f"least one record per process")
  streams = [_pair_stream(d, cfg) for d in mine]
  if len(streams) == 1:
    ds = streams[0][0]
  else:
    total = sum(n for _, n in streams)
    ds = tf.data.Dataset.sample_from_datasets([s for s, _ in streams],
                                              weights=[n / total for _, n in streams],
                                              seed=cfg.seed + 2)
  if cfg.pair_shuffle_buffer > 1:
    ds = ds.shuffle(cfg.pair_shuffle_buffer, seed=cfg.seed + 1)
  ds = ds.batch(_local_batch(cfg.batch_size), drop_remainder=True,
                num_parallel_calls=cfg.num_parallel_calls)
  drop = ("image_index", "caption_index")
  ds = ds.map(lambda image, caption: {k: v for k, v in _merge(image, caption).items()
                                      if k not in drop})
  return ds.prefetch(cfg.prefetch)


class TrainIterator:
  """NumPy batches from a tf.data pipeline whose position can be saved and restored exactly.

  The saved state is tf.data's own iterator checkpoint (shuffle and prefetch buffers included),
  so a resumed run sees exactly the batches an uninterrupted one would have.
  """

  def __init__(self, ds):
    import tensorflow as tf
    self._it = iter(ds)
    self._ckpt = tf.train.Checkpoint(iterator=self._it)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._it).items()}

  def save(self, prefix: str) -> None:
    self._ckpt.write(prefix)

  def restore(self, prefix: str) -> None:
    self._ckpt.read(prefix).assert_consumed()


def count_local_pairs(cfg: PipelineConfig) -> int:
  """Caption pairs in this process's share of the split (reads only the caption lengths)."""
  return sum(_count_local_pairs(d, cfg.split) for d in data_dirs(cfg.data_dir)
             if local_records(d, cfg.split))


def _count_local_pairs(data_dir: str, split: str) -> int:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  builder, _ = open_dataset(data_dir)
  decoders = {k: tfds.decode.SkipDecoding() for k in builder.info.features
              if k not in ("caption_lengths",)}
  ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False,
                          decoders=decoders)
  ds = ds.map(lambda ex: tf.size(ex["caption_lengths"], out_type=tf.int64))
  return int(sum(tfds.as_numpy(ds)))


def eval_dataset(cfg: PipelineConfig, *, max_batches: int | None = None,
                 whole_only: bool = False):
  """This process's pairs once, in order, in full batches padded with mask=False rows.

  Every process yields the same number of batches (the most any process needs), so sharded
  evaluation never waits on a host that ran out. With `whole_only`, only the leading batches
  that hold no padding on any process (for means over batches, which padding would bias).
  """
  from imagebert_jax import parallel
  dirs = [d for d in data_dirs(cfg.data_dir) if has_split(records.read_info(d), cfg.split)]
  if not dirs:
    raise ValueError(f"{cfg.data_dir}: no dataset there has the split {cfg.split!r}")
  mine = [d for d in dirs if local_records(d, cfg.split)]
  local_pairs = sum(_count_local_pairs(d, cfg.split) for d in mine)
  parts = [_read_one(d, cfg, shuffle_files=False) for d in mine]
  if not parts:
    # This process's share is empty (a split with fewer records than processes): it reads the
    # whole split only for a padding row, so that it still runs every batch the others run.
    parts = [_read_one(dirs[0], cfg, shuffle_files=False, whole_split=True)]
  ds, _, stored_probs = parts[0]
  for more, _, _ in parts[1:]:
    ds = ds.concatenate(more)
  local = _local_batch(cfg.batch_size)
  # The most batches any process needs, and the fewest whole ones any process has.
  needed, fewest_whole = parallel.process_max([-(-local_pairs // local), -(local_pairs // local)])
  needed, whole = int(needed), -int(fewest_whole)
  if whole_only:
    needed = whole
  num_batches = needed if max_batches is None else min(needed, max_batches)
  real = min(local_pairs, num_batches * local)
  ds = _pairs(ds, cfg, stored_probs).map(lambda image, caption: {**image, **caption,
                                                                  "mask": True})
  padding = ds.take(1).map(lambda x: {**x, "mask": False}).repeat(num_batches * local - real)
  return ds.take(real).concatenate(padding).batch(local, drop_remainder=True).prefetch(
      cfg.prefetch)


def as_numpy(ds) -> Iterator[dict[str, np.ndarray]]:
  import tensorflow_datasets as tfds
  return iter(tfds.as_numpy(ds))


def split_records(data_dir: str, split: str):
  """Yields the records of a built dataset's split as RegionRecords (regions as selected when
  the dataset was built, best first), in the dataset's order. Reads through TFDS."""
  import tensorflow_datasets as tfds
  hide_gpus_from_tf()
  builder, info = open_dataset(data_dir)
  if split not in info["splits"]:
    raise ValueError(f"{data_dir}: no split {split!r}; it has {sorted(info['splits'])}")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"captions": tfds.decode.SkipDecoding()})
  for ex in tfds.as_numpy(ds):
    image_id = ex["image_id"]
    yield records.RegionRecord(
        image_id=image_id.decode() if isinstance(image_id, bytes) else str(image_id),
        image_w=int(ex["image_w"]), image_h=int(ex["image_h"]), boxes=ex["boxes"],
        features=ex["features"], object_id=ex["object_id"], object_conf=ex["object_conf"])
