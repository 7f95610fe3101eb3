"""Extracts bottom-up-attention region features from your own images into region files.

  imagebert-extract --images photos/ --weights faster_rcnn_from_caffe_attr.pkl \\
      --output features/ [--shard_index 0 --num_shards 8] [--batch_size 4]

(also `python -m imagebert_jax.detector.extract_features` or `python tools/extract_features.py`). Images,
weights and the output may be local paths or bucket URLs (gs://...).

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
import json
import logging
import time

from imagebert_jax import paths
from imagebert_jax.data.regionfile import RegionFileWriter
from imagebert_jax.detector import DetectorConfig, WeightsError, load_detectron2_weights
from imagebert_jax.detector.extract import assign_ids, extract_regions, list_images

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


def load_config(path: str | None) -> DetectorConfig:
  if path is None:
    return DetectorConfig()
  try:
    return DetectorConfig.from_dict(json.loads(paths.read_text(path)))
  except (OSError, ValueError, TypeError) as e:
    raise SystemExit(f"--config {path}: {e}") from None


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
  images, root = list_images(args.images)
  items = assign_ids(images, root, args.id_from)
  mine = [item for i, item in enumerate(items) if i % args.num_shards == args.shard_index]
  params = load_detectron2_weights(args.weights, cfg)

  paths.makedirs(args.output)
  stem = f"regions-{args.shard_index:05d}-of-{args.num_shards:05d}"
  out_path = paths.join(args.output, stem + ".ibrf")
  report_path = paths.join(args.output, stem + ".skipped.json")

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
  try:
    for path, key, record, error in extract_regions(
        todo, params, cfg, batch_size=args.batch_size, workers=args.workers, boxes=args.boxes,
        class_probs=args.class_probs):
      progress.update(1)
      if record is None:
        skipped.append({"path": path, "id": key, "error": error})
        log.warning("skipping %s: %s", path, error)
        continue
      writer.write(record)
      written += 1
      since_flush += 1
      if since_flush >= args.flush_every:
        writer.flush()
        since_flush = 0
  finally:
    writer.flush()
    writer.close()
    progress.close()

  rate = progress.rate()
  paths.write_json(report_path, {"output": out_path, "count": len(skipped), "images": skipped})
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
