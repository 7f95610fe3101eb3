"""Detector tests: NumPy references for RoI pooling, NMS and region selection; hand-worked box
numbers; end to end on drawn images with a tiny random detector; the weight loader."""

import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagebert_jax.detector import (DetectorConfig, WeightsError, compiled_detector,
                                    expected_keys, init_params, load_detectron2_weights,
                                    prepare_image, resized_size, select_regions, tiny_config,
                                    trunk_feature_size)
from imagebert_jax.detector import boxes as box_ops
from imagebert_jax.detector import model as model_lib
from imagebert_jax.detector.preprocess import PreparedImage, to_original
from imagebert_jax.detector.roi_pool import roi_pool

# ------------------------------------------------------------------------------------------------
# NumPy references.


def np_iou(a, b):
  """IoU of two single boxes, x1 y1 x2 y2, no +1."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def np_greedy_nms(boxes, scores, thresh, valid=None):
  """Kept indices in score order: a box is dropped if a kept better box overlaps it > thresh."""
  order = [i for i in np.argsort(-scores, kind="stable") if valid is None or valid[i]]
  kept = []
  for i in order:
    if all(np_iou(boxes[i], boxes[k]) <= thresh for k in kept):
      kept.append(i)
  return kept


def np_roi_pool(feat, rois, size, scale):
  """The legacy RoIPool loop: rounded cell bounds, floor/ceil bins, clipped, empty bins = 0."""
  h, w, c = feat.shape
  out = np.zeros((len(rois), size, size, c), np.float32)

  def rnd(v):  # C round(): half away from zero
    return int(math.copysign(math.floor(abs(v) + 0.5), v))

  for r, roi in enumerate(rois):
    x1, y1, x2, y2 = (rnd(float(np.float32(v) * np.float32(scale))) for v in roi)
    bin_w = np.float32(max(x2 - x1 + 1, 1)) / np.float32(size)
    bin_h = np.float32(max(y2 - y1 + 1, 1)) / np.float32(size)
    for ph in range(size):
      hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + y1, 0), h)
      he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + y1, 0), h)
      for pw in range(size):
        ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + x1, 0), w)
        we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + x1, 0), w)
        if he > hs and we > ws:
          out[r, ph, pw] = feat[hs:he, ws:we].reshape(-1, c).max(axis=0)
  return out


def np_bottom_up_select(rois, probs, nms_thresh, conf_thresh, min_boxes, max_boxes):
  """The Caffe extractor's rule: per-class NMS confidence, threshold, at least min, at most max."""
  conf = np.zeros(len(rois))
  for cls in range(probs.shape[1]):
    kept = np_greedy_nms(rois, probs[:, cls], nms_thresh)
    conf[kept] = np.maximum(conf[kept], probs[kept, cls])
  chosen = np.where(conf >= conf_thresh)[0]
  if len(chosen) < min_boxes:
    chosen = np.argsort(-conf, kind="stable")[:min_boxes]
  elif len(chosen) > max_boxes:
    chosen = np.argsort(-conf, kind="stable")[:max_boxes]
  return chosen, conf


