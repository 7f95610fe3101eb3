"""Throughput of the jitted region detector at the real test-time shape, with random weights.

  python -m imagebert_jax.bench.detector [--batch_size 1] [--steps 3] [--warmup 1]

Times `detect` (backbone, RPN with NMS, RoI pooling + res5 for all 300 proposals, heads and the
region selection) on a landscape canvas of min_size x max_size (600 x 1000) after warm-up calls
(the first one compiles), and prints images/s with the shape, device and versions. Any
DetectorConfig field can be overridden with --set name=value (e.g. --set roi_chunk=300).
"""

from __future__ import annotations

import argparse
import ast
import platform
import time

import jax
import numpy as np

from imagebert_jax import paths
from imagebert_jax.detector.config import DetectorConfig
from imagebert_jax.detector.model import compiled_detector, init_params


def benchmark(cfg: DetectorConfig, batch_size: int = 1, steps: int = 3, warmup: int = 1,
              seed: int = 0) -> dict:
  """Returns timings of `steps` calls after `warmup` calls, on one canvas-sized random batch."""
  params = init_params(cfg, seed)
  height, width = cfg.canvases[0]
  rng = np.random.default_rng(seed)
  mean = np.asarray(cfg.pixel_mean_bgr, np.float32)
  images = jax.device_put(rng.uniform(0, 255, (batch_size, height, width, 3)).astype(np.float32)
                          - mean)
  hw = jax.device_put(np.full((batch_size, 2), (height, width), np.int32))
  fn = compiled_detector(cfg)
  start = time.perf_counter()
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(params, images, hw))
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(params, images, hw))
    times.append(time.perf_counter() - t)
  return {"batch_size": batch_size, "canvas": (height, width), "steps": steps,
          "warmup_s": first, "step_s": times, "images_per_s": batch_size * steps / sum(times),
          "boxes_per_image": np.asarray(out["num_boxes"]).tolist()}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--steps", type=int, default=3, help="Timed calls.")
  p.add_argument("--warmup", type=int, default=1, help="Untimed calls first (compilation).")
  p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                 help="Override a DetectorConfig field (Python literal value).")
  p.add_argument("--results", default="", help="Also append the result, as one JSON object "
                 "with --label, to this JSON-lines file (imagebert_jax.bench --summary).")
  p.add_argument("--label", default="detector")
  args = p.parse_args(argv)
  overrides = {}
  for item in args.set:
    name, _, value = item.partition("=")
    try:
      overrides[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[name] = value
  cfg = DetectorConfig.from_dict(overrides)
  result = benchmark(cfg, args.batch_size, args.steps, args.warmup)
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} x{jax.device_count()}; "
        f"host CPU: {platform.processor() or platform.machine()}; jax {jax.__version__}")
  print(f"shape: batch {result['batch_size']} x canvas {result['canvas'][0]}x"
        f"{result['canvas'][1]}, ResNet-{_depth(cfg)} C4, {cfg.post_nms_topk} proposals, "
        f"{cfg.num_classes} classes, roi_chunk {cfg.roi_chunk}")
  print(f"warm-up (incl. compile): {result['warmup_s']:.1f} s; timed calls: "
        + ", ".join(f"{t:.2f} s" for t in result["step_s"]))
  print(f"images/s: {result['images_per_s']:.3f} (boxes per image: {result['boxes_per_image']})")
  if args.results:
    import json
    with paths.open(args.results, "a", encoding="utf-8") as f:
      f.write(json.dumps({"label": args.label, "mode": "detect", "batch": result["batch_size"],
                          "step_ms": 1000 * sum(result["step_s"]) / len(result["step_s"]),
                          "images_per_s": result["images_per_s"]}) + "\n")


def _depth(cfg: DetectorConfig) -> int:
  blocks = sum(cfg.stage_blocks) + cfg.res5_blocks
  return 3 * blocks + 2


if __name__ == "__main__":
  main()
