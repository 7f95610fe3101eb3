"""The detector as plain JAX functions over a flat parameter dict.

Parameters are keyed by the detectron2 module names (e.g. "backbone.res4.7.conv2",
"roi_heads.box_predictor.cls_score"), each a dict of arrays in JAX layout:

  conv_bn    {"kernel": [kh, kw, in, out], "scale": [out], "shift": [out]}  (frozen BN folded in)
  conv       {"kernel": [kh, kw, in, out], "bias": [out]}
  linear     {"kernel": [in, out], "bias": [out]}
  embedding  {"embedding": [num, dim]}

`module_specs(cfg)` lists every module with its kind and PyTorch-layout shape; the random
initialiser and the weight loader (weights.py) both derive from it, so the loader checks exactly
the key set the config implies (the full ResNet-101 set for the default config).

Shapes are static: every image yields `post_nms_topk` proposal slots and `max_boxes` region slots
with validity masks, so one compiled function serves every image of a canvas size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagebert_jax.detector import boxes as box_ops
from imagebert_jax.detector.config import DetectorConfig, trunk_feature_size
from imagebert_jax.detector.roi_pool import roi_pool, roi_pool_table

Params = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
  kind: str  # conv_bn | conv | linear | embedding
  shape: tuple[int, ...]  # PyTorch layout: conv [out, in, kh, kw], linear [out, in], emb [n, d]


def _block_specs(prefix: str, in_ch: int, bottleneck: int, out_ch: int) -> dict[str, ModuleSpec]:
  specs = {
      f"{prefix}.conv1": ModuleSpec("conv_bn", (bottleneck, in_ch, 1, 1)),
      f"{prefix}.conv2": ModuleSpec("conv_bn", (bottleneck, bottleneck, 3, 3)),
      f"{prefix}.conv3": ModuleSpec("conv_bn", (out_ch, bottleneck, 1, 1)),
  }
  if in_ch != out_ch:
    specs[f"{prefix}.shortcut"] = ModuleSpec("conv_bn", (out_ch, in_ch, 1, 1))
  return specs


def module_specs(cfg: DetectorConfig) -> dict[str, ModuleSpec]:
  """Every parameterised module of the detector, by detectron2 name."""
  specs = {"backbone.stem.conv1": ModuleSpec("conv_bn", (cfg.stem_channels, 3, 7, 7))}
  in_ch, out_ch, width = cfg.stem_channels, cfg.res2_channels, cfg.bottleneck_channels
  for s, blocks in enumerate(cfg.stage_blocks):
    for i in range(blocks):
      specs.update(_block_specs(f"backbone.res{s + 2}.{i}", in_ch if i == 0 else out_ch, width,
                                out_ch))
    in_ch, out_ch, width = out_ch, out_ch * 2, width * 2
  trunk, a = cfg.trunk_channels, cfg.num_anchors
  specs["proposal_generator.rpn_head.conv"] = ModuleSpec("conv", (cfg.rpn_channels, trunk, 3, 3))
  specs["proposal_generator.rpn_head.objectness_logits"] = ModuleSpec(
      "conv", (a, cfg.rpn_channels, 1, 1))
  specs["proposal_generator.rpn_head.anchor_deltas"] = ModuleSpec(
      "conv", (4 * a, cfg.rpn_channels, 1, 1))
  for i in range(cfg.res5_blocks):
    specs.update(_block_specs(f"roi_heads.res5.{i}", in_ch if i == 0 else out_ch, width, out_ch))
  d, c = cfg.feature_dim, cfg.num_classes
  head = "roi_heads.box_predictor"
  specs[f"{head}.cls_score"] = ModuleSpec("linear", (c + 1, d))
  specs[f"{head}.bbox_pred"] = ModuleSpec("linear", (4 * c, d))
  if cfg.num_attributes:
    specs[f"{head}.cls_embedding"] = ModuleSpec("embedding", (c + 1, d // 8))
    specs[f"{head}.fc_attr"] = ModuleSpec("linear", (d // 4, d + d // 8))
    specs[f"{head}.attr_score"] = ModuleSpec("linear", (cfg.num_attributes + 1, d // 4))
  return specs


def init_params(cfg: DetectorConfig, seed: int = 0) -> Params:
  """Random weights (He-normal convolutions, detectron2's head initialisers).

  The last batch norm of each residual branch is scaled by 0.1 so that activations stay bounded
  through 30+ random blocks.
  """
  rng = np.random.default_rng(seed)
  params: Params = {}
  for name, spec in module_specs(cfg).items():
    shape = spec.shape
    if spec.kind in ("conv_bn", "conv"):
      out_ch, in_ch, kh, kw = shape
      std = np.sqrt(2.0 / (in_ch * kh * kw))
      if spec.kind == "conv" and name.startswith("proposal_generator"):
        std = 0.01
      kernel = (rng.standard_normal((kh, kw, in_ch, out_ch)) * std).astype(np.float32)
      if spec.kind == "conv":
        params[name] = {"kernel": kernel, "bias": np.zeros((out_ch,), np.float32)}
      else:
        scale = 0.1 if name.endswith("conv3") else 1.0
        params[name] = {"kernel": kernel, "scale": np.full((out_ch,), scale, np.float32),
                        "shift": np.zeros((out_ch,), np.float32)}
    elif spec.kind == "linear":
      out_dim, in_dim = shape
      std = 0.001 if name.endswith("bbox_pred") else 0.01
      if name.endswith("fc_attr") or name.endswith("attr_score"):
        std = np.sqrt(1.0 / in_dim)
      params[name] = {"kernel": (rng.standard_normal((in_dim, out_dim)) * std).astype(np.float32),
                      "bias": np.zeros((out_dim,), np.float32)}
    else:
      params[name] = {"embedding": (rng.standard_normal(shape) * 0.1).astype(np.float32)}
  return jax.tree_util.tree_map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------------
# Layers.

def _conv(x, kernel, stride=1, padding=0, dilation=1):
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_bn(p, x, **kw):
  return _conv(x, p["kernel"], **kw) * p["scale"] + p["shift"]


def _mask_outside(x: jax.Array, valid_hw: jax.Array | None) -> jax.Array:
  """Zeroes x [B, H, W, C] outside each image's valid [h, w] (valid_hw [B, 2]); None: no-op."""
  if valid_hw is None:
    return x
  rows = jnp.arange(x.shape[1])[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(x.shape[2])[None, None, :] < valid_hw[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, jnp.zeros((), x.dtype))


def _halve(valid_hw):
  """Valid size after a stride-2 convolution (1x1 without padding or 3x3 with padding 1)."""
  return None if valid_hw is None else (valid_hw - 1) // 2 + 1


def _bottleneck(params: Params, prefix: str, x, *, stride: int, dilation: int,
                stride_in_1x1: bool, valid_hw=None):
  """A ResNet bottleneck block; `valid_hw` (input's valid size) masks the 3x3 conv's input."""
  s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
  out = jax.nn.relu(_conv_bn(params[f"{prefix}.conv1"], x, stride=s1))
  if valid_hw is not None and s1 == 2:
    valid_hw = _halve(valid_hw)
  out = _mask_outside(out, valid_hw)
  out = jax.nn.relu(_conv_bn(params[f"{prefix}.conv2"], out, stride=s3, padding=dilation,
                             dilation=dilation))
  out = _conv_bn(params[f"{prefix}.conv3"], out)
  shortcut = params.get(f"{prefix}.shortcut")
  if shortcut is not None:
    x = _conv_bn(shortcut, x, stride=stride)
  return jax.nn.relu(out + x)


def _max_pool_3x3_s2(x, caffe: bool):
  if caffe:  # padding 0 and output size rounded up == one extra -inf row/column at the end
    pads = ((0, 0), (0, 1), (0, 1), (0, 0))
  else:
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


def backbone(params: Params, cfg: DetectorConfig, images: jax.Array,
             image_hw: jax.Array | None = None) -> jax.Array:
  """Stem + res2..res4 on normalised BGR images [B, H, W, 3] -> [B, H/16, W/16, C4].

  With `image_hw` [B, 2] (each image's size at the top-left of a zero-padded canvas), activations
  outside an image's own extent are zeroed before every spatial convolution and pooling, so its
  features equal those of the image run alone (zero padding at its own border) on every cell of
  its own feature map, whatever the canvas.
  """
  x = _mask_outside(images, image_hw)
  x = jax.nn.relu(_conv_bn(params["backbone.stem.conv1"], x, stride=2, padding=3))
  valid = None if image_hw is None else (image_hw - 1) // 2 + 1  # 7x7, stride 2, padding 3
  x = _max_pool_3x3_s2(_mask_outside(x, valid), cfg.caffe_maxpool)  # inputs >= 0: 0 ~ -inf
  if valid is not None:
    valid = (valid - 2) // 2 + 1 if cfg.caffe_maxpool else (valid - 1) // 2 + 1
  for s, blocks in enumerate(cfg.stage_blocks):
    for i in range(blocks):
      stride = 2 if (s > 0 and i == 0) else 1
      x = _bottleneck(params, f"backbone.res{s + 2}.{i}", x, stride=stride, dilation=1,
                      stride_in_1x1=cfg.stride_in_1x1, valid_hw=valid)
      if stride == 2:
        valid = _halve(valid)
  return x


def res5_head(params: Params, cfg: DetectorConfig, x: jax.Array) -> jax.Array:
  """res5 on pooled regions [R, P, P, C4] -> [R, P', P', 2 C4]."""
  dilation = 1 if cfg.res5_halve else 2
  for i in range(cfg.res5_blocks):
    stride = 2 if (cfg.res5_halve and i == 0) else 1
    x = _bottleneck(params, f"roi_heads.res5.{i}", x, stride=stride, dilation=dilation,
                    stride_in_1x1=cfg.stride_in_1x1)
  return x


def _linear(p, x):
  return x @ p["kernel"] + p["bias"]


# ----------------------------------------------------------------------------------------------
# Per-image stages.

def rpn_proposals(params: Params, cfg: DetectorConfig, feat: jax.Array,
                  image_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Proposals of one image: boxes [post_nms_topk, 4] (resized-image pixels) and validity.

  As detectron2's RPN at test time: top `pre_nms_topk` anchors by objectness, decode, clip to the
  image, drop empty boxes, NMS, keep the first `post_nms_topk`. Anchors on feature cells beyond the
  image's own feature map (the canvas padding) are excluded, as if the image were run alone.
  """
  fh, fw, _ = feat.shape
  img_h, img_w = image_hw[0], image_hw[1]
  own_h, own_w = trunk_feature_size(cfg, img_h, img_w)
  masked = _mask_outside(feat[None], jnp.stack([own_h, own_w])[None])
  t = jax.nn.relu(_conv(masked, params["proposal_generator.rpn_head.conv"]["kernel"],
                        padding=1) + params["proposal_generator.rpn_head.conv"]["bias"])
  logits = (_conv(t, params["proposal_generator.rpn_head.objectness_logits"]["kernel"])
            + params["proposal_generator.rpn_head.objectness_logits"]["bias"])[0]
  deltas = (_conv(t, params["proposal_generator.rpn_head.anchor_deltas"]["kernel"])
            + params["proposal_generator.rpn_head.anchor_deltas"]["bias"])[0]
  a = cfg.num_anchors
  logits = logits.reshape(-1)  # (y, x, anchor) order
  deltas = deltas.reshape(fh, fw, a, 4).reshape(-1, 4)
  anchors = jnp.asarray(box_ops.grid_anchors(
      fh, fw, cfg.feature_stride, box_ops.cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)))

  ys = jnp.arange(fh)[:, None, None]
  xs = jnp.arange(fw)[None, :, None]
  inside = jnp.broadcast_to((ys < own_h) & (xs < own_w), (fh, fw, a)).reshape(-1)
  logits = jnp.where(inside, logits, -jnp.inf)

  k = min(cfg.pre_nms_topk, logits.shape[0])
  top_logits, top_idx = jax.lax.top_k(logits, k)
  props = box_ops.decode_boxes(deltas[top_idx], anchors[top_idx], cfg.rpn_box_weights,
                               cfg.scale_clamp)
  props = box_ops.clip_boxes(props, img_h, img_w)
  wh = props[:, 2:] - props[:, :2]
  valid = (top_logits > -jnp.inf) & jnp.all(wh > cfg.rpn_min_size, axis=-1)
  keep, found = box_ops.nms_topk(props, top_logits, valid, cfg.rpn_nms, cfg.post_nms_topk)
  return jnp.where(found[:, None], props[keep], 0.0), found


def region_features(params: Params, cfg: DetectorConfig, feat: jax.Array, rois: jax.Array,
                    image_hw: jax.Array | None = None) -> jax.Array:
  """RoI pool + res5 + average pool: [R, 4] boxes -> [R, feature_dim], in chunks of roi_chunk.

  With `image_hw`, bins are clipped to the image's own feature map (not the canvas's).
  """
  table = roi_pool_table(feat, cfg.pooler_resolution)
  valid_hw = None if image_hw is None else trunk_feature_size(cfg, image_hw[0], image_hw[1])
  n = rois.shape[0]
  chunk = max(1, min(cfg.roi_chunk, n))
  steps = -(-n // chunk)
  padded = jnp.pad(rois, ((0, steps * chunk - n), (0, 0)))

  def one(chunk_rois):
    pooled = roi_pool(feat, chunk_rois, cfg.pooler_resolution, 1.0 / cfg.feature_stride,
                      table=table, valid_hw=valid_hw)
    return jnp.mean(res5_head(params, cfg, pooled), axis=(1, 2))

  if steps == 1:
    return one(rois)
  out = jax.lax.map(one, padded.reshape(steps, chunk, 4))
  return out.reshape(steps * chunk, -1)[:n]


def box_predictor(params: Params, cfg: DetectorConfig, pooled: jax.Array) -> dict[str, jax.Array]:
  """Class logits [R, C+1], box deltas [R, 4C] and attribute logits [R, A+1] (if enabled).

  The attribute head sees the pooled feature concatenated with an embedding of the top class
  (argmax over all C+1 logits, background included, as in the public model).
  """
  head = "roi_heads.box_predictor"
  out = {"cls_logits": _linear(params[f"{head}.cls_score"], pooled),
         "box_deltas": _linear(params[f"{head}.bbox_pred"], pooled)}
  if cfg.num_attributes:
    top = jnp.argmax(out["cls_logits"], axis=-1)
    emb = params[f"{head}.cls_embedding"]["embedding"][top]
    hidden = jax.nn.relu(_linear(params[f"{head}.fc_attr"], jnp.concatenate([pooled, emb], -1)))
    out["attr_logits"] = _linear(params[f"{head}.attr_score"], hidden)
  return out


def select_regions(cfg: DetectorConfig, rois: jax.Array, valid: jax.Array,
                   scores: jax.Array) -> dict[str, jax.Array]:
  """The bottom-up-attention "10-100 adaptive" choice of regions for one image.

  As the Caffe extractor (tools/generate_tsv.py, get_detections_from_im): for every class, NMS
  (IoU `class_nms`) over the proposal boxes by that class's score; a proposal's confidence is the
  best score it kept in any class (0 if none). Proposals with confidence >= `score_thresh` are kept
  in proposal order; if fewer than `min_boxes` or more than `max_boxes`, the top ones by confidence
  are kept instead.

  All classes are handled by one NMS over the `nms_candidates` best (proposal, class) pairs. This is
  exact for every pair among them (a pair can only be suppressed by a higher-scoring pair of its
  class, which is also among them), so every confidence >= the K-th best score is exact; with
  K > R / score_thresh (2048 > 300 / 0.2) that covers all confidences at or above the threshold.
  A proposal none of whose pairs made the cut gets confidence 0.

  Args:
    rois: [R, 4] proposal boxes; valid: [R]; scores: [R, C] foreground class probabilities.

  Returns:
    index [max_boxes] into the proposals, found [max_boxes], count, and confidence [R].
  """
  r, c = scores.shape
  flat = jnp.where(valid[:, None], scores, -1.0).reshape(-1)
  k = min(cfg.nms_candidates, r * c)
  cand_scores, cand = jax.lax.top_k(flat, k)
  cand_box, cand_cls = cand // c, cand % c
  cand_ok = cand_scores >= 0
  keep = box_ops.nms_mask(rois[cand_box], cand_ok, cfg.class_nms, classes=cand_cls)
  conf = jnp.zeros((r,), scores.dtype).at[cand_box].max(jnp.where(keep, cand_scores, 0.0))
  conf = jnp.where(valid, conf, -1.0)

  above = valid & (conf >= cfg.score_thresh)
  n_above = jnp.sum(above)
  n_valid = jnp.sum(valid)
  count = jnp.minimum(jnp.clip(n_above, cfg.min_boxes, cfg.max_boxes), n_valid)
  in_range = (n_above >= cfg.min_boxes) & (n_above <= cfg.max_boxes)
  positions = jnp.arange(r)
  by_position = jnp.argsort(jnp.where(above, positions, r + positions))
  by_conf = jnp.argsort(-conf, stable=True)
  order = jnp.where(in_range, by_position, by_conf)
  index = order[:cfg.max_boxes]
  found = jnp.arange(cfg.max_boxes) < count
  return {"index": jnp.where(found, index, 0), "found": found, "count": count.astype(jnp.int32),
          "confidence": conf}


def _detect_one(params: Params, cfg: DetectorConfig, feat: jax.Array,
                image_hw: jax.Array) -> dict[str, jax.Array]:
  rois, valid = rpn_proposals(params, cfg, feat, image_hw)
  pooled = region_features(params, cfg, feat, rois, image_hw)
  head = box_predictor(params, cfg, pooled)
  probs = jax.nn.softmax(head["cls_logits"], axis=-1)[:, :cfg.num_classes]  # background last
  sel = select_regions(cfg, rois, valid, probs)
  idx, found = sel["index"], sel["found"]

  fg = probs[idx]
  object_id = jnp.argmax(fg, axis=-1).astype(jnp.int32)
  deltas = head["box_deltas"][idx].reshape(-1, cfg.num_classes, 4)
  top_deltas = jnp.take_along_axis(deltas, object_id[:, None, None], axis=1)[:, 0]
  regressed = box_ops.clip_boxes(
      box_ops.decode_boxes(top_deltas, rois[idx], cfg.box_weights, cfg.scale_clamp),
      image_hw[0], image_hw[1])
  mask = found[:, None]
  out = {
      # The regions are the selected proposals: the Caffe extractor writes the RPN boxes, not the
      # class-regressed ones (tools/generate_tsv.py: "Keep the original boxes, don't worry about
      # the regression bbox outputs"); the regressed box of the top class is kept alongside.
      "boxes": jnp.where(mask, rois[idx], 0.0),
      "regressed_boxes": jnp.where(mask, regressed, 0.0),
      "features": jnp.where(mask, pooled[idx], 0.0),
      "object_id": jnp.where(found, object_id, 0),
      "object_conf": jnp.where(found, jnp.max(fg, axis=-1), 0.0),
      "class_probs": jnp.where(mask, fg, 0.0),
      "num_boxes": sel["count"],
      "proposals": rois,
      "proposal_valid": valid,
      "proposal_confidence": sel["confidence"],
      "index": idx,
  }
  if cfg.num_attributes:
    # As the public demos: softmax over the real attributes, leaving out the last ("no attribute").
    attr = jax.nn.softmax(head["attr_logits"][idx, :cfg.num_attributes], axis=-1)
    out["attr_id"] = jnp.where(found, jnp.argmax(attr, axis=-1), 0).astype(jnp.int32)
    out["attr_conf"] = jnp.where(found, jnp.max(attr, axis=-1), 0.0)
  return out


def detect(params: Params, images: jax.Array, image_hw: jax.Array, *,
           cfg: DetectorConfig) -> dict[str, jax.Array]:
  """Runs the detector on a batch.

  Args:
    params: from `init_params` or `weights.load_detectron2_weights`.
    images: [B, H, W, 3] float32, BGR minus the pixel mean, resized and padded to a canvas
      (preprocess.prepare_image).
    image_hw: [B, 2] int32, each image's resized height and width inside the canvas.

  Returns:
    Per image (leading axis B), padded to `max_boxes` region slots of which `num_boxes` are real:
    boxes [M, 4] (the proposals, resized-image pixels), regressed_boxes [M, 4] (the top class's
    regressed box), features [M, D], object_id / object_conf [M], class_probs [M, C], attr_id /
    attr_conf [M] (with the attribute head), num_boxes; and the raw proposals [P, 4],
    proposal_valid [P], proposal_confidence [P], index [M] (selected proposal slots).
  """
  feats = backbone(params, cfg, images, image_hw)
  return jax.vmap(lambda f, hw: _detect_one(params, cfg, f, hw))(feats, image_hw)


@functools.lru_cache(maxsize=8)
def compiled_detector(cfg: DetectorConfig):
  """`detect` jitted for one config (cached: one compilation per config and input shape)."""
  return jax.jit(functools.partial(detect, cfg=cfg))