def clustered_boxes(rng, n, extent=200.0, clusters=6):
  centres = rng.uniform(20, extent - 20, size=(clusters, 2))
  pick = centres[rng.integers(0, clusters, n)] + rng.normal(0, 6, size=(n, 2))
  half = rng.uniform(8, 40, size=(n, 2))
  return np.concatenate([pick - half, pick + half], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Boxes, anchors, sizes.


def test_decode_boxes_hand_worked():
  box = jnp.array([10.0, 20.0, 30.0, 60.0])  # w 20, h 40, centre (20, 40)
  # dx = 2/10 -> centre x 20 + 0.2 * 20 = 24; dy = -4/10 -> 40 - 0.4 * 40 = 24;
  # dw = 5 ln2 / 5 -> w 40; dh = 0 -> h 40.
  out = box_ops.decode_boxes(jnp.array([2.0, -4.0, 5 * math.log(2.0), 0.0]), box,
                             (10.0, 10.0, 5.0, 5.0), math.log(1000.0 / 16))
  np.testing.assert_allclose(np.asarray(out), [4.0, 4.0, 44.0, 44.0], rtol=1e-6, atol=1e-5)
  # With unit weights the same deltas double the width: w = 20 * e^(5 ln 2) = 640.
  out = box_ops.decode_boxes(jnp.array([0.0, 0.0, 5 * math.log(2.0), 0.0]), box,
                             (1.0, 1.0, 1.0, 1.0), math.log(1000.0 / 16))
  np.testing.assert_allclose(np.asarray(out), [20 - 320, 20.0, 20 + 320, 60.0], rtol=1e-5)
  # dw far above the clamp: width = 20 * 1000 / 16 = 1250, centred on 20; dh below: no clamp.
  out = box_ops.decode_boxes(jnp.array([0.0, 0.0, 100.0, -5 * math.log(2.0)]), box,
                             (1.0, 1.0, 1.0, 1.0), math.log(1000.0 / 16))
  np.testing.assert_allclose(np.asarray(out), [20 - 625, 40 - 40 / 64, 20 + 625, 40 + 40 / 64],
                             rtol=1e-5)


def test_clip_boxes_hand_worked():
  out = box_ops.clip_boxes(jnp.array([[-5.0, 3.0, 700.0, 500.0], [10.0, -1.0, 20.0, 30.0]]),
                           480, 640)
  np.testing.assert_array_equal(np.asarray(out), [[0, 3, 640, 480], [10, 0, 20, 30]])


def test_anchors_hand_worked():
  cells = box_ops.cell_anchors((64.0, 128.0), (0.5, 1.0, 2.0))
  assert cells.shape == (6, 4)
  w = math.sqrt(64 * 64 / 0.5)  # ratio = h / w
  np.testing.assert_allclose(cells[0], [-w / 2, -w / 4, w / 2, w / 4], rtol=1e-6)
  np.testing.assert_allclose(cells[1], [-32, -32, 32, 32])
  np.testing.assert_allclose(cells[4], [-64, -64, 64, 64])  # size 128, ratio 1
  grid = box_ops.grid_anchors(2, 3, 16, cells)
  # (y, x, anchor) order, offset 0: anchor (y=1, x=2, a=4) is centred on (32, 16).
  np.testing.assert_allclose(grid[(1 * 3 + 2) * 6 + 4], [32 - 64, 16 - 64, 32 + 64, 16 + 64])


def test_resized_size_hand_worked():
  assert resized_size(480, 640, 600, 1000) == (600, 800)
  assert resized_size(1000, 500, 600, 1000) == (1000, 500)  # 1200 x 600 is capped at 1000
  assert resized_size(300, 2000, 600, 1000) == (150, 1000)
  assert resized_size(333, 500, 600, 1000) == (600, 901)  # 900.9 rounds half up


def test_boxes_back_to_original_pixels_hand_worked():
  # A 200 (h) x 300 (w) image resized to 128 x 192: x scales by 300/192, y by 200/128.
  prep = PreparedImage(canvas=np.zeros((128, 192, 3), np.float32), resized_hw=(128, 192),
                       original_hw=(200, 300))
  got = to_original(np.array([[0, 0, 96, 64], [64, 32, 250, 140]], np.float32), prep)
  np.testing.assert_allclose(got, [[0, 0, 150, 100], [100, 50, 300, 200]], rtol=1e-6)


def test_trunk_feature_size():
  # 600 -> conv 300 -> caffe pool ceil((300-3)/2)+1 = 150 -> 75 -> 38;
  # 1000 -> 500 -> 250 -> 125 -> 63
  assert trunk_feature_size(DetectorConfig(), 600, 1000) == (38, 63)
  cfg = tiny_config()
  params = init_params(cfg, seed=1)
  for h, w in ((128, 192), (37, 50)):
    out = model_lib.backbone(params, cfg, jnp.zeros((1, h, w, 3)))
    assert out.shape[1:3] == trunk_feature_size(cfg, h, w)


# ------------------------------------------------------------------------------------------------
# RoI pooling and NMS against NumPy.


@pytest.mark.parametrize("size", [4, 14])
def test_roi_pool_matches_numpy(size):
  rng = np.random.default_rng(size)
  feat = rng.normal(size=(7, 9, 5)).astype(np.float32)
  stride = 16.0
  rois = [[0, 0, 9 * stride, 7 * stride],  # the whole map
          [3, 5, 3, 5],  # a point
          [50, 40, 20, 10],  # x2 < x1: forced to 1 x 1
          [140, 100, 144, 112],  # touching the far edges
          [7.5, 8.0, 24.5, 23.9]]  # .5 rounds away from zero
  rois += clustered_boxes(rng, 15, extent=7 * stride).clip(0, 7 * stride).tolist()
  rois = np.asarray(rois, np.float32)
  got = np.asarray(roi_pool(jnp.asarray(feat), jnp.asarray(rois), size, 1.0 / stride))
  np.testing.assert_array_equal(got, np_roi_pool(feat, rois, size, 1.0 / stride))


def test_nms_topk_matches_greedy():
  rng = np.random.default_rng(0)
  boxes = clustered_boxes(rng, 60)
  scores = rng.uniform(size=60).astype(np.float32)
  valid = rng.uniform(size=60) > 0.1
  want = np_greedy_nms(boxes, scores, 0.5, valid)
  for max_out in (5, len(want), len(want) + 7):
    idx, found = box_ops.nms_topk(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid),
                                  0.5, max_out)
    n = min(max_out, len(want))
    assert list(np.asarray(idx)[:n]) == want[:n]
    assert list(np.asarray(found)) == [True] * n + [False] * (max_out - n)


