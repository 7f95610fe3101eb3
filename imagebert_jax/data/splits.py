"""A dataset split held in memory as NumPy arrays: what the evaluations, the validation during
fine-tuning and the Python API score (`Split`), and `load_split`, which reads one from a built
dataset through the input pipeline's own decoding (so the region locations and token ids are the
ones training sees)."""

from __future__ import annotations

import dataclasses

import numpy as np

from imagebert_jax.data import pipeline


@dataclasses.dataclass
class Split:
  """A whole evaluation split, host side."""

  region_feat: np.ndarray   # [N, R, D] float16
  region_loc: np.ndarray    # [N, R, 5]
  num_regions: np.ndarray   # [N]
  text_ids: np.ndarray      # [C, T]
  caption_image: np.ndarray  # [C] image index of each caption
  image_ids: list[str]
  source_order: np.ndarray  # [N] the order of the images in the caption source

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  @property
  def num_captions(self) -> int:
    return len(self.caption_image)


def load_split(data_dir: str, split: str, *, max_text_len: int, max_regions: int, pad_id: int,
               sep_id: int, max_images: int | None = None,
               captions_per_image: int = 0) -> Split:
  """Reads every record of a split (on every process: the devices then get replicated copies).

  `max_images`: only the first images of the split, in its stored order (a fixed subset).
  `captions_per_image` > 0: only each image's first captions, in the caption file's order (the
  Karpathy protocol's five; COCO has images with six or seven); 0 keeps them all.
  """
  import tensorflow_datasets as tfds
  cfg = pipeline.PipelineConfig(data_dir=data_dir, split=split, batch_size=1,
                                max_text_len=max_text_len, max_regions=max_regions,
                                pad_id=pad_id, sep_id=sep_id)
  builder, info = pipeline.open_dataset(data_dir)
  if split not in info["splits"]:
    raise ValueError(f"{data_dir}: no split {split!r}; it has {sorted(info['splits'])}")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"captions": tfds.decode.SkipDecoding()})
  if max_images:
    ds = ds.take(max_images)
  ds = ds.map(lambda ex: (pipeline._image_fields(ex, cfg, False), pipeline._caption_ids(ex, cfg),
                          ex["image_id"], ex.get("source_order", -1)))
  feats, locs, nregs, texts, owners, ids, orders = [], [], [], [], [], [], []
  for i, (image, text, image_id, source_order) in enumerate(tfds.as_numpy(ds)):
    feats.append(image["region_feat"])
    locs.append(image["region_loc"])
    nregs.append(image["num_regions"])
    if captions_per_image:
      text = text[:captions_per_image]
    texts.append(text)
    owners.append(np.full(len(text), i, np.int32))
    ids.append(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
    orders.append(int(source_order) if int(source_order) >= 0 else i)
  if not feats:
    raise ValueError(f"{data_dir}: split {split!r} is empty")
  return Split(np.stack(feats), np.stack(locs), np.asarray(nregs, np.int32),
               np.concatenate(texts).astype(np.int32), np.concatenate(owners), ids,
               np.argsort(np.asarray(orders), kind="stable"))
