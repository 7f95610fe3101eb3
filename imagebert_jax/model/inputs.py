"""What the model takes of a region's box, written once for every path that feeds the model: the
tf.data input pipeline (training and evaluation), the Python API and the search index. Imports
without TensorFlow."""

from __future__ import annotations

from typing import Any

import numpy as np


def region_locations(boxes: Any, image_w: Any, image_h: Any, xp: Any = np) -> Any:
  """The 5-d location of each box (the paper's): (x1/W, y1/H, x2/W, y2/H, box area / image
  area), clipped to [0, 1], float32 [..., 5]. `boxes` [..., 4] in pixels (x1, y1, x2, y2);
  `image_w` and `image_h` broadcast against boxes[..., 0]. `xp` is the array namespace: NumPy,
  or `tensorflow.experimental.numpy` inside the input pipeline."""
  boxes = xp.asarray(boxes, dtype=xp.float32)
  w = xp.asarray(image_w, dtype=xp.float32)
  h = xp.asarray(image_h, dtype=xp.float32)
  x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
  loc = xp.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) * (y2 - y1) / (w * h)], axis=-1)
  return xp.clip(loc, 0.0, 1.0)
