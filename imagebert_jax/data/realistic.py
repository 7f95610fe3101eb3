"""A realistic stand-in for Flickr30k: detector-like region features and annotator-like captions,
written in the public formats (bottom-up-attention TSV, detectron2 layout, and a Karpathy split
file) so that it goes through the dataset builder exactly as downloaded data does.

    python -m imagebert_jax.data.realistic --out_dir data/scenes_src --images train=1000,val=50,test=100
    python -m imagebert_jax.data.build --name scenes --out_dir data/scenes \
      --regions data/scenes_src/features --captions data/scenes_src/dataset_scenes.json \
      --caption_source karpathy --vocab_file data/scenes_src/vocab.txt

What it imitates (and why the toy `synthetic` dataset of the tests does not):

* Images. Each shows a setting (beach, street, park, kitchen, ...) and one to three salient things
  (people, animals, vehicles, objects) with attributes (colour, age, material), placed so that
  their boxes carry the relations the captions name (riding: the rider's box above and over the
  ridden one; left of; next to; holding: overlapping).
* Regions, as a Faster R-CNN trained on Visual Genome gives them after its confidence threshold:
  10 to 100 per image. Only a few show what the captions talk about: each salient thing has one
  large, confident box, sometimes a near-duplicate, and a few part boxes (head, hand, wheel,
  shirt); the setting contributes large background boxes (sky, road, wall) of middling
  confidence; the rest are small, low-confidence regions of whatever classes (windows, poles,
  leaves, shadows). Box size and confidence follow salience.
* Features: 2048-d, non-negative, sparse and heavy-tailed, like the ReLU-then-average-pooled
  res5 features of that detector. Each region's feature is a fixed random non-linear read-out of a
  low-dimensional latent: its class (classes of a super-category share a component, so a dog
  looks like a cat more than like a bus), its attribute, an image-wide "style" shared by all the
  image's regions (lighting, camera), and instance noise that grows as the region gets smaller.
  A per-dimension gain makes a few dimensions large everywhere. About half the values are zero;
  the largest are tens of times the mean.
* Labels: the detector's top class is right most of the time for confident boxes, and otherwise
  a class of the same super-category or any class: noisy, as real detector labels are.
* Captions: five per image from a grammar about the salient things, their attributes, their
  relations and the setting, with synonyms ("man", "guy", "person"), optional attributes, and
  annotators who mention only some of the things. Nothing marks which regions a caption is about.

Nothing here is tuned to make matching easy: two images of the same classes differ only in
attributes, relations or setting, and most regions of every image are clutter.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Iterable

import numpy as np

# ------------------------------------------------------------------------------------------------
# The world: classes, attributes, settings.
# ------------------------------------------------------------------------------------------------
# Things a caption can be about: (class, super-category, synonyms, plural, attribute kind).
THINGS = (
    ("man", "person", ("man", "guy", "person"), "men", "person"),
    ("woman", "person", ("woman", "lady", "person"), "women", "person"),
    ("boy", "person", ("boy", "kid", "child"), "boys", "person"),
    ("girl", "person", ("girl", "kid", "child"), "girls", "person"),
    ("dog", "animal", ("dog", "puppy"), "dogs", "animal"),
    ("cat", "animal", ("cat", "kitten"), "cats", "animal"),
    ("horse", "animal", ("horse",), "horses", "animal"),
    ("cow", "animal", ("cow",), "cows", "animal"),
    ("sheep", "animal", ("sheep",), "sheep", "animal"),
    ("bird", "animal", ("bird",), "birds", "animal"),
    ("elephant", "animal", ("elephant",), "elephants", "none"),
    ("giraffe", "animal", ("giraffe",), "giraffes", "none"),
    ("bear", "animal", ("bear",), "bears", "animal"),
    ("car", "vehicle", ("car",), "cars", "colour"),
    ("bus", "vehicle", ("bus",), "buses", "colour"),
    ("truck", "vehicle", ("truck",), "trucks", "colour"),
    ("bicycle", "vehicle", ("bicycle", "bike"), "bicycles", "colour"),
    ("motorcycle", "vehicle", ("motorcycle", "motorbike"), "motorcycles", "colour"),
    ("boat", "vehicle", ("boat",), "boats", "colour"),
    ("train", "vehicle", ("train",), "trains", "colour"),
    ("bench", "furniture", ("bench",), "benches", "material"),
    ("chair", "furniture", ("chair",), "chairs", "material"),
    ("table", "furniture", ("table",), "tables", "material"),
    ("couch", "furniture", ("couch", "sofa"), "couches", "colour"),
    ("umbrella", "object", ("umbrella",), "umbrellas", "colour"),
    ("kite", "object", ("kite",), "kites", "colour"),
    ("frisbee", "object", ("frisbee",), "frisbees", "colour"),
    ("ball", "object", ("ball",), "balls", "colour"),
    ("surfboard", "object", ("surfboard",), "surfboards", "colour"),
    ("skateboard", "object", ("skateboard",), "skateboards", "colour"),
    ("bag", "object", ("bag", "backpack"), "bags", "colour"),
    ("laptop", "object", ("laptop", "computer"), "laptops", "none"),
    ("pizza", "food", ("pizza",), "pizzas", "none"),
    ("cake", "food", ("cake",), "cakes", "none"),
    ("guitar", "object", ("guitar",), "guitars", "colour"),
)
# Parts: (class, the super-categories it belongs to).
PARTS = (
    ("head", ("person", "animal")), ("hand", ("person",)), ("arm", ("person",)),
    ("leg", ("person", "animal")), ("shirt", ("person",)), ("hat", ("person",)),
    ("jacket", ("person",)), ("hair", ("person",)), ("face", ("person",)),
    ("ear", ("animal",)), ("tail", ("animal",)), ("eye", ("animal", "person")),
    ("nose", ("animal", "person")), ("wheel", ("vehicle",)), ("window", ("vehicle",)),
    ("door", ("vehicle",)), ("seat", ("vehicle", "furniture")), ("handle", ("vehicle", "object")),
    ("light", ("vehicle",)), ("leg of table", ("furniture",)), ("plate", ("food",)),
)
# Background stuff.
STUFF = ("sky", "grass", "water", "sand", "road", "building", "tree", "wall", "floor", "snow",
         "cloud", "fence", "sidewalk", "pole", "rock", "counter", "cabinet", "mountain",
         "field", "leaves", "shadow", "sign", "street light", "bush", "curtain", "shelf")
# Settings: (name, caption phrases, stuff it shows, things that fit).
SETTINGS = (
    ("beach", ("on the beach", "by the ocean", "on the sand"),
     ("sand", "water", "sky", "cloud", "rock"),
     ("man", "woman", "boy", "girl", "dog", "surfboard", "kite", "umbrella", "frisbee", "ball",
      "boat", "bird", "horse")),
    ("street", ("on a city street", "on the street", "in the city", "on the road"),
     ("road", "building", "sidewalk", "pole", "sign", "street light", "sky"),
     ("man", "woman", "boy", "girl", "dog", "car", "bus", "truck", "bicycle", "motorcycle",
      "bag", "umbrella", "skateboard", "bench", "guitar")),
    ("park", ("in the park", "in a park", "on the grass"),
     ("grass", "tree", "bush", "sky", "leaves", "fence"),
     ("man", "woman", "boy", "girl", "dog", "bench", "frisbee", "kite", "ball", "bicycle",
      "bird", "guitar", "bag")),
    ("kitchen", ("in a kitchen", "in the kitchen"),
     ("counter", "cabinet", "wall", "floor", "shelf"),
     ("man", "woman", "boy", "girl", "cat", "dog", "pizza", "cake", "table", "chair", "laptop")),
    ("living room", ("in a living room", "inside a house", "at home"),
     ("wall", "floor", "curtain", "shelf", "cabinet"),
     ("man", "woman", "boy", "girl", "cat", "dog", "couch", "chair", "table", "laptop",
      "guitar", "cake")),
    ("field", ("in a grassy field", "in a field", "on a farm"),
     ("field", "grass", "fence", "sky", "tree", "mountain"),
     ("man", "woman", "boy", "girl", "dog", "horse", "cow", "sheep", "bird", "truck",
      "elephant", "giraffe", "bear")),
    ("snow", ("in the snow", "on a snowy hill"),
     ("snow", "tree", "sky", "mountain", "rock"),
     ("man", "woman", "boy", "girl", "dog", "bear", "bird", "car")),
    ("lake", ("by a lake", "near the water", "on the river"),
     ("water", "tree", "rock", "sky", "grass", "mountain"),
     ("man", "woman", "boy", "girl", "dog", "boat", "bird", "bear", "cow")),
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "pink", "gray",
           "brown", "purple")
ANIMAL_COLOURS = ("brown", "black", "white", "gray", "spotted")
MATERIALS = ("wooden", "metal", "white", "black", "old")
PERSON_ATTRS = ("young", "old", "smiling", "tall")
CLOTHES = ("shirt", "jacket", "dress", "hat", "coat")

SUPER_CATEGORIES = ("person", "animal", "vehicle", "furniture", "object", "food", "part", "stuff")


def class_names() -> list[str]:
  """The detector's label space: things, parts, stuff."""
  return [t[0] for t in THINGS] + [p[0] for p in PARTS] + list(STUFF)


