"""Throughput of the jitted region detector at the real test-time shape, with random weights.

  python -m imagebert_jax.bench.detector [--batch_size 1] [--steps 3] [--warmup 1]

Times `detect` (backbone, RPN with NMS, RoI pooling + res5 for all 300 proposals, heads and the
region selection) on a landscape canvas of min_size x max_size (600 x 1000) after warm-up calls
(the first one compiles), and prints images/s with the shape, device and versions. Any
DetectorConfig field can be overridden with --set name=value (e.g. --set roi_chunk=300).
"""

from __future__ import annotations

import ast
import platform
import time

import jax
import numpy as np

from imagebert_jax import cli, paths
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


PROG = "python -m imagebert_jax.bench.detector"


def main(argv: list[str] | None = None) -> None:
  """The benchmark's command line (imagebert_jax.cli's convention)."""
  import sys

  from absl import flags
  fv = cli.new_flags(verbosity=False)
  flags.DEFINE_integer("batch_size", 1, "Images per call.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steps", 3, "Timed calls.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("warmup", 1, "Untimed calls first (compilation).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_multi_string("set", [], "NAME=VALUE: override a DetectorConfig field (Python "
                            "literal value); repeat for several.", flag_values=fv)
  flags.DEFINE_string("results", "", "Also append the result, as one JSON object with --label, "
                      "to this JSON-lines file (imagebert_jax.bench --summary).", flag_values=fv)
  flags.DEFINE_string("label", "detector", "The result's label.", flag_values=fv)
  cli.parse_flags(fv, [PROG, *(sys.argv[1:] if argv is None else argv)], prog=PROG,
                  about=__doc__.split("\n\n")[0])
  args = fv
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
