"""The project's region-feature file: one record per image, streamed, TensorFlow-free.

A region file holds the detector output for many images. It is what the feature extractor in
`tools/` writes and what the dataset builders read, next to the public formats (bottom-up-attention
TSV, UNITER-style npz).

Layout (all integers little-endian)::

    b"IBRF\\x01\\n"                                   6-byte magic and version
    repeated:
      uint64 n                                        payload length in bytes
      n bytes                                         msgpack map (below)
      uint32 crc                                      zlib.crc32 of the payload

The payload map::

    {"image_id": str, "image_w": int, "image_h": int,
     "arrays": {name: {"dtype": str, "shape": [int, ...], "data": bytes}}}

with these arrays (N boxes, D feature dims, C classes):

    boxes        float32 [N, 4]   pixels, x1 y1 x2 y2
    features     float16 [N, D]
    object_id    int32   [N]      the detector's top class (0-based, background excluded)
    object_conf  float32 [N]      its confidence
    attr_id      int32   [N]      optional: top attribute
    attr_conf    float32 [N]      optional
    class_probs  float16 [N, C]   optional: the full class distribution (background excluded)

A record is self-checking: a truncated tail (a writer killed mid-record) or a damaged record is
reported with its file and position, and a reader may skip it. Appending to an existing file after
cutting off a damaged tail is how interrupted extractions resume (`RegionFileWriter(append=True)`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
import zlib
from typing import Iterator

import msgpack
import numpy as np

from imagebert_jax import paths
from imagebert_jax.errors import RegionFileError

MAGIC = b"IBRF\x01\n"
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# A record larger than this is certainly a corrupt length field (100 boxes x 2048 x fp16 is 400 KB).
_MAX_RECORD_BYTES = 1 << 30

REQUIRED_ARRAYS = {
    "boxes": (np.float32, 2),
    "features": (np.float16, 2),
    "object_id": (np.int32, 1),
    "object_conf": (np.float32, 1),
}
OPTIONAL_ARRAYS = {
    "attr_id": (np.int32, 1),
    "attr_conf": (np.float32, 1),
    "class_probs": (np.float16, 2),
}


@dataclasses.dataclass
class RegionRecord:
  """The detector output for one image."""

  image_id: str
  image_w: int
  image_h: int
  boxes: np.ndarray
  features: np.ndarray
  object_id: np.ndarray
  object_conf: np.ndarray
  attr_id: np.ndarray | None = None
  attr_conf: np.ndarray | None = None
  class_probs: np.ndarray | None = None

  @property
  def num_boxes(self) -> int:
    return int(self.boxes.shape[0])

  def validate(self, feature_dim: int | None = None) -> None:
    """Raises ValueError naming the first field that is inconsistent."""
    if not self.image_id:
      raise ValueError("empty image_id")
    if self.image_w <= 0 or self.image_h <= 0:
      raise ValueError(f"image {self.image_id}: bad size {self.image_w}x{self.image_h}")
    n = self.num_boxes
    if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
      raise ValueError(f"image {self.image_id}: boxes have shape {self.boxes.shape}, want [N, 4]")
    if self.features.ndim != 2 or self.features.shape[0] != n:
      raise ValueError(
          f"image {self.image_id}: features have shape {self.features.shape}, want [{n}, D]")
    if feature_dim is not None and self.features.shape[1] != feature_dim:
      raise ValueError(
          f"image {self.image_id}: feature dimension {self.features.shape[1]}, want {feature_dim}")
    for name in ("object_id", "object_conf", "attr_id", "attr_conf"):
      value = getattr(self, name)
      if value is not None and value.shape != (n,):
        raise ValueError(f"image {self.image_id}: {name} has shape {value.shape}, want [{n}]")
    if self.class_probs is not None and (
        self.class_probs.ndim != 2 or self.class_probs.shape[0] != n):
      raise ValueError(
          f"image {self.image_id}: class_probs have shape {self.class_probs.shape}, want [{n}, C]")
    if not np.all(np.isfinite(self.features)):
      raise ValueError(f"image {self.image_id}: features contain NaN or infinity")


def _encode(record: RegionRecord) -> bytes:
  arrays = {}
  for name, (dtype, _) in {**REQUIRED_ARRAYS, **OPTIONAL_ARRAYS}.items():
    value = getattr(record, name)
    if value is None:
      continue
    value = np.ascontiguousarray(value, dtype=dtype)
    arrays[name] = {"dtype": np.dtype(dtype).name, "shape": list(value.shape),
                    "data": value.tobytes()}
  payload = {"image_id": str(record.image_id), "image_w": int(record.image_w),
             "image_h": int(record.image_h), "arrays": arrays}
  return msgpack.packb(payload, use_bin_type=True)


def _decode(payload: bytes) -> RegionRecord:
  obj = msgpack.unpackb(payload, raw=False)
  fields = {}
  for name, spec in obj["arrays"].items():
    if name not in REQUIRED_ARRAYS and name not in OPTIONAL_ARRAYS:
      continue  # written by a newer version: ignore what we do not know
    fields[name] = np.frombuffer(spec["data"], dtype=np.dtype(spec["dtype"])).reshape(
        spec["shape"])
  missing = [n for n in REQUIRED_ARRAYS if n not in fields]
  if missing:
    raise ValueError(f"image {obj.get('image_id')!r}: missing arrays {missing}")
  return RegionRecord(image_id=obj["image_id"], image_w=int(obj["image_w"]),
                      image_h=int(obj["image_h"]), **fields)


class RegionFileWriter:
  """Appends records to a region file; use as a context manager.

  With `append=True` an existing file is reopened: a damaged or truncated tail (from a killed
  writer) is cut off first, and `existing_ids` holds the image ids already written, so a resumed
  extraction can skip them.
  """

  def __init__(self, path: str, *, append: bool = False):
    self.path = path
    self.existing_ids: set[str] = set()
    # A file in a bucket is written locally and uploaded whole at every flush and at the end
    # (objects cannot be appended to or truncated); a resumed one is downloaded first.
    self._upload = paths.is_url(path)
    local = path
    if self._upload:
      fd, local = tempfile.mkstemp(suffix=".ibrf")
      os.close(fd)
      if append and paths.exists(path):
        paths.copy(path, local)
      else:
        os.remove(local)
    self._local = local
    if append and os.path.exists(local) and os.path.getsize(local) > 0:
      good_end = len(MAGIC)
      for record, end in _scan(local, stop_at_damage=True):
        self.existing_ids.add(record.image_id)
        good_end = end
      with open(local, "r+b") as f:
        f.truncate(good_end)
      self._f = open(local, "ab")
    else:
      self._f = open(local, "wb")
      self._f.write(MAGIC)

  def write(self, record: RegionRecord) -> None:
    payload = _encode(record)
    self._f.write(_LEN.pack(len(payload)))
    self._f.write(payload)
    self._f.write(_CRC.pack(zlib.crc32(payload)))

  def flush(self) -> None:
    self._f.flush()
    os.fsync(self._f.fileno())
    if self._upload:
      paths.copy(self._local, self.path)

  def close(self) -> None:
    if not self._f.closed:
      self._f.flush()
      self._f.close()
      if self._upload:
        paths.copy(self._local, self.path)
        os.remove(self._local)

  def __enter__(self) -> "RegionFileWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _scan(path: str, *, stop_at_damage: bool) -> Iterator[tuple[RegionRecord, int]]:
  """Yields (record, end offset). Raises RegionFileError on damage unless stop_at_damage."""
  with paths.open(path, "rb") as f:
    if f.read(len(MAGIC)) != MAGIC:
      raise RegionFileError(f"{path}: not a region file (bad magic header)")
    index = 0
    while True:
      start = f.tell()
      head = f.read(_LEN.size)
      if not head:
        return
      problem = None
      if len(head) < _LEN.size:
        problem = "truncated length field"
      else:
        (n,) = _LEN.unpack(head)
        if n > _MAX_RECORD_BYTES:
          problem = f"implausible record length {n}"
        else:
          payload = f.read(n)
          crc = f.read(_CRC.size)
          if len(payload) < n or len(crc) < _CRC.size:
            problem = "truncated record (the file ends inside it)"
          elif _CRC.unpack(crc)[0] != zlib.crc32(payload):
            problem = "checksum mismatch"
      if problem is None:
        try:
          record = _decode(payload)
        except Exception as e:  # noqa: BLE001 - any decoding failure is damage
          problem = f"undecodable payload ({e})"
      if problem is not None:
        if stop_at_damage:
          return
        raise RegionFileError(f"{path}: record {index} at byte {start}: {problem}")
      yield record, f.tell()
      index += 1


def read_region_file(path: str) -> Iterator[RegionRecord]:
  """Yields the records of a region file; raises RegionFileError (naming file and record) on damage.

  Records before the damage have already been yielded, so a caller can count what it lost.
  """
  for record, _ in _scan(path, stop_at_damage=False):
    yield record


def count_records(path: str) -> int:
  """The number of whole records in a region file, found by skipping from length to length
  (the payloads are not read or checked)."""
  count = 0
  end = paths.getsize(path)
  with paths.open(path, "rb") as f:
    if f.read(len(MAGIC)) != MAGIC:
      raise RegionFileError(f"{path}: not a region file (bad magic header)")
    while True:
      head = f.read(_LEN.size)
      if len(head) < _LEN.size:
        return count
      (n,) = _LEN.unpack(head)
      if n > _MAX_RECORD_BYTES or f.tell() + n + _CRC.size > end:
        return count
      f.seek(n + _CRC.size, os.SEEK_CUR)
      count += 1
