"""Readers for the public region-feature formats, exactly as published, and for our region files.

Each reader yields `RegionRecord`s and, for input it cannot use, `Problem`s (a reason key and a
one-line message naming the file and the record), so a long build skips, reports and goes on.

Formats:
  bua_tsv      bottom-up-attention's generate_tsv.py output (Anderson et al. 2018): tab-separated,
               no header, fields image_id, image_w, image_h, num_boxes, boxes, features; arrays are
               base64 of float32 ([num_boxes, 4] pixel x1 y1 x2 y2 and [num_boxes, D]). It carries
               no class labels: masked object classification is turned off for such datasets.
  d2_tsv       the detectron2-based variant (py-bottom-up-attention, as read by LXMERT's
               load_obj_tsv): fields img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
               attrs_conf, num_boxes, boxes, features; ids base64 int64, confidences, boxes and
               features base64 float32. The variant is recognised by its 10 fields.
  uniter_npz   one .npz per image as in UNITER's image databases: features [N, D], norm_bb [N, 7]
               (x1, y1, x2, y2, w, h, w*h, all normalised by the image size), conf [N],
               soft_labels [N, 1 + C] (index 0 is background). The image id is the file name
               without .npz; the image size is not stored, so boxes are kept normalised (W = H = 1).
  ibrf         this project's region file (imagebert_jax/data/regionfile.py), as written by
               tools/extract_features.py.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import re
from typing import Iterable, Iterator, Union

import numpy as np

from imagebert_jax import paths as paths_lib
from imagebert_jax.data import regionfile
from imagebert_jax.data.regionfile import RegionRecord

BUA_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
D2_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
             "num_boxes", "boxes", "features")
FORMATS = ("bua_tsv", "d2_tsv", "tsv", "uniter_npz", "ibrf")
# Formats whose records carry the detector's class labels.
LABELLED = {"bua_tsv": False, "d2_tsv": True, "uniter_npz": True, "ibrf": True}


@dataclasses.dataclass(frozen=True)
class Problem:
  """Input that was not used: `reason` is the report's key, `message` one line for the log,
  `count` the items it stands for."""

  reason: str
  message: str
  count: int = 1


Item = Union[RegionRecord, Problem]


def expand_paths(patterns: Iterable[str]) -> list[str]:
  """Files named by paths, globs or folders (a folder's files, recursively), sorted, unique."""
  out = []
  for pattern in patterns:
    if paths_lib.isdir(pattern):
      out.extend(paths_lib.walk_files(pattern))
    else:
      matches = paths_lib.glob(pattern)
      out.extend(matches if matches else [pattern])  # a missing file is reported when read
  return sorted(dict.fromkeys(out))


def _b64(field: str, dtype, count: int, width: int | None, what: str):
  """Decodes one base64 array: [count] (width None), [count, width], or [count, any] (width -1).

  Raises ValueError whose message starts with the report's reason key.
  """
  try:
    raw = base64.b64decode(field, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"bad_base64: {what} is not valid base64 ({e})") from e
  arr = np.frombuffer(raw, dtype=dtype)
  if width is None:
    if arr.size != count:
      raise ValueError(f"num_boxes_mismatch: {what} holds {arr.size} values, num_boxes is {count}")
    return arr
  if count == 0 or arr.size % count or (width > 0 and arr.size != count * width):
    raise ValueError(f"num_boxes_mismatch: {what} hold {arr.size} values, which do not make "
                     f"num_boxes={count} rows" + (f" of {width}" if width > 0 else ""))
  return arr.reshape(count, arr.size // count)


def read_tsv(path: str) -> Iterator[tuple[str, Item]]:
  """Both TSV layouts, told apart by their number of fields."""
  try:
    f = paths_lib.open(path, "rb")
  except OSError as e:
    yield path, Problem("unreadable_file", f"{path}: cannot open ({e.strerror})")
    return
  with f:
    for line_no, line in enumerate(f, start=1):
      where = f"{path} line {line_no}"
      item = _parse_tsv_line(line, where)
      if isinstance(item, RegionRecord):
        where = f"{where} (image {item.image_id})"
      if not line.endswith(b"\n"):
        # A file cut off mid-write ends without a newline; a complete last line without one
        # still parses, so only a last line that fails to parse is called truncated.
        if isinstance(item, Problem):
          item = Problem("truncated_file", f"{where}: the file ends inside this record")
        yield where, item
        return
      yield where, item


def _parse_tsv_line(line: bytes, where: str) -> Item:
  fields = line.rstrip(b"\r\n").split(b"\t")
  if len(fields) == len(BUA_FIELDS):
    names, labelled = BUA_FIELDS, False
  elif len(fields) == len(D2_FIELDS):
    names, labelled = D2_FIELDS, True
  else:
    return Problem("bad_field_count", f"{where}: {len(fields)} tab-separated fields, want 6 "
                                      "(bottom-up-attention) or 10 (detectron2 variant)")
  row = dict(zip(names, (x.decode("ascii", errors="replace") for x in fields)))
  image_id = row.get("image_id", row.get("img_id", ""))
  where = f"{where} (image {image_id})"
  try:
    n = int(row["num_boxes"])
    w = int(float(row.get("image_w", row.get("img_w"))))
    h = int(float(row.get("image_h", row.get("img_h"))))
  except ValueError:
    return Problem("bad_number", f"{where}: num_boxes, width or height is not a number")
  if n <= 0:
    return Problem("no_boxes", f"{where}: num_boxes is {n}")
  try:
    boxes = _b64(row["boxes"], np.float32, n, 4, "boxes")
    features = _b64(row["features"], np.float32, n, -1, "features")
    extra = {}
    if labelled:
      extra["object_id"] = _b64(row["objects_id"], np.int64, n, None, "objects_id").astype(np.int32)
      extra["object_conf"] = _b64(row["objects_conf"], np.float32, n, None, "objects_conf")
      extra["attr_id"] = _b64(row["attrs_id"], np.int64, n, None, "attrs_id").astype(np.int32)
      extra["attr_conf"] = _b64(row["attrs_conf"], np.float32, n, None, "attrs_conf")
  except ValueError as e:
    reason, _, message = str(e).partition(": ")
    return Problem(reason, f"{where}: {message}")
  if not labelled:
    extra = {"object_id": np.full((n,), -1, np.int32), "object_conf": np.ones((n,), np.float32)}
  return RegionRecord(image_id=image_id, image_w=w, image_h=h, boxes=boxes.astype(np.float32),
                      features=features, **extra)


def read_uniter_npz(path: str) -> Iterator[tuple[str, Item]]:
  image_id = paths_lib.basename(path)[:-len(".npz")] if path.endswith(".npz") else \
      paths_lib.basename(path)
  where = f"{path} (image {image_id})"
  try:
    with np.load(io.BytesIO(paths_lib.read_bytes(path)) if paths_lib.is_url(path) else path) as z:
      arrays = {k: z[k] for k in ("features", "norm_bb", "conf", "soft_labels") if k in z}
  except Exception as e:  # noqa: BLE001 - a zip or pickle error: the file is damaged
    yield where, Problem("unreadable_file", f"{where}: cannot read ({type(e).__name__}: {e})")
    return
  missing = [k for k in ("features", "norm_bb") if k not in arrays]
  if missing:
    yield where, Problem("missing_field", f"{where}: no {', '.join(missing)} in the file")
    return
  feats, nbb = arrays["features"], arrays["norm_bb"]
  n = feats.shape[0] if feats.ndim == 2 else -1
  if n <= 0:
    yield where, Problem("no_boxes", f"{where}: features have shape {feats.shape}")
    return
  if nbb.ndim != 2 or nbb.shape[0] != n or nbb.shape[1] < 4:
    yield where, Problem("num_boxes_mismatch", f"{where}: norm_bb has shape {nbb.shape} for {n} "
                                        "feature rows")
    return
  soft = arrays.get("soft_labels")
  if soft is not None and (soft.ndim != 2 or soft.shape[0] != n or soft.shape[1] < 2):
    yield where, Problem("num_boxes_mismatch", f"{where}: soft_labels have shape {soft.shape} for {n} "
                                        "boxes")
    return
  if soft is not None:
    probs = soft[:, 1:].astype(np.float32)  # drop background
    object_id = probs.argmax(1).astype(np.int32)
    conf = arrays.get("conf", probs.max(1)).astype(np.float32).reshape(-1)
  else:
    probs, object_id = None, np.full((n,), -1, np.int32)
    conf = arrays.get("conf", np.ones((n,), np.float32)).astype(np.float32).reshape(-1)
  yield where, RegionRecord(image_id=image_id, image_w=1, image_h=1,
                     boxes=nbb[:, :4].astype(np.float32), features=feats,
                     object_id=object_id, object_conf=conf,
                     class_probs=None if probs is None else probs.astype(np.float16))


def read_ibrf(path: str) -> Iterator[tuple[str, Item]]:
  index = 0
  try:
    for record in regionfile.read_region_file(path):
      yield f"{path} record {index} (image {record.image_id})", record
      index += 1
  except FileNotFoundError as e:
    yield path, Problem("unreadable_file", f"{path}: cannot open ({e.strerror})")
  except regionfile.RegionFileError as e:
    yield f"{path} record {index}", Problem(
        "truncated_file" if "truncated" in str(e) else "damaged_record", str(e))


def detect_format(path: str) -> str:
  if path.endswith(".npz"):
    return "uniter_npz"
  if path.endswith(".ibrf"):
    return "ibrf"
  return "tsv"


def read_regions(paths: Iterable[str], fmt: str = "auto",
                 feature_dim: int | None = None) -> Iterator[tuple[str, Item]]:
  """(where, record or problem) from many files in order; `where` names the file and record.

  Each record's consistency is checked too (shapes, feature dimension, finite values).
  """
  for path in paths:
    kind = detect_format(path) if fmt in ("auto", "") else fmt
    if kind in ("tsv", "bua_tsv", "d2_tsv"):
      items = read_tsv(path)
    elif kind == "uniter_npz":
      items = read_uniter_npz(path)
    elif kind == "ibrf":
      items = read_ibrf(path)
    else:
      raise ValueError(f"unknown region format {fmt!r}; known: {FORMATS}")
    for where, item in items:
      if isinstance(item, RegionRecord):
        try:
          item.validate(feature_dim)
        except ValueError as e:
          reason = "feature_dim" if "feature dimension" in str(e) else (
              "non_finite" if "NaN" in str(e) else "inconsistent_record")
          item = Problem(reason, f"{where}: {str(e).split(': ', 1)[-1]}")
      yield where, item


_TRAILING_INT = re.compile(r"(\d+)$")


def canonical_id(image_id: str, mode: str = "none") -> str:
  """How region and caption ids are matched: 'none' keeps them; 'trailing_int' keeps the digits
  at the end without leading zeros (so 'coco_train2014_000000000009', 'COCO_..._000000000009.jpg'
  stems and cocoid 9 all become '9')."""
  image_id = str(image_id)
  if mode == "none":
    return image_id
  if mode == "trailing_int":
    m = _TRAILING_INT.search(os.path.splitext(image_id)[0])
    return str(int(m.group(1))) if m else image_id
  raise ValueError(f"unknown image id mode {mode!r}; known: none, trailing_int")
