"""Caption sources: the public caption formats, read as streams of captions and problems.

Sources (each yields `Caption`s, or `Problem`s for entries it cannot use):
  karpathy  dataset_coco.json / dataset_flickr30k.json (Karpathy & Fei-Fei 2015): {"images": [
            {"split": train|restval|val|test, "filename", "cocoid"?, "sentences": [{"raw"}...]}]}.
            The image id is `cocoid` when present (COCO), else the file name without extension
            (Flickr30k), which are the ids the bottom-up-attention features use.
  cc        Conceptual Captions TSV (Sharma et al. 2018): "caption<TAB>url" per line, no header.
            The image id is the line's 0-based index, the name image downloaders give the files.
  sbu       SBU Captioned Photo Dataset (Ordonez et al. 2011): the captions file and the URLs file,
            line by line in parallel. The image id is the Flickr photo id in the URL
            (.../<id>_<secret>.jpg).
  jsonl     one JSON object per line: {"image_id": ..., "caption": ..., "split"?: ...}, for one's
            own web-scale data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from typing import Iterator, Union

from imagebert_jax import paths as paths_lib
from imagebert_jax.data.formats import Problem

SOURCES = ("karpathy", "cc", "sbu", "jsonl")
KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclasses.dataclass(frozen=True)
class Caption:
  image_id: str
  split: str
  text: str


Item = Union[Caption, Problem]


def _open(path: str):
  try:
    return paths_lib.open(path, encoding="utf-8", errors="replace")
  except OSError as e:
    raise FileNotFoundError(f"{path}: cannot open the caption file ({e.strerror})") from e


def read_karpathy(path: str) -> Iterator[Item]:
  with _open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  images = data.get("images") if isinstance(data, dict) else None
  if not isinstance(images, list):
    raise ValueError(f"{path}: no 'images' list: not a Karpathy split file")
  for i, img in enumerate(images):
    if "cocoid" in img:
      image_id = str(img["cocoid"])
    elif "filename" in img:
      image_id = os.path.splitext(os.path.basename(img["filename"]))[0]
    else:
      yield Problem("bad_caption_entry", f"{path} image {i}: neither cocoid nor filename")
      continue
    split = img.get("split", "train")
    for j, sentence in enumerate(img.get("sentences", [])):
      text = (sentence.get("raw") or " ".join(sentence.get("tokens", []))).strip()
      if not text:
        yield Problem("empty_caption", f"{path} image {image_id} sentence {j}: empty caption")
        continue
      yield Caption(image_id, split, text)


def read_cc(path: str, split: str) -> Iterator[Item]:
  with _open(path) as f:
    for i, line in enumerate(f):
      caption = line.rstrip("\r\n").split("\t")[0].strip()
      if not caption:
        yield Problem("empty_caption", f"{path} line {i + 1}: empty caption")
        continue
      yield Caption(str(i), split, caption)


_FLICKR_ID = re.compile(r"/(\d+)_[^/]*$")


def read_sbu(captions_path: str, urls_path: str, split: str) -> Iterator[Item]:
  """The two files line by line; lines of the longer one past the end of the other are skipped
  (one report naming both files and counting them)."""
  with _open(captions_path) as caps, _open(urls_path) as urls:
    for i, (caption, url) in enumerate(itertools.zip_longest(caps, urls)):
      if caption is None or url is None:
        longer, shorter = (urls_path, captions_path) if caption is None else (captions_path,
                                                                              urls_path)
        rest = 1 + sum(1 for _ in (urls if caption is None else caps))
        yield Problem("line_count_mismatch", f"{longer} lines {i + 1}-{i + rest}: {shorter} "
                                             f"has only {i} lines; skipped", count=rest)
        return
      caption, url = caption.strip(), url.strip()
      m = _FLICKR_ID.search(url)
      if not m:
        yield Problem("bad_caption_entry", f"{urls_path} line {i + 1}: no Flickr photo id in "
                                           f"{url!r}")
        continue
      if not caption:
        yield Problem("empty_caption", f"{captions_path} line {i + 1}: empty caption")
        continue
      yield Caption(m.group(1), split, caption)


def read_jsonl(path: str, split: str) -> Iterator[Item]:
  with _open(path) as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        image_id, caption = str(obj["image_id"]), str(obj["caption"]).strip()
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        yield Problem("bad_caption_entry", f"{path} line {i + 1}: not a JSON object with "
                                           f"image_id and caption ({e})")
        continue
      if not caption:
        yield Problem("empty_caption", f"{path} line {i + 1}: empty caption")
        continue
      yield Caption(image_id, str(obj.get("split", split)), caption)


def expand_caption_paths(patterns: list[str]) -> list[str]:
  """Caption files named by paths or globs (`pairs-*.jsonl`), in order: each glob's matches
  sorted; a name that matches nothing is kept, and reported when opened."""
  out = []
  for pattern in patterns:
    matches = paths_lib.glob(pattern) if any(c in pattern for c in "*?[") else []
    out.extend(matches or [pattern])
  return out


def caption_units(source: str, paths: list[str]) -> list[tuple[str, ...]]:
  """The caption files in the units a build reads independently, in source order: one file each,
  but SBU's captions file and URLs file, read line by line together."""
  paths = expand_caption_paths(paths)
  if source not in SOURCES:
    raise ValueError(f"unknown caption source {source!r}; known: {SOURCES}")
  if source == "sbu":
    if len(paths) != 2:
      raise ValueError("sbu captions need two files: the captions file and the URLs file")
    return [tuple(paths)]
  return [(p,) for p in paths]


def read_caption_unit(source: str, unit: tuple[str, ...], split: str = "train") -> Iterator[Item]:
  """The captions (and problems) of one unit of `caption_units`, in file order."""
  if source == "karpathy":
    return read_karpathy(unit[0])
  if source == "cc":
    return read_cc(unit[0], split)
  if source == "sbu":
    return read_sbu(unit[0], unit[1], split)
  if source == "jsonl":
    return read_jsonl(unit[0], split)
  raise ValueError(f"unknown caption source {source!r}; known: {SOURCES}")