def attribute_names() -> list[str]:
  names = list(COLOURS) + [a for a in ANIMAL_COLOURS + MATERIALS + PERSON_ATTRS
                           if a not in COLOURS]
  return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------
# Scenes.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Thing:
  cls: str
  attr: str | None      # the attribute the image shows (colour, age, material)
  clothes: str | None   # people: what they wear ("red shirt")
  box: tuple[float, float, float, float]  # normalised x1 y1 x2 y2


@dataclasses.dataclass
class Scene:
  setting: int
  things: list[Thing]
  relation: tuple[int, str, int] | None  # (subject, verb phrase, object) between things
  count: int            # >1: several instances of the first thing ("two dogs")


THING_INFO = {t[0]: t for t in THINGS}

# Relations: (subject super-category, object class or super-category, phrase, layout).
RELATIONS = (
    ("person", ("horse", "bicycle", "motorcycle", "skateboard", "surfboard"), "riding", "on"),
    ("person", ("dog", "cat", "horse", "cow", "sheep"), "petting", "beside"),
    ("person", ("dog", "horse", "cow"), "walking", "beside"),
    ("person", ("umbrella", "bag", "guitar", "frisbee", "ball", "laptop", "cake", "pizza"),
     "holding", "holds"),
    ("person", ("frisbee", "ball"), "throwing", "beside"),
    ("person", ("kite",), "flying", "above"),
    ("person", ("bench", "chair", "couch"), "sitting on", "on"),
    ("person", ("car", "bus", "truck", "train", "boat"), "standing next to", "beside"),
    ("animal", ("couch", "bench", "chair"), "lying on", "on"),
    ("animal", ("ball", "frisbee"), "playing with", "beside"),
    ("any", ("any",), "next to", "beside"),
    ("any", ("any",), "behind", "behind"),
    ("any", ("any",), "in front of", "front"),
)


