"""Boxes in pixels, x1 y1 x2 y2 (detectron2 conventions: width = x2 - x1, no "+1").

Everything here has static shapes, so it runs under jit: "removed" boxes are masked, not dropped.

NMS comes in two forms:

- `nms_topk`: greedy NMS that returns the first `max_out` survivors in score order. Each of its
  `max_out` steps picks the best remaining box and suppresses its overlaps (one IoU row), so it
  costs O(max_out x N) and no N x N matrix: this is the RPN's NMS (6000 boxes -> 300).
- `nms_mask`: the full greedy keep-mask of a score-sorted list, optionally per class. It builds the
  N x N "i suppresses j" matrix once (IoU > threshold, i before j, and for per-class NMS the same
  class: the same result as detectron2's batched_nms, which offsets each class's boxes so that
  boxes of different classes never overlap) and iterates keep[j] = not any(keep[i] and i
  suppresses j) to its fixed point. The fixed point of this triangular system is unique and equals
  the sequential greedy result; each iteration fixes at least the next undecided box, and in
  practice a handful of iterations suffice, each a parallel N x N step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def cell_anchors(sizes, ratios) -> np.ndarray:
  """Anchors [len(sizes) * len(ratios), 4] centred on 0, sizes outer and ratios (h / w) inner."""
  out = []
  for size in sizes:
    area = float(size) ** 2
    for ratio in ratios:
      w = math.sqrt(area / ratio)
      h = ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, np.float32)


def grid_anchors(height: int, width: int, stride: int, cells: np.ndarray) -> np.ndarray:
  """Anchors of a feature map, [height * width * A, 4] in (y, x, anchor) order, offset 0."""
  ys = np.arange(height, dtype=np.float32) * stride
  xs = np.arange(width, dtype=np.float32) * stride
  sy, sx = np.meshgrid(ys, xs, indexing="ij")
  shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
  return (shifts + cells[None]).reshape(-1, 4)


def decode_boxes(deltas: jax.Array, boxes: jax.Array, weights, scale_clamp: float) -> jax.Array:
  """Applies (dx, dy, dw, dh) deltas [..., 4] to boxes [..., 4] (broadcast), detectron2 style.

  dw and dh (after dividing by their weights) are clamped from above at `scale_clamp`.
  """
  wx, wy, ww, wh = weights
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  ctr_x = boxes[..., 0] + 0.5 * widths
  ctr_y = boxes[..., 1] + 0.5 * heights
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  px = dx * widths + ctr_x
  py = dy * heights + ctr_y
  pw = jnp.exp(dw) * widths
  ph = jnp.exp(dh) * heights
  return jnp.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], axis=-1)


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
  """Clips x to [0, width] and y to [0, height] (sizes may be traced scalars)."""
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlap_exceeds(a: jax.Array, b: jax.Array, iou_threshold: float) -> jax.Array:
  """IoU(a_i, b_j) > iou_threshold as [N, M], tested as inter > t * union (no division, so the
  decision is the same on every backend)."""
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return (union > 0) & (inter > iou_threshold * union)


def nms_topk(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float,
             max_out: int) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS; returns (indices [max_out], found [max_out]) of the survivors by score.

  A box is suppressed by a kept, higher-scoring box whose IoU with it is > iou_threshold. Slots past
  the last survivor have found = False (and index 0).
  """
  n = boxes.shape[0]
  positions = jnp.arange(n)

  def step(t, state):
    alive, out_idx, out_found = state
    i = jnp.argmax(jnp.where(alive, scores, -jnp.inf))
    found = alive[i]
    overlaps = _overlap_exceeds(boxes[i][None], boxes, iou_threshold)[0]
    alive = alive & ~overlaps & (positions != i)
    out_idx = out_idx.at[t].set(jnp.where(found, i, 0))
    out_found = out_found.at[t].set(found)
    return alive, out_idx, out_found

  init = (valid, jnp.zeros((max_out,), jnp.int32), jnp.zeros((max_out,), bool))
  _, idx, found = jax.lax.fori_loop(0, max_out, step, init)
  return idx, found


def nms_mask(boxes: jax.Array, valid: jax.Array, iou_threshold: float,
             classes: jax.Array | None = None) -> jax.Array:
  """Greedy NMS keep-mask [N] for boxes sorted by descending score (per class if given)."""
  n = boxes.shape[0]
  order = jnp.arange(n)
  suppresses = _overlap_exceeds(boxes, boxes, iou_threshold) & (order[:, None] < order[None, :])
  suppresses &= valid[:, None] & valid[None, :]
  if classes is not None:
    suppresses &= classes[:, None] == classes[None, :]

  def cond(state):
    _, changed, it = state
    return changed & (it <= n)

  def body(state):
    keep, _, it = state
    new = valid & ~jnp.any(suppresses & keep[:, None], axis=0)
    return new, jnp.any(new != keep), it + 1

  keep, _, _ = jax.lax.while_loop(cond, body, (valid, jnp.array(True), jnp.array(0)))
  return keep