def test_nms_mask_per_class_matches_greedy():
  rng = np.random.default_rng(1)
  n = 80
  boxes = clustered_boxes(rng, n)
  scores = np.sort(rng.uniform(size=n))[::-1].astype(np.float32)  # nms_mask wants sorted input
  classes = rng.integers(0, 4, size=n)
  valid = rng.uniform(size=n) > 0.1
  keep = np.asarray(box_ops.nms_mask(jnp.asarray(boxes), jnp.asarray(valid), 0.3,
                                     classes=jnp.asarray(classes)))
  want = np.zeros(n, bool)
  for c in range(4):
    members = np.where((classes == c) & valid)[0]
    kept = np_greedy_nms(boxes[members], scores[members], 0.3)
    want[members[kept]] = True
  np.testing.assert_array_equal(keep, want)
  # Without classes: one greedy NMS over everything.
  keep = np.asarray(box_ops.nms_mask(jnp.asarray(boxes), jnp.asarray(valid), 0.3))
  want = np.zeros(n, bool)
  want[np_greedy_nms(boxes, scores, 0.3, valid)] = True
  np.testing.assert_array_equal(keep, want)


def test_select_regions_matches_bottom_up_rule():
  rng = np.random.default_rng(2)
  r, c = 40, 6
  rois = clustered_boxes(rng, r)
  logits = rng.normal(scale=2.0, size=(r, c + 1))
  probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))[:, :c].astype(np.float32)
  valid = np.ones(r, bool)
  _, ref_conf = np_bottom_up_select(rois, probs, 0.3, 0.0, 0, r)
  eighth_best = np.sort(ref_conf)[-8]
  for thresh, case in ((eighth_best, "in range"), (2.0, "too few"), (0.0, "too many")):
    cfg = tiny_config(min_boxes=5, max_boxes=12, score_thresh=float(thresh), class_nms=0.3)
    want, want_conf = np_bottom_up_select(rois, probs, 0.3, thresh, 5, 12)
    got = jax.jit(select_regions, static_argnums=0)(cfg, jnp.asarray(rois), jnp.asarray(valid),
                                                    jnp.asarray(probs))
    np.testing.assert_allclose(np.asarray(got["confidence"]), want_conf, rtol=1e-6)
    count = int(got["count"])
    assert count == len(want), case
    assert list(np.asarray(got["index"])[:count]) == list(want), case
    assert not np.asarray(got["found"])[count:].any()
  assert len(np_bottom_up_select(rois, probs, 0.3, eighth_best, 5, 12)[0]) == 8


def test_select_regions_ignores_invalid_proposals():
  rng = np.random.default_rng(3)
  rois = clustered_boxes(rng, 30)
  probs = rng.dirichlet(np.ones(5), size=30)[:, :4].astype(np.float32)
  valid = np.arange(30) < 7  # fewer valid proposals than min_boxes
  cfg = tiny_config(min_boxes=10, max_boxes=20, score_thresh=0.0)
  got = select_regions(cfg, jnp.asarray(rois), jnp.asarray(valid), jnp.asarray(probs))
  assert int(got["count"]) == 7
  assert sorted(np.asarray(got["index"])[:7]) == list(range(7))


# ------------------------------------------------------------------------------------------------
# End to end with a tiny random detector.