def _fits(rel, subject: str, obj: str) -> bool:
  sub_cat, objects = rel[0], rel[1]
  sub_ok = sub_cat == "any" or THING_INFO[subject][1] == sub_cat
  obj_ok = objects == ("any",) or obj in objects
  return sub_ok and obj_ok and subject != obj


def _layout(rng: np.random.Generator, kind: str) -> list[tuple[float, float, float, float]]:
  """Two boxes (subject, object) whose geometry shows the relation."""
  def box(cx, cy, w, h):
    return (float(np.clip(cx - w / 2, 0, 1)), float(np.clip(cy - h / 2, 0, 1)),
            float(np.clip(cx + w / 2, 0, 1)), float(np.clip(cy + h / 2, 0, 1)))
  cx = rng.uniform(0.35, 0.65)
  if kind == "on":       # the subject sits over the upper part of the object
    w, h = rng.uniform(0.25, 0.45), rng.uniform(0.35, 0.55)
    return [box(cx, 0.35, w * 0.8, h), box(cx, 0.65, w, h * 0.8)]
  if kind == "holds":    # a small object inside the subject's box
    w, h = rng.uniform(0.25, 0.4), rng.uniform(0.5, 0.8)
    return [box(cx, 0.5, w, h), box(cx + rng.uniform(-0.1, 0.1), 0.55, w * 0.4, h * 0.3)]
  if kind == "above":
    return [box(cx, 0.7, 0.25, 0.5), box(cx + rng.uniform(-0.2, 0.2), 0.15, 0.15, 0.15)]
  if kind in ("behind", "front"):  # overlapping; the one in front is larger and lower
    small, large = box(cx - 0.05, 0.45, 0.25, 0.35), box(cx + 0.08, 0.6, 0.4, 0.55)
    return [small, large] if kind == "behind" else [large, small]
  left = rng.uniform() < 0.5       # beside: side by side
  a, b = box(0.3, 0.55, 0.3, 0.5), box(0.7, 0.55, 0.3, 0.5)
  return [a, b] if left else [b, a]


def _attribute(rng: np.random.Generator, cls: str) -> tuple[str | None, str | None]:
  kind = THING_INFO[cls][4]
  if kind == "person":
    return str(rng.choice(PERSON_ATTRS)), f"{rng.choice(COLOURS)} {rng.choice(CLOTHES)}"
  if kind == "animal":
    return str(rng.choice(ANIMAL_COLOURS)), None
  if kind == "colour":
    return str(rng.choice(COLOURS)), None
  if kind == "material":
    return str(rng.choice(MATERIALS)), None
  return None, None


def random_scene(rng: np.random.Generator) -> Scene:
  setting = int(rng.integers(len(SETTINGS)))
  fits = SETTINGS[setting][3]
  n = int(rng.choice([1, 2, 2, 3]))
  first = str(rng.choice(fits))
  things = [first]
  relation = None
  if n >= 2:
    options = [(r, o) for r in RELATIONS for o in fits if _fits(r, first, o)]
    rel, second = options[int(rng.integers(len(options)))]
    things.append(second)
    relation = (0, rel[2], 1)
    boxes = _layout(rng, rel[3])
  else:
    cx, cy = rng.uniform(0.3, 0.7, 2)
    w, h = rng.uniform(0.3, 0.6, 2)
    boxes = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
  if n == 3:
    extra = [t for t in fits if t not in things]
    things.append(str(rng.choice(extra)))
    cx, cy = rng.choice([0.15, 0.85]), rng.uniform(0.3, 0.7)
    boxes.append((cx - 0.12, cy - 0.15, cx + 0.12, cy + 0.15))
  count = 2 if (n == 1 and rng.uniform() < 0.25) else 1
  out = []
  for cls, b in zip(things, boxes):
    attr, clothes = _attribute(rng, cls)
    b = tuple(float(np.clip(v, 0.0, 1.0)) for v in b)
    out.append(Thing(cls, attr, clothes, b))
  return Scene(setting, out, relation, count)


# ------------------------------------------------------------------------------------------------
# Captions.
# ------------------------------------------------------------------------------------------------
NUMBERS = {2: "two", 3: "three"}


def _noun_phrase(rng: np.random.Generator, thing: Thing, count: int = 1,
                 attr_prob: float = 0.55) -> str:
  info = THING_INFO[thing.cls]
  noun = str(rng.choice(info[2]))
  if count > 1:
    noun = info[3]
  words = []
  if thing.attr and rng.uniform() < attr_prob:
    words.append(thing.attr)
  words.append(noun)
  phrase = " ".join(words)
  if thing.clothes and rng.uniform() < 0.5:
    phrase += f" in a {thing.clothes}"
  if count > 1:
    return f"{NUMBERS.get(count, 'some')} {phrase}"
  return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _verb(rng: np.random.Generator, thing: Thing) -> str:
  cat = THING_INFO[thing.cls][1]
  choices = {"person": ("standing", "smiling", "posing", "walking", "looking around"),
             "animal": ("standing", "sitting", "walking", "looking at the camera", "resting"),
             "vehicle": ("parked", "driving", "waiting"),
             "furniture": ("", "standing"), "object": ("", "lying around"), "food": ("",
                                                                                     "served")}
  return str(rng.choice(choices.get(cat, ("",))))


# Where one thing is relative to another, as the boxes show it (image coordinates, y downwards):
# the phrase for box a against box b when their centres are clearly apart along one axis.
SPATIAL_PHRASES = ("to the left of", "to the right of", "above", "below")
SPATIAL_MIN_OFFSET = 0.2  # of the image's width or height, between the boxes' centres


