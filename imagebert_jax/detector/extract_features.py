"""Extracts bottom-up-attention region features from your own images into region files.

  imagebert-extract --images photos/ --weights faster_rcnn_from_caffe_attr.pkl \\
      --output features/ [--batch_size 4]

(also `python -m imagebert_jax.detector.extract_features` or `python tools/extract_features.py`). Images,
weights and the output may be local paths or bucket URLs (gs://...).

Input: a folder (searched recursively for .jpg / .jpeg / .png) or a text file with one image path
per line (relative paths are relative to the list file; blank lines and lines starting with "#" are
skipped). The list is sorted. Run as a JAX multi-process job (one process per host or per
accelerator: JAX's cluster detection on Cloud TPU VMs, SLURM, Open MPI or Kubernetes, or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or the flags of the same names, as
for training; imagebert_jax/distributed.py), process p of n takes images i with i % n == p and
writes `regions-{p:05d}-of-{n:05d}.ibrf` in --output (imagebert_jax/data/regionfile.py), ready
for the dataset builder; one process writes `regions-00000-of-00001.ibrf`.

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

from imagebert_jax import cli, paths
from imagebert_jax.data.regionfile import RegionFileWriter
from imagebert_jax.detector import DetectorConfig, load_detectron2_weights
from imagebert_jax.errors import Error, InputError
from imagebert_jax.detector.extract import assign_ids, extract_regions, list_images

log = logging.getLogger("extract_features")


PROG = "imagebert-extract"


def _flags():
  """The command's flags (imagebert_jax.cli's convention)."""
  from absl import flags
  fv = cli.new_flags()
  flags.DEFINE_string("images", None, "A folder of images or a text file of paths.",
                      flag_values=fv)
  flags.DEFINE_string("weights", None, "detectron2-format .pkl of the detector.", flag_values=fv)
  flags.DEFINE_string("output", None, "Output folder for the region files.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", "", "JAX multi-process runtime: the coordinator's "
                      "host:port (else JAX_COORDINATOR_ADDRESS, or JAX's cluster detection).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", 0, "JAX multi-process runtime: processes in all (else "
                       "JAX_NUM_PROCESSES, or detected).", flag_values=fv)
  flags.DEFINE_integer("process_id", -1, "JAX multi-process runtime: this process (else "
                       "JAX_PROCESS_ID, or detected).", flag_values=fv)
  # The images were once split by hand; the processes of a JAX multi-process run split them now.
  flags.DEFINE_integer("shard_index", None, "Gone: see --num_processes.", flag_values=fv)
  flags.DEFINE_integer("num_shards", None, "Gone: see --num_processes.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "Images per detector call.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_enum("id_from", "stem", ["stem", "relpath"], "Image ids: file stems, or paths "
                    "relative to the folder (or list file) without the extension.",
                    flag_values=fv)
  flags.DEFINE_enum("boxes", "proposals", ["proposals", "regressed"], "Write the selected "
                    "proposals (bottom-up-attention) or their top class's regressed boxes.",
                    flag_values=fv)
  flags.DEFINE_bool("class_probs", False, "Also write the full class distribution of every "
                    "region (large).", flag_values=fv)
  flags.DEFINE_string("config", None, "JSON file of DetectorConfig overrides.", flag_values=fv)
  flags.DEFINE_integer("max_images", 0, "Process at most this many new images in this run "
                       "(0: all).", flag_values=fv)
  flags.DEFINE_integer("workers", 4, "Image decoding threads.", flag_values=fv)
  flags.DEFINE_integer("flush_every", 50, "Sync the output every N records.", flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "Log instead of a progress bar.", flag_values=fv)
  flags.mark_flags_as_required(["images", "weights", "output"], flag_values=fv)
  return fv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line's settings (argv without the program; None: sys.argv's)."""
  import sys
  fv = _flags()
  cli.parse_flags(fv, [PROG, *(sys.argv[1:] if argv is None else argv)], prog=PROG,
                  about=__doc__.split("\n\n")[0])
  for gone in ("shard_index", "num_shards"):
    if fv[gone].present:
      cli.refuse(PROG, f"--{gone}: the images are split over the processes of a JAX "
                 "multi-process run now (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                 "JAX_PROCESS_ID or --coordinator_address/--num_processes/--process_id, or "
                 "JAX's cluster detection)")
  return argparse.Namespace(**{name: fv[name].value for name in fv})


def load_config(path: str | None) -> DetectorConfig:
  if path is None:
    return DetectorConfig()
  try:
    return DetectorConfig.from_dict(json.loads(paths.read_text(path)))
  except (OSError, ValueError, TypeError) as e:
    raise InputError(f"--config {path}: {e}") from None


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
  """Runs the extraction of a command line (without the program); returns a summary dict
  (written, skipped, already_done, ...)."""
  return extract(parse_args(argv))


def extract(args: argparse.Namespace) -> dict:
  """Runs the extraction the settings describe (`parse_args`)."""
  import jax

  from imagebert_jax import distributed
  started = distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id)
  try:
    return _extract(args, jax.process_index(), jax.process_count())
  finally:
    if started:
      jax.distributed.shutdown()


def _extract(args: argparse.Namespace, process: int, processes: int) -> dict:
  cfg = load_config(args.config)
  images, root = list_images(args.images)
  items = assign_ids(images, root, args.id_from)
  mine = [item for i, item in enumerate(items) if i % processes == process]
  params = load_detectron2_weights(args.weights, cfg)

  paths.makedirs(args.output)
  stem = f"regions-{process:05d}-of-{processes:05d}"
  out_path = paths.join(args.output, stem + ".ibrf")
  report_path = paths.join(args.output, stem + ".skipped.json")

  writer = RegionFileWriter(out_path, append=True)
  done_before = writer.existing_ids
  todo = [item for item in mine if item[1] not in done_before]
  already = len(mine) - len(todo)
  if args.max_images > 0:
    todo = todo[:args.max_images]
  log.info("%d images found, %d for process %d of %d, %d already in %s, %d to do", len(items),
           len(mine), process, processes, already, out_path, len(todo))

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


def main(argv: list[str] | None = None) -> None:
  """The console command `imagebert-extract` (python -m imagebert_jax.detector.extract_features)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  args = parse_args(argv)
  for handler in logging.getLogger().handlers:
    cli.quiet_libraries(handler, args.verbosity)
  try:
    extract(args)
  except Error as e:
    cli.refuse(PROG, str(e))


if __name__ == "__main__":
  main()
