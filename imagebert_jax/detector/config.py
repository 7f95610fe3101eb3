"""Configuration of the region detector (bottom-up-attention Faster R-CNN, ResNet-101 C4).

The defaults are the test-time settings of the public Visual Genome model as converted to the
detectron2 format by the py-bottom-up-attention project
(configs/VG-Detection/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml on top of
configs/Base-RCNN-C4.yaml and detectron2/config/defaults.py there):

- ResNet-101 (res2..res4 = 3, 4, 23 blocks), frozen batch norm, STRIDE_IN_1X1 = True (the MSRA /
  Caffe convention: a block's stride sits in its first 1x1 convolution), CAFFE_MAXPOOL = True (the
  stem max pool has no padding and rounds its output size up, as Caffe does).
- RPN on res4 (stride 16): ANCHOR_GENERATOR.SIZES = [[64, 128, 256, 512]] (the Caffe model's
  scales 4, 8, 16, 32 times a base of 16), ASPECT_RATIOS = [[0.5, 1.0, 2.0]], OFFSET = 0.0,
  PROPOSAL_GENERATOR.HID_CHANNELS = 512, PRE_NMS_TOPK_TEST = 6000, NMS_THRESH = 0.7, and
  POST_NMS_TOPK_TEST = 300 as set by the project's extraction script and demos.
- RoI heads: POOLER_TYPE = "ROIPool" at 14 x 14 (scale 1/16), RES5HALVE = False (res5's first block
  keeps stride 1 and every res5 3x3 convolution has dilation 2), average pool to 2048 dims,
  1600 classes + background, class-specific box regression with weights (10, 10, 5, 5),
  ATTR = True with NUM_ATTRS = 400.
- Input: PIXEL_MEAN = [102.9801, 115.9465, 122.7717] (BGR), std 1, shorter side 600, longer side at
  most 1000.

The region selection follows the original Caffe extractor (peteanderson80/bottom-up-attention,
tools/generate_tsv.py): per-class NMS 0.3 over the proposals, a proposal's confidence is its best
class score that survived NMS, keep those with confidence >= 0.2, but at least 10 and at most 100.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """Architecture and test-time settings; frozen (hashable) so it can be a static jit argument."""

  # Backbone: stem + res2..res4 (the "C4" trunk); res5 runs per region in the RoI head.
  stage_blocks: tuple[int, ...] = (3, 4, 23)
  res5_blocks: int = 3
  stem_channels: int = 64
  res2_channels: int = 256  # output channels of res2; doubled at every later stage
  bottleneck_channels: int = 64  # bottleneck width of res2; doubled at every later stage
  stride_in_1x1: bool = True
  caffe_maxpool: bool = True
  res5_halve: bool = False  # False: res5 keeps stride 1 and uses dilation 2 (the VG model)
  bn_eps: float = 1e-5

  # Region proposal network.
  rpn_channels: int = 512
  anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  feature_stride: int = 16
  rpn_box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
  pre_nms_topk: int = 6000
  post_nms_topk: int = 300
  rpn_nms: float = 0.7
  rpn_min_size: float = 0.0

  # RoI heads.
  pooler_resolution: int = 14
  num_classes: int = 1600  # foreground classes; the background logit comes last (detectron2)
  num_attributes: int = 400  # 0 disables the attribute head; "no attribute" logit comes last
  box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
  scale_clamp: float = math.log(1000.0 / 16)
  roi_chunk: int = 300  # regions per RoI-pool + res5 step (lower it to bound memory; same results)

  # Region selection ("10-100 adaptive").
  class_nms: float = 0.3
  score_thresh: float = 0.2
  min_boxes: int = 10
  max_boxes: int = 100
  nms_candidates: int = 2048  # top (region, class) pairs that enter the per-class NMS

  # Input.
  min_size: int = 600
  max_size: int = 1000
  pixel_mean_bgr: tuple[float, ...] = (102.9801, 115.9465, 122.7717)

  def __post_init__(self):
    if len(self.stage_blocks) < 1 or min(self.stage_blocks) < 1 or self.res5_blocks < 1:
      raise ValueError(f"detector config: need at least one block per stage, "
                       f"got stage_blocks={self.stage_blocks} res5_blocks={self.res5_blocks}")
    if not 0 <= self.min_boxes <= self.max_boxes:
      raise ValueError(f"detector config: need 0 <= min_boxes <= max_boxes, "
                       f"got {self.min_boxes}, {self.max_boxes}")
    if self.max_boxes > self.post_nms_topk:
      raise ValueError(f"detector config: max_boxes ({self.max_boxes}) exceeds post_nms_topk "
                       f"({self.post_nms_topk})")
    if self.min_size > self.max_size:
      raise ValueError(f"detector config: min_size {self.min_size} > max_size {self.max_size}")
    if self.score_thresh < 0:
      raise ValueError(f"detector config: score_thresh must be >= 0, got {self.score_thresh}")
    expected_stride = 4 * 2 ** (len(self.stage_blocks) - 1)
    if self.feature_stride != expected_stride:
      raise ValueError(f"detector config: feature_stride {self.feature_stride} does not match "
                       f"the backbone's stride {expected_stride}")

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_sizes) * len(self.anchor_ratios)

  @property
  def trunk_channels(self) -> int:
    """Channels of the last backbone stage (res4: 1024 for ResNet-101)."""
    return self.res2_channels * 2 ** (len(self.stage_blocks) - 1)

  @property
  def feature_dim(self) -> int:
    """Dimension of a region feature (res5 output: 2048)."""
    return self.trunk_channels * 2

  @property
  def canvases(self) -> tuple[tuple[int, int], ...]:
    """The padded input shapes (height, width): one for landscape, one for portrait images."""
    if self.min_size == self.max_size:
      return ((self.min_size, self.max_size),)
    return ((self.min_size, self.max_size), (self.max_size, self.min_size))

  def replace(self, **changes) -> "DetectorConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "DetectorConfig":
    """Builds a config from (a subset of) its fields; unknown names raise one clear error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"detector config: unknown fields {unknown}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**fixed)