def spatial_phrase(a: tuple[float, ...], b: tuple[float, ...]) -> str | None:
  """"to the left of", "to the right of", "above" or "below" for box a (x1, y1, x2, y2,
  normalised) against box b, along the axis where their centres are further apart, when that
  offset is at least SPATIAL_MIN_OFFSET; None when the boxes do not show it clearly."""
  dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  if abs(dx) >= abs(dy):
    if abs(dx) >= SPATIAL_MIN_OFFSET:
      return "to the left of" if dx < 0 else "to the right of"
  elif abs(dy) >= SPATIAL_MIN_OFFSET:
    return "above" if dy < 0 else "below"
  return None


def _thing_box(scene: Scene, index: int) -> tuple[float, ...] | None:
  """The box of a thing when it is one instance ("two dogs" have two boxes: no one place)."""
  return None if (index == 0 and scene.count > 1) else scene.things[index].box


def _where(scene: Scene, a: int, b: int) -> str | None:
  box_a, box_b = _thing_box(scene, a), _thing_box(scene, b)
  return spatial_phrase(box_a, box_b) if box_a and box_b else None


# How often an annotator says where things are rather than what they do (Flickr30k's captions
# use "left", "right", "above" and "below" now and then).
SPATIAL_SHARE = 0.25


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
  """`n` captions, as different annotators would write them."""
  setting_phrases = SETTINGS[scene.setting][1]
  out = []
  for _ in range(n):
    openers = ("", "", "", "a photo of ", "there is ", "a picture of ")
    opener = str(rng.choice(openers))
    subject = scene.things[0]
    parts = [_noun_phrase(rng, subject, scene.count)]
    if scene.relation is not None and rng.uniform() < 0.8:
      _, verb, obj = scene.relation
      where = _where(scene, 0, obj)
      parts.append(where if where and rng.uniform() < SPATIAL_SHARE else verb)
      parts.append(_noun_phrase(rng, scene.things[obj]))
    else:
      parts.append(_verb(rng, subject))
    if len(scene.things) > 2 and rng.uniform() < 0.5:
      where = _where(scene, 2, 0)
      if where and rng.uniform() < SPATIAL_SHARE:
        parts += ["and", _noun_phrase(rng, scene.things[2]), where, "it"]
      else:
        parts.append(str(rng.choice(("and", "with", "near"))))
        parts.append(_noun_phrase(rng, scene.things[2]))
    if rng.uniform() < 0.65:
      parts.append(str(rng.choice(setting_phrases)))
    text = opener + " ".join(p for p in parts if p)
    if opener == "there is " and scene.count > 1:
      text = "there are " + text[len("there is "):]
    out.append(text + (" ." if rng.uniform() < 0.3 else ""))
  return out


# ------------------------------------------------------------------------------------------------
# Web captions: alt-text as Conceptual Captions and SBU have it.
# ------------------------------------------------------------------------------------------------
# Words a web caption wraps around what it shows (alt-text, photo titles, user captions).
WEB_BEFORE = ("stock photo of", "photo of", "image of", "close up of", "view of", "my", "our",
              "cute", "beautiful", "funny", "happy", "portrait of", "picture of")
WEB_AFTER = ("stock photo", "on a sunny day", "in summer", "in winter", "on vacation", "today",
             "at sunset", "in the morning", "last weekend", "with friends", "for sale",
             "free image", "wallpaper", "in 2014", "in 2016", "via flickr", "#travel",
             "#nature", "#love")
# The hypernyms alt-text uses for what a curated caption names (Conceptual Captions replaces
# names by hypernyms: "actor", "person").
HYPERNYMS = {"person": "person", "animal": "animal", "vehicle": "vehicle",
             "furniture": "furniture", "object": "object", "food": "food"}
# A web caption that is about another picture altogether (a share of alt-text is).
WEB_MISMATCH_SHARE = 0.1


def describe_web(scene: Scene, rng: np.random.Generator) -> str:
  """One web caption: partial (mostly the main thing, attributes and relations less often than
  annotators give them, hypernyms), wrapped in words about anything but the picture, and in
  WEB_MISMATCH_SHARE of the images about another scene altogether."""
  if rng.uniform() < WEB_MISMATCH_SHARE:
    scene = random_scene(rng)
  subject = scene.things[0]
  info = THING_INFO[subject.cls]
  if scene.count == 1 and rng.uniform() < 0.25:
    phrase = f"{'an' if info[1][0] in 'aeiou' else 'a'} {HYPERNYMS[info[1]]}"
  else:
    phrase = _noun_phrase(rng, subject, scene.count, attr_prob=0.3)
  parts = [phrase]
  if scene.relation is not None and rng.uniform() < 0.35:
    _, verb, obj = scene.relation
    where = _where(scene, 0, obj)
    parts += [where if where and rng.uniform() < 0.1 else verb,
              _noun_phrase(rng, scene.things[obj], attr_prob=0.3)]
  elif rng.uniform() < 0.4:
    parts.append(_verb(rng, subject))
  if rng.uniform() < 0.5:
    parts.append(str(rng.choice(SETTINGS[scene.setting][1])))
  if rng.uniform() < 0.4:
    before = str(rng.choice(WEB_BEFORE))
    if not before.endswith(" of"):  # "my dog", "cute dog": no article after it
      parts[0] = parts[0].split(" ", 1)[1] if parts[0].split(" ", 1)[0] in ("a", "an") else \
          parts[0]
    parts.insert(0, before)
  if rng.uniform() < 0.4:
    parts.append(str(rng.choice(WEB_AFTER)))
  return " ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# Binding tests: captions a bag of words cannot tell from their foil, and the regions can.
