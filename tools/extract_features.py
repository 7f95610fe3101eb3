#!/usr/bin/env python
"""Extracts bottom-up-attention region features from your own images into region files.

  python tools/extract_features.py --images photos/ --weights faster_rcnn_from_caffe_attr.pkl \\
      --output features/ [--shard_index 0 --num_shards 8] [--batch_size 4]

Input: a folder (searched recursively for .jpg / .jpeg / .png) or a text file with one image path
per line (relative paths are relative to the list file; blank lines and lines starting with "#" are
skipped). The list is sorted; with --num_shards n, image i goes to shard i % n, written to
`regions-{i:05d}-of-{n:05d}.ibrf` in --output (imagebert_jax/data/regionfile.py), ready for the
dataset builders.

Image ids are file stems by default, or with --id_from relpath the path relative to the folder
(or list file) without the extension; two images with the same id are an error.

A rerun resumes: the output is reopened for appending (a damaged tail from a killed run is cut
off) and images already written are skipped. Unreadable or corrupt images are skipped, counted and
named in `regions-...skipped.json` next to the output; nothing else stops the run.

Each image is resized (shorter side 600, longer at most 1000) and padded to a landscape or portrait
canvas, so the jitted detector compiles once per canvas and batch size. Regions are the
bottom-up-attention "10-100 adaptive" selection; boxes are the selected proposals (as the Caffe
extractor writes them) unless --boxes regressed. --config takes a JSON file of DetectorConfig
fields that differ from the public model (for other checkpoints or tests).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import logging
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord  # noqa: E402
from imagebert_jax.detector import (DetectorConfig, WeightsError,  # noqa: E402
                                    compiled_detector, load_detectron2_weights, load_image,
                                    prepare_image, to_original)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
log = logging.getLogger("extract_features")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", required=True, help="A folder of images or a text file of paths.")
  p.add_argument("--weights", required=True, help="detectron2-format .pkl of the detector.")
  p.add_argument("--output", required=True, help="Output folder for the region files.")
  p.add_argument("--shard_index", type=int, default=0)
  p.add_argument("--num_shards", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=1, help="Images per detector call.")
  p.add_argument("--id_from", choices=("stem", "relpath"), default="stem")
  p.add_argument("--boxes", choices=("proposals", "regressed"), default="proposals",
                 help="Write the selected proposals (bottom-up-attention) or their top class's "
                      "regressed boxes.")
  p.add_argument("--class_probs", action="store_true",
                 help="Also write the full class distribution of every region (large).")
  p.add_argument("--config", default=None, help="JSON file of DetectorConfig overrides.")
  p.add_argument("--max_images", type=int, default=0,
                 help="Process at most this many new images in this run (0: all).")
  p.add_argument("--workers", type=int, default=4, help="Image decoding threads.")
  p.add_argument("--flush_every", type=int, default=50, help="Sync the output every N records.")
  p.add_argument("--no_progress", action="store_true", help="Log instead of a progress bar.")
  args = p.parse_args(argv)
  if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
    p.error(f"need 0 <= --shard_index < --num_shards, got {args.shard_index}, {args.num_shards}")
  if args.batch_size < 1:
    p.error("--batch_size must be >= 1")
  return args


def list_images(spec: str) -> tuple[list[str], str]:
  """Sorted image paths of a folder (recursive) or a list file, and the root for relative ids."""
  if os.path.isdir(spec):
    root = os.path.abspath(spec)
    found = []
    for folder, dirs, files in os.walk(root):
      dirs.sort()
      for name in files:
        if name.lower().endswith(IMAGE_EXTENSIONS):
          found.append(os.path.join(folder, name))
    return sorted(found, key=lambda path: os.path.relpath(path, root)), root
  if not os.path.isfile(spec):
    raise SystemExit(f"--images {spec}: no such folder or list file")
  root = os.path.dirname(os.path.abspath(spec))
  paths = []
  with open(spec, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line and not line.startswith("#"):
        paths.append(line if os.path.isabs(line) else os.path.join(root, line))
  return sorted(set(paths)), root


def image_id(path: str, root: str, mode: str) -> str:
  if mode == "stem":
    return os.path.splitext(os.path.basename(path))[0]
  rel = os.path.splitext(os.path.relpath(path, root))[0]
  return rel.replace(os.sep, "/")


def assign_ids(paths: list[str], root: str, mode: str) -> list[tuple[str, str]]:
  """(path, id) pairs; raises SystemExit naming the first two images that share an id."""
  seen: dict[str, str] = {}
  out = []
  for path in paths:
    key = image_id(path, root, mode)
    if key in seen:
      hint = " (try --id_from relpath)" if mode == "stem" else ""
      raise SystemExit(f"images {seen[key]} and {path} both have id {key!r}{hint}")
    seen[key] = path
    out.append((path, key))
  return out


def load_config(path: str | None) -> DetectorConfig:
  if path is None:
    return DetectorConfig()
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
    return DetectorConfig.from_dict(values)
  except (OSError, ValueError, TypeError) as e:
    raise SystemExit(f"--config {path}: {e}") from None


def _prepare(path: str, cfg: DetectorConfig):
  try:
    return prepare_image(load_image(path), cfg), None
  except Exception as e:  # noqa: BLE001 - any decoding failure skips the image
    return None, f"{type(e).__name__}: {e}"


class _Progress:
  """tqdm when wanted and available, else a log line every 30 seconds."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.done, self.start, self.last = total, 0, time.time(), 0.0
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="img", smoothing=0.1)
      except ImportError:
        pass

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    elif time.time() - self.last > 30 or self.done == self.total:
      self.last = time.time()
      log.info("%d/%d images, %.2f images/s", self.done, self.total, self.rate())

  def rate(self) -> float:
    return self.done / max(time.time() - self.start, 1e-9)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def run(argv: list[str] | None = None) -> dict:
  """Runs the extraction; returns a summary dict (written, skipped, already_done, ...)."""
  args = parse_args(argv)
  cfg = load_config(args.config)
  paths, root = list_images(args.images)
  items = assign_ids(paths, root, args.id_from)
  mine = [item for i, item in enumerate(items) if i % args.num_shards == args.shard_index]
  params = load_detectron2_weights(args.weights, cfg)
  detector = compiled_detector(cfg)

  os.makedirs(args.output, exist_ok=True)
  stem = f"regions-{args.shard_index:05d}-of-{args.num_shards:05d}"
  out_path = os.path.join(args.output, stem + ".ibrf")
  report_path = os.path.join(args.output, stem + ".skipped.json")

  writer = RegionFileWriter(out_path, append=True)
  done_before = writer.existing_ids
  todo = [item for item in mine if item[1] not in done_before]
  already = len(mine) - len(todo)
  if args.max_images > 0:
    todo = todo[:args.max_images]
  log.info("%d images found, %d in shard %d/%d, %d already in %s, %d to do", len(items), len(mine),
           args.shard_index, args.num_shards, already, out_path, len(todo))

  skipped: list[dict] = []
  written = 0
  since_flush = 0
  progress = _Progress(len(todo), enabled=not args.no_progress)
  buckets: dict[tuple[int, int], list] = collections.defaultdict(list)
  inflight: collections.deque = collections.deque()

  # Only the outputs a record keeps come back from the device.
  box_key = "boxes" if args.boxes == "proposals" else "regressed_boxes"
  wanted = ["num_boxes", box_key, "features", "object_id", "object_conf"]
  wanted += ["attr_id", "attr_conf"] if cfg.num_attributes else []
  wanted += ["class_probs"] if args.class_probs else []

  def finish(batch, out) -> None:
    nonlocal written, since_flush
    out = jax.device_get({k: out[k] for k in wanted})
    for b, (path, key, prep) in enumerate(batch):
      n = int(out["num_boxes"][b])
      if n == 0:  # e.g. a sliver a few pixels high: no valid proposal at all
        skipped.append({"path": path, "id": key, "error": "no regions found (image too small?)"})
        continue
      record = RegionRecord(
          image_id=key, image_w=int(prep.original_hw[1]), image_h=int(prep.original_hw[0]),
          boxes=to_original(out[box_key][b, :n], prep),
          features=out["features"][b, :n].astype(np.float16),
          object_id=out["object_id"][b, :n].astype(np.int32),
          object_conf=out["object_conf"][b, :n].astype(np.float32))
      if cfg.num_attributes:
        record.attr_id = out["attr_id"][b, :n].astype(np.int32)
        record.attr_conf = out["attr_conf"][b, :n].astype(np.float32)
      if args.class_probs:
        record.class_probs = out["class_probs"][b, :n].astype(np.float16)
      try:
        record.validate(feature_dim=cfg.feature_dim)
      except ValueError as e:
        skipped.append({"path": path, "id": key, "error": f"bad detector output: {e}"})
        continue
      writer.write(record)
      written += 1
      since_flush += 1
    if since_flush >= args.flush_every:
      writer.flush()
      since_flush = 0
    progress.update(len(batch))

  def launch(batch) -> None:
    canvases = [prep.canvas for _, _, prep in batch]
    sizes = [prep.resized_hw for _, _, prep in batch]
    while len(canvases) < args.batch_size:  # pad the last batch; its extra results are dropped
      canvases.append(canvases[0])
      sizes.append(sizes[0])
    out = detector(params, np.stack(canvases), np.asarray(sizes, np.int32))
    inflight.append((batch, out))
    while len(inflight) > 1:  # keep one batch running on the device while the host writes
      finish(*inflight.popleft())

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as pool:
      window = max(2 * args.workers, 2 * args.batch_size)
      pending: collections.deque = collections.deque()
      queue = iter(todo)
      while True:
        while len(pending) < window:
          item = next(queue, None)
          if item is None:
            break
          pending.append((item, pool.submit(_prepare, item[0], cfg)))
        if not pending:
          break
        (path, key), future = pending.popleft()
        prep, error = future.result()
        if prep is None:
          skipped.append({"path": path, "id": key, "error": error})
          log.warning("skipping %s: %s", path, error)
          progress.update(1)
          continue
        bucket = buckets[prep.canvas.shape[:2]]
        bucket.append((path, key, prep))
        if len(bucket) == args.batch_size:
          launch(bucket[:])
          bucket.clear()
      for bucket in buckets.values():
        if bucket:
          launch(bucket[:])
          bucket.clear()
      while inflight:
        finish(*inflight.popleft())
  finally:
    writer.flush()
    writer.close()
    progress.close()

  rate = progress.rate()
  with open(report_path, "w", encoding="utf-8") as f:
    json.dump({"output": out_path, "count": len(skipped), "images": skipped}, f, indent=1)
  if skipped:
    log.warning("skipped %d unreadable images (listed in %s): %s", len(skipped), report_path,
                ", ".join(s["path"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
  log.info("wrote %d records to %s (%d were already there), skipped %d, %.2f images/s", written,
           out_path, already, len(skipped), rate)
  return {"output": out_path, "report": report_path, "written": written, "already_done": already,
          "skipped": skipped, "images_per_s": rate}


def main() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    run()
  except WeightsError as e:
    raise SystemExit(str(e)) from None


if __name__ == "__main__":
  main()
