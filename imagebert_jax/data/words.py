"""The words that name what the detector sees: its object and attribute names and the spatial
words, as token ids of a stage's vocabulary (for visual-word masking, foils and word grounding)."""

from __future__ import annotations

import dataclasses


# Words inside detector names that name nothing visual ("leg of table", "street light").
_NOT_VISUAL = frozenset(("of", "the", "a", "an", "in", "on", "and"))
# Where things are, which only the boxes tell: visual words whatever the detector's names.
SPATIAL_WORDS = ("left", "right", "above", "below", "under", "behind", "front", "top",
                 "bottom", "beside", "between", "inside", "outside")
# Spatial words whose opposite describes the mirror image (a spatial foil flips them).
SPATIAL_OPPOSITES = (("left", "right"), ("above", "below"), ("top", "bottom"))


@dataclasses.dataclass(frozen=True)
class DetectorWords:
  """Token ids of the words that name what the detector sees (`detector_words`)."""

  objects: tuple[int, ...] = ()     # its object names' tokens
  attributes: tuple[int, ...] = ()  # its attribute names' tokens
  spatial: tuple[int, ...] = ()     # SPATIAL_WORDS' tokens
  opposites: tuple[tuple[int, int], ...] = ()  # SPATIAL_OPPOSITES' token ids, one token each

  @property
  def visual(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.objects) | set(self.attributes) | set(self.spatial)))


def detector_words(data_dir: str, vocab: str) -> DetectorWords:
  """The tokens of the object and attribute names the datasets' summaries list (`class_names`,
  `attribute_names`: a detector's vocabularies, synonyms separated by commas) and of the spatial
  words (with SPATIAL_OPPOSITES' pairs where both are one token), WordPiece-tokenized with the
  stage's vocabulary, without function words, special and unknown tokens. Objects and
  attributes are each only the names of one token (a foil swaps whole words); no names at all
  gives no words."""
  from imagebert_jax.data import pipeline, records
  from imagebert_jax.data.tokenizer import Tokenizer
  names = {"class_names": [], "attribute_names": []}
  for d in pipeline.data_dirs(data_dir):
    info = records.read_info(d)
    for key in names:
      for line in info.get(key, []):
        names[key] += [n.strip() for n in str(line).split(",") if n.strip()]
  if not any(names.values()):
    return DetectorWords()
  tok = Tokenizer(vocab, max_len=16)
  ids = tok.ids
  ignore = {ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id}
  ignore |= {int(t) for w in _NOT_VISUAL for t in tok.encode(w)}

  def single(words):
    rows = tok.encode_batch(words) if words else []
    return tuple(sorted({int(r[1]) for r in rows if len(r) == 3} - ignore))  # [CLS] w [SEP]

  spatial = {int(t) for row in tok.encode_batch(list(SPATIAL_WORDS)) for t in row} - ignore
  pairs = [(single([a]), single([b])) for a, b in SPATIAL_OPPOSITES]
  opposites = tuple((ta[0], tb[0]) for ta, tb in pairs if ta and tb)
  return DetectorWords(single(names["class_names"]), single(names["attribute_names"]),
                       tuple(sorted(spatial)), opposites)