# ------------------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
  return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def binding_items(scene: Scene, rng: np.random.Generator) -> list[dict]:
  """At most one test of each kind for a scene, each a true caption and a foil of the same words
  (in the manner of Winoground and ARO's VG-Attribution / VG-Relation):

    attribute  two things whose attributes are of one kind (two colours, two ages, ...) and
               differ, their attributes swapped: "a red car and a white bus" / "a white car and a
               red bus". The two things have different names, and the words are joined by the
               scene's relation when it holds between them in that order, else by "and".
    relation   two things of different names whose boxes show where one is against the other
               (spatial_phrase), the things swapped: "a dog to the left of a car" / "a car to
               the left of a dog". Only spatial phrases: both orders are plausible, so only the
               boxes decide.
  Returns [{"kind", "true_caption", "false_caption"}].
  """
  things = scene.things
  n = len(things)
  nouns = [THING_INFO[t.cls][2][0] for t in things]
  out = []
  pairs = [(i, j) for i in range(n) for j in range(n) if i < j and nouns[i] != nouns[j]
           and not (scene.count > 1 and 0 in (i, j))]
  attribute = [(i, j) for i, j in pairs
               if things[i].attr and things[j].attr and things[i].attr != things[j].attr
               and THING_INFO[things[i].cls][4] == THING_INFO[things[j].cls][4]]
  if attribute:
    i, j = attribute[int(rng.integers(len(attribute)))]
    link = "and"
    if scene.relation is not None and scene.relation[0] == i and scene.relation[2] == j:
      link = scene.relation[1]
    a, b = things[i].attr, things[j].attr
    true = f"{_article(f'{a} {nouns[i]}')} {link} {_article(f'{b} {nouns[j]}')}"
    false = f"{_article(f'{b} {nouns[i]}')} {link} {_article(f'{a} {nouns[j]}')}"
    out.append({"kind": "attribute", "true_caption": true, "false_caption": false})
  relation = [(i, j, _where(scene, i, j)) for i, j in pairs]
  relation = [r for r in relation if r[2]]
  if relation:
    i, j, where = relation[int(rng.integers(len(relation)))]
    if rng.uniform() < 0.5:  # either thing may come first
      i, j, where = j, i, _where(scene, j, i)
    out.append({"kind": "relation",
                "true_caption": f"{_article(nouns[i])} {where} {_article(nouns[j])}",
                "false_caption": f"{_article(nouns[j])} {where} {_article(nouns[i])}"})
  return out


def vocabulary() -> list[str]:
  """Every word the captions and class names use."""
  words = set()
  for t in THINGS:
    words.update(t[2])
    words.add(t[3])
  for s in SETTINGS:
    for p in s[1]:
      words.update(p.split())
  for rel in RELATIONS:
    words.update(rel[2].split())
  words.update(COLOURS + ANIMAL_COLOURS + MATERIALS + PERSON_ATTRS + CLOTHES)
  words.update(("a", "an", "the", "of", "photo", "picture", "there", "is", "are", "in", "and",
                "with", "near", "two", "three", "some", "standing", "smiling", "posing",
                "walking", "looking", "around", "at", "camera", "sitting", "resting", "parked",
                "driving", "waiting", "lying", ".", "served", "it"))
  for phrase in SPATIAL_PHRASES + WEB_BEFORE + WEB_AFTER + tuple(HYPERNYMS.values()):
    words.update(phrase.split())
  for name in class_names():
    words.update(name.split())
  return sorted(words)


# ------------------------------------------------------------------------------------------------
# Regions and features.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RealisticSpec:
  seed: int = 0
  feature_dim: int = 2048
  latent_dim: int = 96
  min_regions: int = 10
  max_regions: int = 100
  captions_per_image: int = 5


