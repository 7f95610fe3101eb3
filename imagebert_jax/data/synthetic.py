"""A synthetic, learnable scene dataset for the demo and the tests.

Each image holds 1 to 3 objects, each with a class, a colour and a place (left, right, top, bottom,
middle), over a background "stuff" class (sky, grass, water, wall). A detector's view of it is
simulated: several regions per object (the tight box and jittered ones) and some background
regions, each with a feature = class prototype + colour prototype + noise, a box, the detector's
top label (right most of the time) and a confidence. Captions come from a small grammar that talks
about the objects, their colours, places and the background, so matching, masked words and masked
region classes can all be learned from the data.

The dataset is written through the same builder as real data, and read through the same pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from imagebert_jax import paths
from imagebert_jax.data import build as build_lib
from imagebert_jax.data import records
from imagebert_jax.data.regionfile import RegionFileWriter, RegionRecord
from imagebert_jax.data.tokenizer import write_vocab

OBJECTS = ("dog", "cat", "car", "tree", "bird", "horse", "boat", "chair", "ball", "cup", "person",
           "house")
STUFF = ("sky", "grass", "water", "wall")
CLASSES = OBJECTS + STUFF  # the detector's label space
COLOURS = ("red", "blue", "green", "yellow", "black", "white")
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
          "middle": (0.5, 0.5)}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "middle": "in the middle"}
STUFF_PHRASES = {"sky": "under the sky", "grass": "on the grass", "water": "near the water",
                 "wall": "by the wall"}
EXTRA_WORDS = ("a", "an", "the", "and", "of", "is", "are", "there", "photo", "picture", "with",
               "next", "to", "on", "in", "at", "by", "near", "under", "left", "right", "top",
               "bottom", "middle", "two", "three", "objects", "scene", "showing", "some", ".")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  seed: int = 0
  feature_dim: int = 32
  min_regions: int = 10
  max_regions: int = 16
  captions_per_image: int = 5
  noise: float = 0.6
  label_noise: float = 0.1
  image_size: tuple[int, int] = (640, 480)


def vocabulary() -> list[str]:
  return sorted(set(OBJECTS + STUFF + COLOURS + EXTRA_WORDS))


@dataclasses.dataclass
class Scene:
  objects: list  # (class index, colour index, place name)
  stuff: int


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
  """`n` different-looking captions for a scene."""
  objs = [(OBJECTS[c], COLOURS[a], p) for c, a, p in scene.objects]
  stuff = STUFF[scene.stuff]
  out = []
  for _ in range(n):
    k = rng.integers(5)
    c, a, p = objs[rng.integers(len(objs))]
    if k == 0:
      out.append(f"{_article(a)} {a} {c} {PLACE_PHRASES[p]}")
    elif k == 1:
      out.append(f"{_article(a)} {a} {c} {STUFF_PHRASES[stuff]}")
    elif k == 2:
      parts = [f"{_article(a2)} {a2} {c2}" for c2, a2, _ in objs]
      out.append("a picture of " + " and ".join(parts))
    elif k == 3:
      out.append(f"the {c} {PLACE_PHRASES[p]} is {a}")
    else:
      counts = {1: "a scene", 2: "two objects", 3: "three objects"}
      names = " and ".join(f"{_article(c2)} {c2}" for c2, _, _ in objs)
      out.append(f"{counts[len(objs)]} with {names} {STUFF_PHRASES[stuff]}")
  return out


class SceneGenerator:
  """Deterministic scenes and their simulated detector output."""

  def __init__(self, spec: SyntheticSpec):
    self.spec = spec
    proto_rng = np.random.default_rng(spec.seed + 7919)
    d = spec.feature_dim
    self.class_protos = proto_rng.normal(size=(len(CLASSES), d)).astype(np.float32)
    self.colour_protos = 0.7 * proto_rng.normal(size=(len(COLOURS), d)).astype(np.float32)

  def scene(self, rng: np.random.Generator) -> Scene:
    k = int(rng.integers(1, 4))
    classes = rng.choice(len(OBJECTS), size=k, replace=False)
    places = rng.choice(list(PLACES), size=k, replace=False)
    return Scene([(int(c), int(rng.integers(len(COLOURS))), str(p))
                  for c, p in zip(classes, places)], int(rng.integers(len(STUFF))))

  def regions(self, scene: Scene, image_id: str, rng: np.random.Generator) -> RegionRecord:
    spec = self.spec
    w, h = spec.image_size
    n = int(rng.integers(spec.min_regions, spec.max_regions + 1))
    # Who each region shows: every object at least twice, the background at least once.
    owners = [i for i in range(len(scene.objects)) for _ in range(2)] + [-1]
    owners += list(rng.integers(-1, len(scene.objects), size=n - len(owners)))
    rng.shuffle(owners)
    boxes, feats, labels, confs = [], [], [], []
    for owner in owners:
      if owner < 0:
        cls, colour = len(OBJECTS) + scene.stuff, None
        cx, cy, bw, bh = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), 0.5, 0.4
      else:
        cls, colour, place = scene.objects[owner]
        cx, cy = PLACES[place]
        bw, bh = 0.3, 0.3
      jitter = rng.normal(scale=0.04, size=4)
      x1 = np.clip(cx - bw / 2 + jitter[0], 0, 1) * w
      y1 = np.clip(cy - bh / 2 + jitter[1], 0, 1) * h
      x2 = np.clip(cx + bw / 2 + jitter[2], 0, 1) * w
      y2 = np.clip(cy + bh / 2 + jitter[3], 0, 1) * h
      x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
      f = self.class_protos[cls].copy()
      if colour is not None:
        f += self.colour_protos[colour]
      f += spec.noise * rng.normal(size=spec.feature_dim)
      label = cls if rng.uniform() >= spec.label_noise else int(rng.integers(len(CLASSES)))
      boxes.append([x1, y1, x2, y2])
      feats.append(f)
      labels.append(label)
      confs.append(rng.uniform(0.3, 1.0))
    return RegionRecord(
        image_id=image_id, image_w=w, image_h=h, boxes=np.asarray(boxes, np.float32),
        features=np.asarray(feats, np.float16), object_id=np.asarray(labels, np.int32),
        object_conf=np.asarray(confs, np.float32))


def build(out_dir: str, splits: dict[str, int], spec: SyntheticSpec = SyntheticSpec(),
          max_text_len: int = 16, name: str = "synthetic") -> str:
  """Writes the synthetic dataset (and its vocabulary) to `out_dir`; returns the vocab path.

  The scenes become a region file and a JSONL caption file, which the regular builder joins,
  tokenizes and writes, exactly as it does real data. Does nothing if a finished dataset with the
  same settings is already there.
  """
  paths.makedirs(out_dir)
  vocab_file = paths.join(out_dir, "vocab.txt")
  wanted = _jsonable({"spec": dataclasses.asdict(spec), "splits": splits,
                      "max_text_len": max_text_len})
  try:
    if records.read_info(out_dir).get("synthetic") == wanted:
      logging.info("Synthetic dataset already built in %s", out_dir)
      return vocab_file
  except FileNotFoundError:
    pass
  write_vocab(vocab_file, vocabulary())
  gen = SceneGenerator(spec)
  source_dir = paths.join(out_dir, "source")
  paths.makedirs(source_dir)
  regions_path = paths.join(source_dir, "regions.ibrf")
  captions_path = paths.join(source_dir, "captions.jsonl")
  with RegionFileWriter(regions_path) as regions, paths.open(captions_path, "w") as caps:
    for s_index, (split, count) in enumerate(sorted(splits.items())):
      rng = np.random.default_rng([spec.seed, s_index])
      for i in range(count):
        scene = gen.scene(rng)
        image_id = f"{split}_{i:06d}"
        regions.write(gen.regions(scene, image_id, rng))
        for text in describe(scene, rng, spec.captions_per_image):
          caps.write(json.dumps({"image_id": image_id, "caption": text, "split": split}) + "\n")
  build_lib.build_dataset(build_lib.BuildSpec(
      name=name, out_dir=out_dir, regions=[regions_path], captions=[captions_path],
      caption_source="jsonl", vocab_file=vocab_file, max_text_len=max_text_len,
      feature_dim=spec.feature_dim, min_boxes=spec.min_regions, max_boxes=spec.max_regions,
      extra_info={"vocab_file": "vocab.txt", "synthetic": wanted,
                  "class_names": list(CLASSES)}))
  return vocab_file


def _jsonable(x):
  return json.loads(json.dumps(x))
