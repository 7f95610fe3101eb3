"""Region records from image files: listing, decoding in threads, batched detection.

Shared by `tools/extract_features.py` (which writes region files) and `imagebert_jax.retrieval.search`
(which indexes a folder of photos). Images are decoded and prepared in a thread pool, grouped by
canvas (landscape or portrait) into batches of `batch_size`, so the jitted detector compiles once
per canvas and batch size; one batch runs on the device while the host turns the previous one into
records. TensorFlow-free.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from imagebert_jax import paths
from imagebert_jax.data.regionfile import RegionRecord
from imagebert_jax.detector.config import DetectorConfig
from imagebert_jax.detector.model import compiled_detector
from imagebert_jax.detector.preprocess import load_image, prepare_image, to_original
from imagebert_jax.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(spec: str) -> tuple[list[str], str]:
  """Sorted image paths of a folder (recursive) or a list file, and the root for relative ids."""
  if paths.isdir(spec):
    root = paths.absolute(spec)
    if paths.is_url(root):
      found = [p for p in paths.walk_files(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    else:
      found = []
      for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
          if name.lower().endswith(IMAGE_EXTENSIONS):
            found.append(os.path.join(folder, name))
    return sorted(found, key=lambda path: paths.relative_to(path, root)), root
  if not paths.isfile(spec):
    raise InputError(f"--images {spec}: no such folder or list file")
  root = paths.dirname(paths.absolute(spec))
  images = []
  for line in paths.read_text(spec).splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      images.append(line if os.path.isabs(line) or paths.is_url(line) else paths.join(root, line))
  return sorted(set(images)), root


def image_id(path: str, root: str, mode: str) -> str:
  """'stem': the file name without extension; 'relpath': the path below `root` without it."""
  if mode == "stem":
    return os.path.splitext(paths.basename(path))[0]
  return os.path.splitext(paths.relative_to(path, root))[0]


def assign_ids(images: list[str], root: str, mode: str) -> list[tuple[str, str]]:
  """(path, id) pairs; raises InputError naming the first two images that share an id."""
  seen: dict[str, str] = {}
  out = []
  for path in images:
    key = image_id(path, root, mode)
    if key in seen:
      hint = " (try --id_from relpath)" if mode == "stem" else ""
      raise InputError(f"images {seen[key]} and {path} both have id {key!r}{hint}")
    seen[key] = path
    out.append((path, key))
  return out


def _prepare(path: str, cfg: DetectorConfig):
  try:
    return prepare_image(load_image(path), cfg), None
  except Exception as e:  # noqa: BLE001 - any decoding failure skips the image
    return None, f"{type(e).__name__}: {e}"


def extract_regions(items: Iterable[tuple[str, str]], params: Any, cfg: DetectorConfig, *,
                    batch_size: int = 1, workers: int = 4, boxes: str = "proposals",
                    class_probs: bool = False
                    ) -> Iterator[tuple[str, str, RegionRecord | None, str | None]]:
  """Yields (path, id, record, None) for each image, or (path, id, None, why) for one skipped
  (unreadable, no region found, bad detector output). Records come in batch order, which groups
  images by canvas; every item is yielded once."""
  detector = compiled_detector(cfg)
  box_key = "boxes" if boxes == "proposals" else "regressed_boxes"
  # Only the outputs a record keeps come back from the device.
  wanted = ["num_boxes", box_key, "features", "object_id", "object_conf"]
  wanted += ["attr_id", "attr_conf"] if cfg.num_attributes else []
  wanted += ["class_probs"] if class_probs else []
  buckets: dict[tuple[int, int], list] = collections.defaultdict(list)
  inflight: collections.deque = collections.deque()

  def records(batch, out):
    out = jax.device_get({k: out[k] for k in wanted})
    for b, (path, key, prep) in enumerate(batch):
      n = int(out["num_boxes"][b])
      if n == 0:  # e.g. a sliver a few pixels high: no valid proposal at all
        yield path, key, None, "no regions found (image too small?)"
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
      if class_probs:
        record.class_probs = out["class_probs"][b, :n].astype(np.float16)
      try:
        record.validate(feature_dim=cfg.feature_dim)
      except ValueError as e:
        yield path, key, None, f"bad detector output: {e}"
        continue
      yield path, key, record, None

  def launch(batch) -> None:
    canvases = [prep.canvas for _, _, prep in batch]
    sizes = [prep.resized_hw for _, _, prep in batch]
    while len(canvases) < batch_size:  # pad the last batch; its extra results are dropped
      canvases.append(canvases[0])
      sizes.append(sizes[0])
    inflight.append((batch, detector(params, np.stack(canvases), np.asarray(sizes, np.int32))))

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    window = max(2 * workers, 2 * batch_size)
    pending: collections.deque = collections.deque()
    queue = iter(items)
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
        yield path, key, None, error
        continue
      bucket = buckets[prep.canvas.shape[:2]]
      bucket.append((path, key, prep))
      if len(bucket) == batch_size:
        launch(bucket[:])
        bucket.clear()
        while len(inflight) > 1:  # keep one batch on the device while the host writes
          yield from records(*inflight.popleft())
    for bucket in buckets.values():
      if bucket:
        launch(bucket[:])
        bucket.clear()
    while inflight:
      yield from records(*inflight.popleft())
