"""Input-pipeline throughput: `python -m imagebert_jax.bench.data`.

Builds (once) a dataset of the paper's shape on local disk (100 regions x 2048 float16 per image,
5 captions of 40 tokens each) through the regular builder, then reads training batches through the
regular tf.data pipeline as fast as it can and reports (image, caption) pairs per second. Point
`--data_dir` at a built dataset to measure that instead.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from imagebert_jax import cli, paths
from imagebert_jax.data import build as build_lib
from imagebert_jax.data import pipeline, records
from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
from imagebert_jax.data.tokenizer import special_ids, write_vocab

_DATA = flags.DEFINE_string("data_dir", "", "A built dataset (default: make one under --work).")
_WORK = flags.DEFINE_string("work", "/tmp/imagebert_pipeline_bench", "Where to build one.")
_IMAGES = flags.DEFINE_integer("images", 2000, "Images in the made dataset.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 100, "Timed batches.")
_TEXT = flags.DEFINE_integer("max_text_len", 44, "Token budget.")
_REGIONS = flags.DEFINE_integer("max_regions", 100, "Regions per image.")
_THREADS = flags.DEFINE_integer("threadpool_size", 0, "tf.data private threads (0: default).")


def make_dataset(out_dir: str, images: int, regions: int = 100, dim: int = 2048,
                 captions: int = 5, words: int = 38, seed: int = 0) -> str:
  """A base-shape dataset with random features and 40-token captions; returns its folder."""
  if paths.isfile(paths.join(out_dir, records.INFO_FILE)):
    return out_dir
  paths.makedirs(paths.join(out_dir, "source"))
  vocab = paths.join(out_dir, "vocab.txt")
  write_vocab(vocab, [f"w{i}" for i in range(1000)])
  rng = np.random.default_rng(seed)
  reg_path = paths.join(out_dir, "source", "regions.ibrf")
  cap_path = paths.join(out_dir, "source", "captions.jsonl")
  with RegionFileWriter(reg_path) as w, paths.open(cap_path, "w") as c:
    for i in range(images):
      xy = rng.uniform(0, 400, (regions, 2))
      w.write(RegionRecord(
          image_id=str(i), image_w=640, image_h=480,
          boxes=np.concatenate([xy, xy + 50], 1).astype(np.float32),
          features=rng.uniform(0, 4, (regions, dim)).astype(np.float16),
          object_id=rng.integers(0, 1600, regions).astype(np.int32),
          object_conf=rng.uniform(0.2, 1, regions).astype(np.float32)))
      for _ in range(captions):
        text = " ".join(f"w{j}" for j in rng.integers(0, 1000, words))
        c.write(json.dumps({"image_id": str(i), "caption": text}) + "\n")
  build_lib.build_dataset(build_lib.BuildSpec(
      name="bench", out_dir=out_dir, regions=[reg_path], captions=[cap_path], vocab_file=vocab,
      max_text_len=words + 2, feature_dim=dim, min_boxes=regions, max_boxes=regions))
  return out_dir


def measure(cfg: pipeline.PipelineConfig, batches: int, warmup: int = 5) -> dict:
  it = pipeline.as_numpy(pipeline.train_dataset(cfg))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  nbytes = 0
  for _ in range(batches):
    b = next(it)
    nbytes += sum(v.nbytes for v in b.values())
  seconds = time.perf_counter() - start
  return {"samples_per_s": batches * cfg.batch_size / seconds,
          "mb_per_s": nbytes / seconds / 2**20, "batch_ms": 1000 * seconds / batches}


def main(argv):
  del argv
  data_dir = _DATA.value or make_dataset(paths.join(_WORK.value, "data"), _IMAGES.value)
  info = records.read_info(data_dir)
  vocab = records.vocab_path(data_dir, info)
  ids = special_ids(vocab)
  cfg = pipeline.PipelineConfig(
      data_dir=data_dir, split=_SPLIT.value, batch_size=_BATCH.value,
      max_text_len=_TEXT.value, max_regions=_REGIONS.value, pad_id=ids.pad_id, sep_id=ids.sep_id,
      threadpool_size=_THREADS.value)
  pipeline.hide_gpus_from_tf()
  r = measure(cfg, _BATCHES.value)
  logging.info("measured %s", r)
  print(f"pipeline: {cfg.max_regions} regions x {info['options']['feature_dim']} float16, "
        f"{cfg.max_text_len} tokens, batch {cfg.batch_size}, {os.cpu_count()} CPUs")
  print(f"  samples/s {r['samples_per_s']:,.0f}   MB/s {r['mb_per_s']:,.0f}   "
        f"ms/batch {r['batch_ms']:.1f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_parser("python -m imagebert_jax.bench.data"))