RESNET_STAGE_BLOCKS = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}  # res2..res4


def bottom_up_attention_config(depth: int = 101, **overrides) -> DetectorConfig:
  """The public bottom-up-attention model (ResNet-101, 1600 objects, 400 attributes).

  `depth` 50 or 152 gives the same detector on another ResNet trunk (res5 has 3 blocks in all).
  """
  if depth not in RESNET_STAGE_BLOCKS:
    raise ValueError(f"detector config: ResNet depth {depth} not in {sorted(RESNET_STAGE_BLOCKS)}")
  return DetectorConfig(stage_blocks=RESNET_STAGE_BLOCKS[depth], **overrides)


def tiny_config(**overrides) -> DetectorConfig:
  """A very small detector of the same architecture, for tests and smoke runs."""
  values = dict(stage_blocks=(1, 1, 1), res5_blocks=1, stem_channels=8, res2_channels=16,
                bottleneck_channels=4, rpn_channels=16, anchor_sizes=(16.0, 32.0),
                pre_nms_topk=300, post_nms_topk=120, num_classes=6, num_attributes=4,
                roi_chunk=64, nms_candidates=256, min_size=128, max_size=192)
  values.update(overrides)
  return DetectorConfig(**values)


def trunk_feature_size(cfg: DetectorConfig, height: int, width: int) -> tuple[int, int]:
  """Height and width of the res4 feature map for an input of the given size."""
  def one(n: int) -> int:
    n = (n + 2 * 3 - 7) // 2 + 1  # stem conv 7x7, stride 2, padding 3
    n = (n - 2) // 2 + 1 if cfg.caffe_maxpool else (n - 1) // 2 + 1  # 3x3 max pool, stride 2
    for _ in cfg.stage_blocks[1:]:
      n = (n - 1) // 2 + 1  # a stride-2 stage
    return n
  return one(height), one(width)
