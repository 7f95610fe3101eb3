"""Image loading and the detector's input transform (NumPy + Pillow, outside jit).

As the detectron2 port of bottom-up-attention at test time: resize with the shortest-edge rule
(shorter side `min_size`, longer side at most `max_size`, sizes rounded half up) by Pillow's
bilinear filter, channels in BGR order, minus the BGR pixel mean (std 1). The result is placed at
the top-left of a fixed canvas (landscape or portrait) padded with zeros, so that the jitted
detector compiles once per canvas.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps

from imagebert_jax import paths
from imagebert_jax.detector.config import DetectorConfig


@dataclasses.dataclass
class PreparedImage:
  canvas: np.ndarray  # [Hc, Wc, 3] float32
  resized_hw: tuple[int, int]  # (h, w) of the image inside the canvas
  original_hw: tuple[int, int]  # (h, w) of the decoded image

  @property
  def scale_xy(self) -> tuple[float, float]:
    """Factors from resized-image pixels back to original pixels."""
    return (self.original_hw[1] / self.resized_hw[1], self.original_hw[0] / self.resized_hw[0])


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to RGB uint8 [H, W, 3] (EXIF orientation applied); raises on failure."""
  with Image.open(io.BytesIO(paths.read_bytes(path)) if paths.is_url(path) else path) as img:
    img.load()
    img = ImageOps.exif_transpose(img)
    rgb = np.asarray(img.convert("RGB"))
  if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise ValueError(f"{path}: decoded to an empty image")
  return rgb


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
  """detectron2's ResizeShortestEdge output size (h, w) for one test scale."""
  scale = min_size / min(height, width)
  if height < width:
    new_h, new_w = float(min_size), scale * width
  else:
    new_h, new_w = scale * height, float(min_size)
  if max(new_h, new_w) > max_size:
    shrink = max_size / max(new_h, new_w)
    new_h, new_w = new_h * shrink, new_w * shrink
  return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def canvas_for(cfg: DetectorConfig, resized_hw: tuple[int, int]) -> tuple[int, int]:
  """The canvas (h, w) an image of this resized size goes into."""
  for hw in cfg.canvases:
    if resized_hw[0] <= hw[0] and resized_hw[1] <= hw[1]:
      return hw
  raise ValueError(f"resized image {resized_hw} fits no canvas {cfg.canvases}")


def prepare_image(rgb: np.ndarray, cfg: DetectorConfig) -> PreparedImage:
  """Resizes, converts to BGR minus the mean and pads an RGB uint8 image to its canvas."""
  h, w = rgb.shape[:2]
  new_h, new_w = resized_size(h, w, cfg.min_size, cfg.max_size)
  if (new_h, new_w) != (h, w):
    rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
  bgr = rgb[:, :, ::-1].astype(np.float32) - np.asarray(cfg.pixel_mean_bgr, np.float32)
  ch, cw = canvas_for(cfg, (new_h, new_w))
  canvas = np.zeros((ch, cw, 3), np.float32)
  canvas[:new_h, :new_w] = bgr
  return PreparedImage(canvas=canvas, resized_hw=(new_h, new_w), original_hw=(h, w))


def to_original(boxes: np.ndarray, prepared: PreparedImage) -> np.ndarray:
  """Maps boxes [N, 4] from resized-image to original pixels (clipped to the image)."""
  sx, sy = prepared.scale_xy
  out = np.asarray(boxes, np.float32) * np.asarray([sx, sy, sx, sy], np.float32)
  h, w = prepared.original_hw
  out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
  out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
  return out
