"""RoI max pooling (the legacy Caffe / torchvision `roi_pool`), with static shapes.

Bins follow torchvision's kernel exactly: a box is scaled and rounded (half away from zero) to
feature cells, start..end inclusive (at least 1 x 1); bin p of P covers
[floor(p * size / P), ceil((p + 1) * size / P)) cells from the start (in float32 arithmetic, as the
kernel), clipped to the map; an empty bin gives 0.

A bin spans at most ceil(size / P) + 1 cells, so a small 2-D sparse table answers every bin's
maximum: table[a, b][y, x] = max of the 2^a x 2^b cells from (y, x). A bin of h x w cells is the
maximum of four (possibly overlapping) table entries with 2^a <= h, 2^b <= w at its corners. The
table is built once per image (a few copies of the feature map); each region then costs only
4 gathers per bin.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def max_bin_cells(feature_hw: tuple[int, int], output_size: int) -> int:
  """An upper bound on a bin's extent in cells, for boxes that lie within the feature map.

  A box of n cells has bins of at most ceil(n / P) + 1 cells (+1 for float32 rounding of the
  edges); a box within the map spans at most max(H, W) + 1 cells after rounding (+1 as margin).
  """
  longest = max(feature_hw) + 2
  return math.ceil(longest / output_size) + 2


def _round_half_away(x: jax.Array) -> jax.Array:
  """C's round(): halves away from zero (exact; jnp.round rounds halves to even)."""
  t = jnp.trunc(x)
  return t + jnp.sign(x) * (jnp.abs(x - t) >= 0.5)


def _bin_offsets(max_cells: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Bin start / end offsets [max_cells + 1, P] for every RoI extent, in float32 like the kernel.

  Computed on the host with NumPy (correctly rounded float32), because an accelerator's division
  may be approximate and move a bin edge by one cell.
  """
  n = np.arange(max_cells + 1, dtype=np.float32)[:, None]
  size = n / np.float32(output_size)
  p = np.arange(output_size, dtype=np.float32)[None]
  start = np.floor(p * size).astype(np.int32)
  end = np.ceil((p + np.float32(1)) * size).astype(np.int32)
  return start, end


def _sparse_table(feat: jax.Array, levels: int) -> jax.Array:
  """[levels, levels, H, W, C]: entry [a, b, y, x] = max of feat[y:y+2^a, x:x+2^b] (clipped)."""
  h, w, _ = feat.shape
  pad = 2 ** (levels - 1)
  padded = jnp.pad(feat, ((0, pad), (0, pad), (0, 0)), constant_values=-jnp.inf)
  rows = [padded]
  for a in range(1, levels):
    prev = rows[-1]
    s = 2 ** (a - 1)
    shifted = jnp.pad(prev[s:], ((0, s), (0, 0), (0, 0)), constant_values=-jnp.inf)
    rows.append(jnp.maximum(prev, shifted))
  table = []
  for row in rows:
    cols = [row]
    for b in range(1, levels):
      prev = cols[-1]
      s = 2 ** (b - 1)
      shifted = jnp.pad(prev[:, s:], ((0, 0), (0, s), (0, 0)), constant_values=-jnp.inf)
      cols.append(jnp.maximum(prev, shifted))
    table.append(jnp.stack([c[:h, :w] for c in cols]))
  return jnp.stack(table)


def _floor_log2(n: jax.Array, levels: int) -> jax.Array:
  """floor(log2(n)) for integers 1 <= n, capped at levels - 1 (exact, no float log)."""
  out = jnp.zeros_like(n)
  for k in range(1, levels):
    out = out + (n >= 2 ** k).astype(n.dtype)
  return out


def roi_bins(rois: jax.Array, output_size: int, spatial_scale: float,
             feature_hw: tuple[int, int], valid_hw=None) -> tuple[jax.Array, ...]:
  """Bin edges (ys, ye, xs, xe), each int32 [R, P], clipped to the feature map.

  `valid_hw` (possibly traced) clips to a smaller extent than the (static) feature map.
  """
  height, width = feature_hw
  clip_h, clip_w = (height, width) if valid_hw is None else valid_hw
  max_cells = max(height, width) + 2
  start, end = (jnp.asarray(t) for t in _bin_offsets(max_cells, output_size))
  cells = _round_half_away(rois * spatial_scale).astype(jnp.int32)
  x1, y1, x2, y2 = cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]
  roi_w = jnp.clip(x2 - x1 + 1, 1, max_cells)
  roi_h = jnp.clip(y2 - y1 + 1, 1, max_cells)
  xs = start[roi_w] + x1[:, None]
  xe = end[roi_w] + x1[:, None]
  ys = start[roi_h] + y1[:, None]
  ye = end[roi_h] + y1[:, None]
  return (jnp.clip(ys, 0, clip_h), jnp.clip(ye, 0, clip_h), jnp.clip(xs, 0, clip_w),
          jnp.clip(xe, 0, clip_w))


def roi_pool(feat: jax.Array, rois: jax.Array, output_size: int, spatial_scale: float,
             table: jax.Array | None = None, valid_hw=None) -> jax.Array:
  """Max-pools regions of one feature map.

  Args:
    feat: [H, W, C] feature map.
    rois: [R, 4] boxes x1 y1 x2 y2 in input pixels, within the feature map's extent
      (H / spatial_scale x W / spatial_scale; the detector clips its proposals to the image).
    output_size: P, bins per side.
    spatial_scale: feature cells per input pixel (1/16).
    table: `roi_pool_table(feat, ...)`, to share it between several calls on the same map.
    valid_hw: (h, w), possibly traced: the map's real extent when it is padded (bins are clipped
      to it, as they would be on the unpadded map).

  Returns:
    [R, P, P, C] pooled features.
  """
  height, width, channels = feat.shape
  levels = _table_levels((height, width), output_size)
  if table is None:
    table = _sparse_table(feat, levels)
  flat = table.reshape(-1, channels)
  ys, ye, xs, xe = roi_bins(rois, output_size, spatial_scale, (height, width), valid_hw)
  eh = ye - ys  # [R, P]
  ew = xe - xs
  empty = (eh[:, :, None] <= 0) | (ew[:, None, :] <= 0)  # [R, P, P]
  a = _floor_log2(jnp.maximum(eh, 1), levels)
  b = _floor_log2(jnp.maximum(ew, 1), levels)
  y_lo, y_hi = ys, jnp.maximum(ye - 2 ** a, ys)
  x_lo, x_hi = xs, jnp.maximum(xe - 2 ** b, xs)

  def index(yy, xx):
    yy = jnp.clip(yy, 0, height - 1)[:, :, None]
    xx = jnp.clip(xx, 0, width - 1)[:, None, :]
    return ((a[:, :, None] * levels + b[:, None, :]) * height + yy) * width + xx

  out = None
  for yy in (y_lo, y_hi):
    for xx in (x_lo, x_hi):
      corner = jnp.take(flat, index(yy, xx), axis=0)  # [R, P, P, C]
      out = corner if out is None else jnp.maximum(out, corner)
  return jnp.where(empty[..., None], jnp.zeros((), feat.dtype), out)


def _table_levels(feature_hw: tuple[int, int], output_size: int) -> int:
  return int(math.floor(math.log2(max_bin_cells(feature_hw, output_size)))) + 1


def roi_pool_table(feat: jax.Array, output_size: int) -> jax.Array:
  """The sparse table `roi_pool` needs for `feat` [H, W, C]."""
  height, width, _ = feat.shape
  return _sparse_table(feat, _table_levels((height, width), output_size))
