"""The model's static description, built from the run config's `model` field."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and numerics of ImageBERT. Frozen, so it can be a static argument of jit."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_text_len: int = 44  # [CLS] + words + [SEP]
  max_regions: int = 100
  region_feature_dim: int = 2048
  num_object_classes: int = 1600
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  # 'float32' or 'bfloat16': the dtype of activations and matrix products. Parameters stay in
  # `param_dtype` (the master weights) and are cast at use.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # 'auto' (cuDNN fused attention on GPU where it applies, XLA elsewhere), 'xla' or 'cudnn'.
  attention_impl: str = "auto"
  # The first `separate_layers` layers run on each modality alone (text over text, regions over
  # regions), the others over the joint sequence; 0, the paper's single stream: every layer
  # attends across. The same weights either way (a checkpoint loads under any value).
  separate_layers: int = 0
  # Recompute activations in the backward pass: 'none', 'full' (each layer) or 'dots'
  # (keep matrix-product outputs, recompute the element-wise work).
  remat: str = "none"
  # Region embedding normalisation (README, "Design notes"). The raw detector features are
  # non-negative, heavy-tailed and far from zero mean; before the projection they are
  # 'standardise'd per dimension with the training data's statistics (kept with the weights,
  # never trained), or 'layernorm'ed per region, or used as they are ('none'). With
  # region_part_norms, LayerNorms on the feature and box projections before they are summed
  # (without them the 5-d box is a hundredth of the feature's projection).
  region_input_norm: str = "none"
  region_part_norms: bool = False
  # The image-text contrastive head: [CLS] of the encoder run on one modality, projected to this
  # many dimensions and normalised (two-stage retrieval; an optional training objective).
  itc_dim: int = 256
  # The image's contrastive embedding: 'cls' ([CLS] projected) or 'cls+max' ([CLS] projected plus
  # the maximum over the regions of each projected region state, per dimension: the few salient
  # regions among many cluttered ones speak through the maximum, where attention starts as a
  # mean). The same projection either way: checkpoints load under both.
  itc_image_pool: str = "cls"
  # The matching logit (`ImageBert.itm_logit`; no new parameters in any): 'cls' (the head on
  # the pooler over [CLS], BERT's); 'cls+max' (the pooler's maximum over the region states added
  # to [CLS]'s before the tanh, as itc_image_pool); 'cls*max' (the two tanh'd and multiplied);
  # 'itc' (the [CLS] logit plus the contrastive scale times the cosine of the joint pass's [CLS]
  # and region maximum through the contrastive heads); 'align' (the [CLS] logit plus the
  # contrastive scale times how well each word of the joint pass finds a region:
  # `word_region_alignment`). docs/design_notes.md has what each measured.
  itm_pool: str = "cls"
  # Retrieval ranks candidates by the cross-encoder's matching logit plus this weight times the
  # contrastive logit (the learned scale times the embeddings' cosine) wherever both are
  # computed: 0 ranks by the matching logit alone (the paper); 1 adds the two logits (BLIP's
  # retrieval adds its matching score and the embeddings' similarity the same way).
  retrieval_itc_weight: float = 0.0

  @property
  def seq_len(self) -> int:
    return self.max_text_len + self.max_regions

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """From a ConfigDict or mapping; unknown keys are an error that names them."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"config.model: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**values)

  def validate(self) -> None:
    """Raises ValueError naming the config.model key that does not fit."""
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"config.model.num_heads={self.num_heads} does not divide "
          f"config.model.hidden_size={self.hidden_size}")
    if self.max_text_len < 3:
      raise ValueError(f"config.model.max_text_len={self.max_text_len}: need room for "
                       "[CLS], one word and [SEP]")
    if self.max_text_len > self.max_position_embeddings:
      raise ValueError(
          f"config.model.max_text_len={self.max_text_len} exceeds "
          f"config.model.max_position_embeddings={self.max_position_embeddings}")
    if self.max_regions < 1:
      raise ValueError(f"config.model.max_regions={self.max_regions}: need at least one region")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.model.{key}={getattr(self, key)!r}: want float32, bfloat16 "
                         "or float16")
    if self.attention_impl not in ("auto", "xla", "cudnn"):
      raise ValueError(f"config.model.attention_impl={self.attention_impl!r}: want auto, xla "
                       "or cudnn")
    if self.region_input_norm not in ("standardise", "layernorm", "none"):
      raise ValueError(f"config.model.region_input_norm={self.region_input_norm!r}: want "
                       "standardise, layernorm or none")
    if not self.retrieval_itc_weight >= 0.0:
      raise ValueError(f"config.model.retrieval_itc_weight={self.retrieval_itc_weight}: want a "
                       "weight >= 0")
    if self.itc_image_pool not in ("cls", "cls+max"):
      raise ValueError(f"config.model.itc_image_pool={self.itc_image_pool!r}: want cls or cls+max")
    if self.itm_pool not in ("cls", "cls+max", "cls*max", "itc", "align"):
      raise ValueError(f"config.model.itm_pool={self.itm_pool!r}: want cls, cls+max, cls*max, "
                       "itc or align")
    if self.itc_dim < 1:
      raise ValueError(f"config.model.itc_dim={self.itc_dim}: want a positive size")
    if not 0 <= self.separate_layers < self.num_layers:
      raise ValueError(f"config.model.separate_layers={self.separate_layers}: want 0 to "
                       f"num_layers - 1 ({self.num_layers - 1}): the last layers attend across")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"config.model.remat={self.remat!r}: want none, full or dots")
    for key in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f"config.model.{key}={getattr(self, key)}: want a rate in [0, 1)")
