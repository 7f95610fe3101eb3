"""Time two-stage search against scoring every candidate, at a real model's shape.

    python -m benchmarks.search_latency --config configs/imagebert_base.py \\
        --vocab_file bert-base-uncased/vocab.txt --images 200 --out /tmp/search_latency

Writes a stage folder with randomly initialised weights of the config's model (timings do not
depend on the weights), a region file of `--images` random images with 100 regions each, indexes
it with `python -m imagebert_jax.retrieval.search index`, then times text queries through the Python API:
the first stage (the query's embedding and a dot product with every image) and the cross-encoder
on the top `--rerank_k`, against the cross-encoder on every image. Compilation is done by a
warm-up query first. Prints one table. TensorFlow-free.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np


def _config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_model(out: str, config_path: str, vocab_file: str) -> str:
  """A stage folder `out/run/model` (config.json, vocab.txt, checkpoints/0/state) of fresh
  weights; returns its path."""
  import jax
  import ml_collections
  import orbax.checkpoint as ocp
  from imagebert_jax import parallel
  from imagebert_jax.config import runconfig
  from imagebert_jax.training import state as state_lib
  from imagebert_jax.data.tokenizer import special_ids
  from imagebert_jax.model import ModelConfig
  config = _config(config_path)
  config.unlock()
  config.stages = ml_collections.ConfigDict({"model": {"kind": "finetune"}})
  config.run = "model"
  vocab_size = special_ids(vocab_file).vocab_size
  cfg = ModelConfig.from_config(config.model)
  cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": cfg.vocab_size or vocab_size,
                       "dtype": "float32"})
  workdir = os.path.join(out, "run")
  runconfig.write_stage_config(config, "model", workdir, vocab_size=cfg.vocab_size,
                               vocab_file=vocab_file)
  mesh = parallel.make_mesh((-1, 1, 1))
  rules = parallel.rules_from_config(config.mesh.rules)
  _, params = state_lib.create_params(cfg, mesh, rules)
  state = os.path.join(workdir, "model", "checkpoints", "0", "state")
  if not os.path.isdir(state):
    ocp.PyTreeCheckpointer().save(state, {"params": jax.device_get(params)})
  return os.path.join(workdir, "model")


def write_regions(path: str, images: int, regions: int, feature_dim: int, seed: int = 0) -> None:
  from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
  rng = np.random.default_rng(seed)
  with RegionFileWriter(path) as writer:
    for i in range(images):
      xy = rng.uniform(0, 500, size=(regions, 2))
      wh = rng.uniform(20, 300, size=(regions, 2))
      boxes = np.concatenate([xy, np.minimum(xy + wh, 640)], 1).astype(np.float32)
      writer.write(RegionRecord(
          image_id=f"image_{i:06d}", image_w=640, image_h=640, boxes=boxes,
          features=np.maximum(rng.normal(size=(regions, feature_dim)), 0).astype(np.float16),
          object_id=rng.integers(0, 1600, regions).astype(np.int32),
          object_conf=rng.uniform(0.2, 1.0, regions).astype(np.float32)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/imagebert_base.py")
  p.add_argument("--vocab_file", required=True)
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--rerank_k", type=int, default=16)
  p.add_argument("--queries", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--out", required=True)
  args = p.parse_args()
  import jax
  from imagebert_jax.retrieval import search
  from imagebert_jax.retrieval.inference import TrainedModel, two_stage_rank
  os.makedirs(args.out, exist_ok=True)
  stage = write_model(args.out, args.config, args.vocab_file)
  model = TrainedModel.load(stage, batch_size=args.batch_size)
  regions = os.path.join(args.out, "regions.ibrf")
  if not os.path.exists(regions):
    write_regions(regions, args.images, model.cfg.max_regions, model.cfg.region_feature_dim)
  index = os.path.join(args.out, "index")
  t0 = time.time()
  built = search.main(["index", "--model", stage, "--index", index, "--regions", regions,
                       "--batch_size", str(args.batch_size), "--no_progress"])
  index_s = time.time() - t0
  data = search.Index(index).load()
  loc = data.locations()
  texts = ["a red bicycle next to a bench", "two dogs playing in the snow",
           "a man riding a wave on a surfboard", "a plate of food on a table"]

  def ask(text: str, rerank_k: int) -> tuple[float, float]:
    ids = model.tokenize([text])
    t0 = time.time()
    first = model.embed_texts(ids) @ data.embeddings.T
    t1 = time.time()
    two_stage_rank(first, lambda q, j: model.score_pairs(
        (data.region_feat[j], loc[j], data.num_regions[j]), ids[q]), k=10, rerank_k=rerank_k)
    return t1 - t0, time.time() - t1

  ask(texts[0], args.rerank_k)  # compiles the text embedding and the cross-encoder's batch
  two = [ask(texts[i % len(texts)], args.rerank_k) for i in range(args.queries)]
  every = ask(texts[-1], 0)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {model.cfg.num_layers} "
        f"layers x {model.cfg.hidden_size}, {model.cfg.max_text_len} + {model.cfg.max_regions} "
        f"positions, float32; {len(data)} images")
  print(f"  indexing: {index_s:.1f}s, {built['images_per_s']:.2f} images/s (with compilation)")
  print(f"  text query, rerank_k={args.rerank_k}: first stage {np.mean([a for a, _ in two]):.3f}s"
        f" + cross-encoder {np.mean([b for _, b in two]):.2f}s "
        f"({min(args.rerank_k, len(data))} pairs), mean of {args.queries}")
  print(f"  text query, every image: first stage {every[0]:.3f}s + cross-encoder "
        f"{every[1]:.2f}s ({len(data)} pairs, {len(data) / every[1]:.2f} pairs/s)")


if __name__ == "__main__":
  main()