def drawn_image(seed, height, width):
  rng = np.random.default_rng(seed)
  img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
  draw = ImageDraw.Draw(img)
  for _ in range(5):
    x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
    x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
    draw.rectangle([int(x0), int(y0), int(x1), int(y1)],
                   fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
  return np.asarray(img)


@pytest.fixture(scope="module")
def tiny_setup():
  cfg = tiny_config()
  params = init_params(cfg, seed=0)
  images = [drawn_image(0, 200, 300), drawn_image(1, 240, 330)]
  prepared = [prepare_image(img, cfg) for img in images]
  batch = np.stack([p.canvas for p in prepared])
  hw = np.asarray([p.resized_hw for p in prepared], np.int32)
  return cfg, params, prepared, batch, hw


@pytest.mark.parametrize("score_thresh", [0.2, 0.0, 2.0])
def test_detect_end_to_end(tiny_setup, score_thresh):
  cfg, params, prepared, batch, hw = tiny_setup
  cfg = cfg.replace(score_thresh=score_thresh)
  out = jax.tree_util.tree_map(np.asarray, compiled_detector(cfg)(params, batch, hw))
  b, m, p = 2, cfg.max_boxes, cfg.post_nms_topk
  assert out["boxes"].shape == (b, m, 4) and out["features"].shape == (b, m, cfg.feature_dim)
  assert out["class_probs"].shape == (b, m, cfg.num_classes)
  assert out["proposals"].shape == (b, p, 4)
  for i, prep in enumerate(prepared):
    h, w = prep.resized_hw
    n, n_valid = int(out["num_boxes"][i]), int(out["proposal_valid"][i].sum())
    assert n_valid >= cfg.max_boxes  # enough proposals for every case below
    if score_thresh == 0.0:
      assert n == cfg.max_boxes  # every proposal passes: capped at max_boxes
    elif score_thresh == 2.0:
      assert n == cfg.min_boxes  # none passes: the top min_boxes
    assert cfg.min_boxes <= n <= cfg.max_boxes
    props = out["proposals"][i][out["proposal_valid"][i]]
    assert np.all(props[:, 2] > props[:, 0]) and np.all(props[:, 3] > props[:, 1])
    for bx in (out["boxes"][i, :n], out["regressed_boxes"][i, :n], props):
      assert np.all(bx >= 0) and np.all(bx[:, [0, 2]] <= w) and np.all(bx[:, [1, 3]] <= h)
    np.testing.assert_array_equal(out["boxes"][i, :n], out["proposals"][i][out["index"][i, :n]])
    assert len(set(out["index"][i, :n].tolist())) == n
    assert np.all(np.isfinite(out["features"][i, :n]))
    assert np.all(out["features"][i, :n] >= 0)  # averages of ReLU outputs
    assert not out["features"][i, n:].any() and not out["boxes"][i, n:].any()
    assert np.all((out["object_id"][i, :n] >= 0) & (out["object_id"][i, :n] < cfg.num_classes))
    np.testing.assert_allclose(out["object_conf"][i, :n], out["class_probs"][i, :n].max(-1))
    probs = out["class_probs"][i, :n]  # a distribution without its background entry
    assert np.all(probs >= 0) and np.all(probs.sum(-1) <= 1 + 1e-5)
    assert np.all((out["attr_id"][i, :n] >= 0) & (out["attr_id"][i, :n] < cfg.num_attributes))


def test_detect_is_independent_of_canvas_and_batch(tiny_setup):
  """An image gives the same regions alone in a larger canvas as next to another image."""
  cfg, params, prepared, batch, hw = tiny_setup
  both = compiled_detector(cfg)(params, batch, hw)
  h, w = prepared[0].resized_hw
  big = np.zeros((1, 160, 256, 3), np.float32)
  big[0, :h, :w] = prepared[0].canvas[:h, :w]
  alone = compiled_detector(cfg)(params, big, hw[:1])
  assert int(both["num_boxes"][0]) == int(alone["num_boxes"][0])
  for key in ("boxes", "features", "object_id", "object_conf"):
    np.testing.assert_allclose(np.asarray(both[key][0]), np.asarray(alone[key][0]), rtol=1e-4,
                               atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Weights.


def tiny_state_dict(rng, with_running_stats=True):
  """The detectron2 keys of tiny_config(), written out by hand (shapes in PyTorch layout)."""
  state = {}

  def conv_bn(name, out_ch, in_ch, k):
    state[f"{name}.weight"] = rng.normal(size=(out_ch, in_ch, k, k)).astype(np.float32)
    state[f"{name}.norm.weight"] = rng.uniform(0.5, 1.5, out_ch).astype(np.float32)
    state[f"{name}.norm.bias"] = rng.normal(size=out_ch).astype(np.float32)
    if with_running_stats:
      state[f"{name}.norm.running_mean"] = rng.normal(size=out_ch).astype(np.float32)
      state[f"{name}.norm.running_var"] = rng.uniform(0.5, 2.0, out_ch).astype(np.float32)

  def block(name, in_ch, mid, out_ch):
    conv_bn(f"{name}.conv1", mid, in_ch, 1)
    conv_bn(f"{name}.conv2", mid, mid, 3)
    conv_bn(f"{name}.conv3", out_ch, mid, 1)
    conv_bn(f"{name}.shortcut", out_ch, in_ch, 1)

  def dense(name, out_dim, in_dim, k=None):
    shape = (out_dim, in_dim) if k is None else (out_dim, in_dim, k, k)
    state[f"{name}.weight"] = rng.normal(size=shape).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(size=out_dim).astype(np.float32)

  conv_bn("backbone.stem.conv1", 8, 3, 7)
  block("backbone.res2.0", 8, 4, 16)
  block("backbone.res3.0", 16, 8, 32)
  block("backbone.res4.0", 32, 16, 64)
  dense("proposal_generator.rpn_head.conv", 16, 64, 3)
  dense("proposal_generator.rpn_head.objectness_logits", 6, 16, 1)  # 2 sizes x 3 ratios
  dense("proposal_generator.rpn_head.anchor_deltas", 24, 16, 1)
  block("roi_heads.res5.0", 64, 32, 128)
  dense("roi_heads.box_predictor.cls_score", 7, 128)  # 6 classes + background
  dense("roi_heads.box_predictor.bbox_pred", 24, 128)  # 4 x 6 classes
  state["roi_heads.box_predictor.cls_embedding.weight"] = rng.normal(size=(7, 16)).astype(
      np.float32)
  dense("roi_heads.box_predictor.fc_attr", 32, 144)  # 128 + 128 / 8 -> 128 / 4
  dense("roi_heads.box_predictor.attr_score", 5, 32)  # 4 attributes + none
  return state


def np_conv_torch_layout(x, weight, stride, pad):
  """Cross-correlation as PyTorch computes it: x [H, W, I], weight [O, I, kh, kw] -> [H', W', O]."""
  o, _, kh, kw = weight.shape
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  oh = (xp.shape[0] - kh) // stride + 1
  ow = (xp.shape[1] - kw) // stride + 1
  out = np.zeros((oh, ow, o))
  for y in range(oh):
    for xx in range(ow):
      patch = xp[y * stride:y * stride + kh, xx * stride:xx * stride + kw]  # [kh, kw, I]
      out[y, xx] = np.einsum("hwi,oihw->o", patch, weight)
  return out


def test_load_weights_converts_layouts(tmp_path):
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  state = tiny_state_dict(rng)
  path = tmp_path / "tiny.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": state, "__author__": "test"}, f)
  params = load_detectron2_weights(str(path), cfg)

  # The stem conv + frozen BN on a small input against a PyTorch-layout NumPy convolution.
  x = rng.normal(size=(12, 10, 3)).astype(np.float32)
  got = np.asarray(model_lib._conv_bn(params["backbone.stem.conv1"], jnp.asarray(x[None]),
                                      stride=2, padding=3))[0]
  name = "backbone.stem.conv1.norm"
  scale = state[f"{name}.weight"] / np.sqrt(state[f"{name}.running_var"] + 1e-5)
  want = (np_conv_torch_layout(x, state["backbone.stem.conv1.weight"], 2, 3)
          - state[f"{name}.running_mean"]) * scale + state[f"{name}.bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # Linear layers are x @ W.T + b; the embedding is a plain table.
  feat = rng.normal(size=(3, 128)).astype(np.float32)
  head = model_lib.box_predictor(params, cfg, jnp.asarray(feat))
  w, b = state["roi_heads.box_predictor.cls_score.weight"], state[
      "roi_heads.box_predictor.cls_score.bias"]
  np.testing.assert_allclose(np.asarray(head["cls_logits"]), feat @ w.T + b, rtol=1e-4, atol=1e-4)
  top = (feat @ w.T + b).argmax(-1)
  emb = state["roi_heads.box_predictor.cls_embedding.weight"][top]
  hidden = np.maximum(np.concatenate([feat, emb], -1)
                      @ state["roi_heads.box_predictor.fc_attr.weight"].T
                      + state["roi_heads.box_predictor.fc_attr.bias"], 0)
  attr = (hidden @ state["roi_heads.box_predictor.attr_score.weight"].T
          + state["roi_heads.box_predictor.attr_score.bias"])
  np.testing.assert_allclose(np.asarray(head["attr_logits"]), attr, rtol=1e-3, atol=1e-3)


def test_load_weights_without_running_stats_or_model_key(tmp_path):
  cfg = tiny_config()
  state = tiny_state_dict(np.random.default_rng(1), with_running_stats=False)
  path = tmp_path / "plain.pkl"
  with open(path, "wb") as f:
    pickle.dump(state, f)
  params = load_detectron2_weights(str(path), cfg)
  p = params["backbone.res3.0.conv2"]
  np.testing.assert_allclose(
      np.asarray(p["scale"]), state["backbone.res3.0.conv2.norm.weight"] / np.sqrt(1 + 1e-5),
      rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(p["shift"]), state["backbone.res3.0.conv2.norm.bias"])
  np.testing.assert_array_equal(np.asarray(p["kernel"])[2, 0, 5, 1],
                                state["backbone.res3.0.conv2.weight"][1, 5, 2, 0])


def test_weight_errors_list_every_problem(tmp_path):
  cfg = tiny_config()
  state = tiny_state_dict(np.random.default_rng(2))
  del state["backbone.res3.0.conv2.weight"]
  del state["roi_heads.box_predictor.attr_score.bias"]
  state["roi_heads.box_predictor.extra.weight"] = np.zeros(3, np.float32)
  state["roi_heads.box_predictor.bbox_pred.weight"] = np.zeros((28, 128), np.float32)
  path = tmp_path / "bad.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": state}, f)
  with pytest.raises(WeightsError) as info:
    load_detectron2_weights(str(path), cfg)
  msg = str(info.value)
  assert "\n" not in msg and str(path) in msg
  assert "2 missing keys [backbone.res3.0.conv2.weight, roi_heads.box_predictor.attr_score.bias]" \
      in msg
  assert "1 unexpected keys [roi_heads.box_predictor.extra.weight]" in msg
  assert "roi_heads.box_predictor.bbox_pred.weight (28, 128) (want (24, 128))" in msg
  # The real-size config rejects the tiny file with the same kind of message.
  with pytest.raises(WeightsError, match=r"missing keys \[backbone.res2.1.conv1.weight"):
    load_detectron2_weights(str(path), DetectorConfig())