class Detector:
  """A simulated bottom-up-attention detector: boxes, labels, confidences and features."""

  def __init__(self, spec: RealisticSpec):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 104729])
    k = spec.latent_dim
    self.classes = class_names()
    self.class_index = {c: i for i, c in enumerate(self.classes)}
    self.attributes = attribute_names()
    self.attr_index = {a: i for i, a in enumerate(self.attributes)}
    supers = {s: rng.normal(size=k) for s in SUPER_CATEGORIES}
    self.super_of = {t[0]: t[1] for t in THINGS}
    self.super_of.update({p[0]: "part" for p in PARTS})
    self.super_of.update({s: "stuff" for s in STUFF})
    # A class: its super-category's direction plus its own, of similar size.
    self.class_latent = np.stack([0.8 * supers[self.super_of[c]] + rng.normal(size=k)
                                  for c in self.classes]).astype(np.float32)
    self.attr_latent = 0.7 * rng.normal(size=(len(self.attributes), k)).astype(np.float32)
    # The read-out: a random layer and ReLU, then average pooling over a few "positions" (which
    # makes values dense-ish but leaves many exact zeros), and a per-dimension gain.
    d = spec.feature_dim
    self.readout = (rng.normal(size=(k, d)) / np.sqrt(k)).astype(np.float32)
    self.bias = rng.normal(loc=-0.9, scale=0.5, size=d).astype(np.float32)
    self.gain = np.exp(rng.normal(scale=0.8, size=d)).astype(np.float32)
    self.same_super = {}
    for c in self.classes:
      self.same_super[c] = [o for o in self.classes
                            if self.super_of[o] == self.super_of[c] and o != c]

  # -- features ---------------------------------------------------------------------------------
  def features(self, rng: np.random.Generator, latents: np.ndarray, clarity: np.ndarray,
               style: np.ndarray) -> np.ndarray:
    """[n, D] features from [n, k] semantic latents; `clarity` in (0, 1] per region."""
    n, k = latents.shape
    noise = rng.normal(size=(n, k)).astype(np.float32)
    z = clarity[:, None] * latents + (1.3 - clarity[:, None]) * noise + 0.6 * style[None]
    # Four "spatial positions" with their own small variation, pooled after the ReLU.
    pooled = np.zeros((n, self.spec.feature_dim), np.float32)
    for _ in range(4):
      zp = z + 0.35 * rng.normal(size=(n, k)).astype(np.float32)
      pooled += np.maximum(zp @ self.readout + self.bias, 0.0)
    return (pooled / 4.0) * self.gain

  def label(self, rng: np.random.Generator, cls: str, conf: float) -> str:
    """The detector's top class: right with a probability that grows with confidence."""
    u = rng.uniform()
    right = 0.45 + 0.5 * conf
    if u < right:
      return cls
    if u < right + 0.6 * (1 - right) and self.same_super[cls]:
      return str(rng.choice(self.same_super[cls]))
    return str(rng.choice(self.classes))

  def detect(self, scene: Scene, rng: np.random.Generator) -> dict:
    """The detector's output for a scene: boxes (normalised), classes, confidences, features."""
    spec = self.spec
    k = spec.latent_dim
    regions = []  # (box, class, attribute or None, clarity, confidence, latent)

    def latent(cls, attr=None, host=None):
      v = self.class_latent[self.class_index[cls]].copy()
      if attr is not None and attr in self.attr_index:
        v += self.attr_latent[self.attr_index[attr]]
      if host is not None:  # a part looks a little like what it is part of
        v += 0.35 * self.class_latent[self.class_index[host]]
      return v

    def jitter(box, amount):
      x1, y1, x2, y2 = box
      w, h = x2 - x1, y2 - y1
      d = rng.normal(scale=amount, size=4) * np.array([w, h, w, h])
      b = np.clip(np.array(box) + d, 0.0, 1.0)
      b[2], b[3] = max(b[2], b[0] + 0.02), max(b[3], b[1] + 0.02)
      return tuple(float(v) for v in np.clip(b, 0.0, 1.0))

    for idx, thing in enumerate(scene.things):
      instances = [thing.box]
      if idx == 0 and scene.count > 1:
        shift = 0.25 if thing.box[0] < 0.5 else -0.25
        instances.append(tuple(float(np.clip(v + (shift if i % 2 == 0 else 0.0), 0, 1))
                               for i, v in enumerate(thing.box)))
      attr = thing.attr
      for box in instances:
        area = (box[2] - box[0]) * (box[3] - box[1])
        conf = float(np.clip(rng.uniform(0.55, 0.99) * (0.8 + 0.4 * min(area * 4, 1.0)), 0, 0.999))
        regions.append((jitter(box, 0.03), thing.cls, attr, rng.uniform(0.6, 0.9), conf,
                        latent(thing.cls, attr)))
        for _ in range(int(rng.integers(0, 3))):  # near-duplicates NMS let through
          regions.append((jitter(box, 0.15), thing.cls, attr, rng.uniform(0.35, 0.7),
                          conf * rng.uniform(0.3, 0.8), latent(thing.cls, attr)))
        parts = [p[0] for p in PARTS if self.super_of[thing.cls] in p[1]]
        for part in rng.choice(parts, size=min(len(parts), int(rng.integers(1, 5))),
                               replace=False):
          x1, y1, x2, y2 = box
          w, h = x2 - x1, y2 - y1
          px, py = x1 + rng.uniform(0.1, 0.9) * w, y1 + rng.uniform(0.1, 0.9) * h
          pw, ph = w * rng.uniform(0.15, 0.45), h * rng.uniform(0.15, 0.45)
          pbox = jitter((px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2), 0.05)
          part_attr = None
          if thing.clothes and part in ("shirt", "jacket", "hat"):
            part_attr = thing.clothes.split()[0]
          regions.append((pbox, str(part), part_attr, rng.uniform(0.3, 0.65),
                          rng.uniform(0.2, 0.75), latent(str(part), part_attr, thing.cls)))
    setting = SETTINGS[scene.setting]
    for stuff in rng.choice(setting[2], size=int(rng.integers(2, len(setting[2]) + 1)),
                            replace=False):
      cx, cy = rng.uniform(0.2, 0.8), (rng.uniform(0.05, 0.35) if stuff in ("sky", "cloud")
                                       else rng.uniform(0.3, 0.95))
      w, h = rng.uniform(0.3, 1.0), rng.uniform(0.15, 0.5)
      box = jitter((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 0.02)
      regions.append((box, str(stuff), None, rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.8),
                      latent(str(stuff))))
    # Clutter: as many small, unconfident regions of anything as it takes.
    total = int(np.clip(rng.lognormal(np.log(36), 0.5), spec.min_regions, spec.max_regions))
    total = max(total, len(regions) + 2, spec.min_regions)
    total = min(total, spec.max_regions)
    clutter_classes = list(STUFF) + [p[0] for p in PARTS] + [t[0] for t in THINGS]
    while len(regions) < total:
      cls = str(rng.choice(clutter_classes))
      cx, cy = rng.uniform(0.05, 0.95, 2)
      w, h = rng.uniform(0.03, 0.2, 2)
      box = jitter((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 0.02)
      attr = str(rng.choice(self.attributes)) if rng.uniform() < 0.3 else None
      regions.append((box, cls, attr, rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.55),
                      latent(cls, attr)))
    regions = regions[:spec.max_regions]
    order = rng.permutation(len(regions))
    regions = [regions[i] for i in order]
    n = len(regions)
    style = rng.normal(size=k).astype(np.float32)
    latents = np.stack([r[5] for r in regions]).astype(np.float32)
    clarity = np.asarray([r[3] for r in regions], np.float32)
    feats = self.features(rng, latents, clarity, style)
    confs = np.asarray([r[4] for r in regions], np.float32)
    labels = [self.label(rng, r[1], float(c)) for r, c in zip(regions, confs)]
    attrs = [self.attr_index[r[2]] if r[2] in self.attr_index else
             int(rng.integers(len(self.attributes))) for r in regions]
    return {
        "boxes": np.asarray([r[0] for r in regions], np.float32).reshape(n, 4),
        "object_id": np.asarray([self.class_index[c] for c in labels], np.int64),
        "object_conf": confs,
        "attr_id": np.asarray(attrs, np.int64),
        "attr_conf": rng.uniform(0.1, 0.9, n).astype(np.float32),
        "features": feats.astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------
# Writing the public formats.
# ------------------------------------------------------------------------------------------------
def _b64(a: np.ndarray, dtype) -> str:
  return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def tsv_line(image_id: str, width: int, height: int, det: dict) -> str:
  """One line of the detectron2 layout (img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features), boxes in pixels."""
  boxes = det["boxes"] * np.array([width, height, width, height], np.float32)
  return "\t".join([
      image_id, str(height), str(width), _b64(det["object_id"], np.int64),
      _b64(det["object_conf"], np.float32), _b64(det["attr_id"], np.int64),
      _b64(det["attr_conf"], np.float32), str(len(boxes)), _b64(boxes, np.float32),
      _b64(det["features"], np.float32)])


def write_vocab_file(path: str) -> None:
  from imagebert_jax.data.tokenizer import write_vocab
  write_vocab(path, vocabulary())


WEB_SEED_INDEX = 1000  # the web images' seed stream, apart from every curated split's


def generate(out_dir: str, splits: dict[str, int], spec: RealisticSpec = RealisticSpec(),
             images_per_file: int = 250, web_images: int = 0) -> dict[str, str]:
  """Writes the curated splits, `features/*.tsv` and `dataset_scenes.json` (a Karpathy split
  file, `spec.captions_per_image` annotator captions per image), `vocab.txt`, and for each split
  but 'train' its binding tests, `binding_<split>.jsonl` (one JSON object per line: image_id,
  kind, true_caption, false_caption; `binding_items`). With `web_images`, also a web set of other
  images of the same world, as Conceptual Captions is distributed: `web/captions.tsv` (one alt-text
  caption and a URL per line, the image id being the line's index) and `web/features/*.tsv`.

  Deterministic for a spec; each split draws its scenes from its own seed, so a split's images do
  not depend on the other splits' sizes. Returns the paths ({"features", "captions", "vocab",
  "binding_<split>"..., and "web_features", "web_captions" with a web set}). Does nothing when a
  finished generation with the same settings is there.
  """
  paths = {"features": os.path.join(out_dir, "features"),
           "captions": os.path.join(out_dir, "dataset_scenes.json"),
           "vocab": os.path.join(out_dir, "vocab.txt")}
  for split in splits:
    if split != "train":
      paths[f"binding_{split}"] = os.path.join(out_dir, f"binding_{split}.jsonl")
  if web_images:
    paths["web_features"] = os.path.join(out_dir, "web", "features")
    paths["web_captions"] = os.path.join(out_dir, "web", "captions.tsv")
  marker = os.path.join(out_dir, "GENERATED.json")
  wanted = {"spec": dataclasses.asdict(spec), "splits": dict(splits),
            "images_per_file": images_per_file, "web_images": web_images, "version": 2}
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == wanted:
        logging.info("Realistic scenes already generated in %s", out_dir)
        return paths
    os.remove(marker)
  detector = Detector(spec)
  images = []
  next_id = 1_000_000 + 7 * spec.seed
  with _TsvFiles(paths["features"], "scenes", images_per_file) as tsv:
    for s_index, (split, count) in enumerate(splits.items()):
      rng = np.random.default_rng([spec.seed, s_index, 31])          # scenes and regions
      caption_rng = np.random.default_rng([spec.seed, s_index, 37])  # what annotators write
      binding_rng = np.random.default_rng([spec.seed, s_index, 41])
      binding = []
      for _ in range(count):
        scene = random_scene(rng)
        width, height = _image_size(rng)
        image_id = str(next_id)
        next_id += 1 + int(rng.integers(50))
        tsv.write(tsv_line(image_id, width, height, detector.detect(scene, rng)))
        sentences = describe(scene, caption_rng, spec.captions_per_image)
        images.append({"filename": f"{image_id}.jpg", "imgid": len(images), "split": split,
                       "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]})
        binding += [{"image_id": image_id, **item} for item in binding_items(scene, binding_rng)]
      if split != "train":
        _write_jsonl(paths[f"binding_{split}"], binding)
  with open(paths["captions"], "w") as f:
    json.dump({"images": images, "dataset": "scenes"}, f)
  if web_images:
    rng = np.random.default_rng([spec.seed, WEB_SEED_INDEX, 31])
    caption_rng = np.random.default_rng([spec.seed, WEB_SEED_INDEX, 37])
    with _TsvFiles(paths["web_features"], "web", images_per_file) as tsv, \
        open(paths["web_captions"], "w") as captions:
      for line in range(web_images):
        scene = random_scene(rng)
        width, height = _image_size(rng)
        tsv.write(tsv_line(str(line), width, height, detector.detect(scene, rng)))
        captions.write(f"{describe_web(scene, caption_rng)}\thttps://images.invalid/{line}.jpg\n")
  write_vocab_file(paths["vocab"])
  with open(paths["captions"] + ".classes.json", "w") as f:
    json.dump({"classes": detector.classes, "attributes": detector.attributes}, f)
  with open(marker, "w") as f:
    json.dump(wanted, f)
  return paths


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
  """(width, height) of a Flickr-sized photo, landscape more often than portrait."""
  if rng.uniform() < 0.6:
    return 500, int(rng.choice([333, 375, 400]))
  return int(rng.choice([333, 375, 400])), 500


class _TsvFiles:
  """TSV lines into `<folder>/<prefix>_000.tsv`, `_001`, ... of `per_file` lines each (the folder
  emptied first)."""

  def __init__(self, folder: str, prefix: str, per_file: int):
    self.folder, self.prefix, self.per_file = folder, prefix, per_file
    self.index, self.in_file, self.out = 0, 0, None

  def __enter__(self):
    os.makedirs(self.folder, exist_ok=True)
    for old in os.listdir(self.folder):
      os.remove(os.path.join(self.folder, old))
    return self

  def write(self, line: str) -> None:
    if self.out is None or self.in_file == self.per_file:
      if self.out is not None:
        self.out.close()
      self.out = open(os.path.join(self.folder, f"{self.prefix}_{self.index:03d}.tsv"), "w")
      self.index, self.in_file = self.index + 1, 0
    self.out.write(line + "\n")
    self.in_file += 1

  def __exit__(self, *exc):
    if self.out is not None:
      self.out.close()


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def build(data_dir: str, source_dir: str, splits: dict[str, int], spec: RealisticSpec,
          *, max_text_len: int, max_boxes: int = 100, vocab_file: str = "",
          name: str = "scenes", web_images: int = 0, web: bool = False) -> str:
  """Generates the source files (`generate`) and builds them into a dataset with the regular
  builder, exactly as `python -m imagebert_jax.data.build` does: the curated splits (a Karpathy
  split file; the binding tests of each evaluation split are copied beside the records as
  `binding_<split>.jsonl`, where the evaluation finds them), or with `web` the web set (the
  Conceptual Captions format, one split named 'web'). Returns the vocabulary file the dataset
  uses. Nothing is done when that build is there already."""
  from imagebert_jax.data import build as build_lib, records
  paths = generate(source_dir, splits, spec, web_images=web_images)
  vocab = vocab_file or paths["vocab"]
  wanted = {"source": source_dir, "vocab": vocab, "max_text_len": max_text_len,
            "max_boxes": max_boxes, "generated": dataclasses.asdict(spec), "splits": splits,
            "web_images": web_images, "web": web}
  try:
    if records.read_info(data_dir).get("realistic") == json.loads(json.dumps(wanted)):
      logging.info("Realistic dataset already built in %s", data_dir)
      return vocab
  except FileNotFoundError:
    pass
  if web and not web_images:
    raise ValueError("a web set needs web_images > 0")
  source = dict(regions=[paths["web_features"]], captions=[paths["web_captions"]],
                caption_source="cc", split="web") if web else \
      dict(regions=[paths["features"]], captions=[paths["captions"]], caption_source="karpathy")
  build_lib.build_dataset(build_lib.BuildSpec(
      name=name, out_dir=data_dir, vocab_file=vocab, max_text_len=max_text_len,
      feature_dim=spec.feature_dim, min_boxes=spec.min_regions, max_boxes=max_boxes,
      extra_info={"realistic": wanted, "class_names": class_names(),
                  "attribute_names": attribute_names()}, **source))
  if not web:
    from imagebert_jax import paths as paths_lib
    for key, path in paths.items():
      if key.startswith("binding_"):
        with open(path, "rb") as f:
          paths_lib.write_bytes(paths_lib.join(data_dir, os.path.basename(path)), f.read())
  return vocab


def parse_splits(text: str) -> dict[str, int]:
  out = {}
  for part in text.split(","):
    name, _, count = part.partition("=")
    if not name.strip() or not count.strip().isdigit():
      raise ValueError(f"--images {text!r}: want name=count,... (e.g. train=1000,val=50,test=100)")
    out[name.strip()] = int(count)
  return out


def main(argv: Iterable[str] | None = None) -> None:
  """`python -m imagebert_jax.data.realistic` (argv without the program; None: sys.argv's),
  with imagebert_jax.cli's convention."""
  import sys

  from absl import flags

  from imagebert_jax import cli
  prog = "python -m imagebert_jax.data.realistic"
  f = cli.new_flags(verbosity=False)
  d = dict(flag_values=f)
  flags.DEFINE_string("out_dir", None, "Folder for features/, dataset_scenes.json, vocab.txt.",
                      **d)
  flags.DEFINE_string("images", "train=1000,val=50,test=100", "Images per split.", **d)
  flags.DEFINE_integer("seed", 0, "Seed of the world (classes, features) and of the scenes.", **d)
  flags.DEFINE_integer("feature_dim", 2048, "Region feature dimension.", **d)
  flags.DEFINE_integer("max_regions", 100, "Most regions per image.", **d)
  flags.DEFINE_integer("web_images", 0, "Images of a web set beside the splits (web/: alt-text "
                       "captions in the Conceptual Captions format).", **d)
  flags.mark_flags_as_required(["out_dir"], flag_values=f)
  cli.parse_flags(f, [prog, *(sys.argv[1:] if argv is None else argv)], prog=prog,
                  about=__doc__.split("\n\n")[0])
  try:
    splits = parse_splits(f.images)
  except ValueError as e:
    cli.refuse(prog, str(e))
  paths = generate(f.out_dir, splits, RealisticSpec(seed=f.seed, feature_dim=f.feature_dim,
                                                    max_regions=f.max_regions),
                   web_images=f.web_images)
  print(json.dumps(paths, indent=1))


if __name__ == "__main__":
  main()