def test_full_model_key_set():
  keys = expected_keys(DetectorConfig())
  # 104 conv + frozen-BN modules (stem 1, res2 3x3+1, res3 4x3+1, res4 23x3+1, res5 3x3+1) with
  # 5 entries each, 3 RPN convs with weight + bias, and 9 box-predictor entries.
  assert len(keys) == 104 * 5 + 6 + 9
  assert keys["backbone.stem.conv1.weight"] == (64, 3, 7, 7)
  assert keys["backbone.res2.0.shortcut.weight"] == (256, 64, 1, 1)
  assert keys["backbone.res3.0.conv1.weight"] == (128, 256, 1, 1)
  assert keys["backbone.res4.22.conv3.weight"] == (1024, 256, 1, 1)
  assert keys["backbone.res4.22.conv2.norm.running_var"] == (256,)
  assert keys["proposal_generator.rpn_head.conv.weight"] == (512, 1024, 3, 3)
  assert keys["proposal_generator.rpn_head.objectness_logits.weight"] == (12, 512, 1, 1)
  assert keys["proposal_generator.rpn_head.anchor_deltas.weight"] == (48, 512, 1, 1)
  assert keys["roi_heads.res5.0.shortcut.weight"] == (2048, 1024, 1, 1)
  assert keys["roi_heads.res5.2.conv2.weight"] == (512, 512, 3, 3)
  assert keys["roi_heads.box_predictor.cls_score.weight"] == (1601, 2048)
  assert keys["roi_heads.box_predictor.bbox_pred.weight"] == (6400, 2048)
  assert keys["roi_heads.box_predictor.cls_embedding.weight"] == (1601, 256)
  assert keys["roi_heads.box_predictor.fc_attr.weight"] == (512, 2304)
  assert keys["roi_heads.box_predictor.attr_score.weight"] == (401, 512)
  assert "backbone.res4.23.conv1.weight" not in keys
  assert "backbone.res2.1.shortcut.weight" not in keys
