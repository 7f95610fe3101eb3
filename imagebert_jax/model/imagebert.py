"""ImageBERT: a single-stream BERT over WordPiece tokens and image regions (Qi et al., 2020).

Sequence: `[CLS] w1 .. wn [SEP] r1 .. rk`. Text positions get word + position + segment A
embeddings; every region gets Dense(feature) + Dense(5-d location) + segment B + one shared
learned "dummy" position, each side with its own LayerNorm. A post-LayerNorm BERT encoder runs over
the concatenation; the pooler (Dense + tanh over [CLS]) feeds the image-text matching score.

Pretraining heads: masked language modelling (decoder tied to the word embeddings), masked object
classification and masked region feature regression (each a Dense-GELU-LayerNorm transform and a
projection computed in float32, whatever the compute dtype).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagebert_jax import parallel
from imagebert_jax.model.config import ModelConfig
from imagebert_jax.model.encoder import ACT, Encoder, resolve_attention_impl
from imagebert_jax.model.layers import Dense, Embed, KeySplitter, LayerNorm, dropout

TEXT_SEGMENT, REGION_SEGMENT = 0, 1


class Transform(nnx.Module):
  """Dense(H -> H), GELU, LayerNorm: the BERT prediction-head transform.

  The Dense runs in the compute dtype; the LayerNorm (float32 inside) hands its output on in
  float32, so the head's final projection sees it unrounded.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # The output stays in the embedding space (LayerNorm over it, then the tied decoder), so
    # only the input dimension is sharded: a tensor-sharded output here would put the hidden
    # dimension on two different mesh axes at the decoder.
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), rngs=rngs,
                       dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                       stddev=cfg.initializer_range)
    self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=jnp.float32,
                          param_dtype=cfg.weight_dtype)

  def __call__(self, x):
    return self.norm(jax.nn.gelu(self.dense(x), approximate=False))


def pack_order(text_len: jax.Array, num_regions: jax.Array, text_width: int,
               region_width: int) -> tuple[jax.Array, jax.Array]:
  """Gather indices that move padding to the end of each [text | regions] sequence.

  Returns (pack_idx [B, T+R]: packed position -> position in the padded concatenation,
           region_at [B, R]: region r -> its packed position).
  """
  length = text_width + region_width
  j = jnp.arange(length)[None, :]
  t = text_len[:, None]
  n = num_regions[:, None]
  pack_idx = jnp.where(j < t, j, jnp.where(j < t + n, text_width + j - t, length - 1))
  region_at = jnp.minimum(t + jnp.arange(region_width)[None, :], length - 1)
  return pack_idx.astype(jnp.int32), region_at.astype(jnp.int32)


class ImageBert(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dt, pdt, std = cfg.compute_dtype, cfg.weight_dtype, cfg.initializer_range
    h = cfg.hidden_size
    # Embeddings.
    self.word = Embed(cfg.vocab_size, h, axes=("vocab", "embed"), rngs=rngs, dtype=dt,
                      param_dtype=pdt, stddev=std)
    self.position = Embed(cfg.max_position_embeddings, h, axes=(None, "embed"), rngs=rngs,
                          dtype=dt, param_dtype=pdt, stddev=std)
    self.segment = Embed(cfg.type_vocab_size, h, axes=(None, "embed"), rngs=rngs, dtype=dt,
                         param_dtype=pdt, stddev=std)
    self.text_norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
    d = cfg.region_feature_dim
    self.region_input_norm = LayerNorm(d, eps=1e-6, dtype=dt, param_dtype=pdt, axis_name="feature") \
        if cfg.region_input_norm == "layernorm" else None
    if cfg.region_input_norm == "standardise":
      # Per-dimension statistics of the training data's features (set when a model starts from
      # scratch, see `set_feature_statistics`), kept in checkpoints and never trained.
      self.region_feature_mean = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("feature",))
      self.region_feature_scale = nnx.Param(jnp.ones((d,), jnp.float32), logical_axes=("feature",))
    self.region_feature = Dense(cfg.region_feature_dim, h, axes=("feature", "embed"), rngs=rngs,
                                dtype=dt, param_dtype=pdt, stddev=std)
    self.region_location = Dense(5, h, axes=(None, "embed"), rngs=rngs, dtype=dt,
                                 param_dtype=pdt, stddev=std)
    if cfg.region_part_norms:
      self.region_feature_norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
      self.region_location_norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
    else:
      self.region_feature_norm = self.region_location_norm = None
    self.region_position = nnx.Param(
        jax.random.normal(rngs.params(), (h,), pdt) * std, logical_axes=("embed",))
    self.region_norm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
    # Encoder and pooler.
    self.encoder = Encoder(cfg, rngs=rngs)
    # The pooler and the matching head compute in float32: retrieval ranks by this score, and
    # ties from a bfloat16 score would be common among thousands of candidates.
    self.pooler = Dense(h, h, axes=("embed", None), rngs=rngs, dtype=jnp.float32,
                        param_dtype=pdt, stddev=std)
    # Heads.
    self.itm = Dense(h, 1, axes=("embed", None), rngs=rngs, dtype=jnp.float32, param_dtype=pdt,
                     stddev=std)
    # Contrastive head: one projection per modality and a learned logit scale (CLIP's 1/0.07).
    self.itc_text = Dense(h, cfg.itc_dim, axes=("embed", None), rngs=rngs, dtype=jnp.float32,
                          param_dtype=pdt, stddev=std)
    self.itc_image = Dense(h, cfg.itc_dim, axes=("embed", None), rngs=rngs, dtype=jnp.float32,
                           param_dtype=pdt, stddev=std)
    self.itc_log_scale = nnx.Param(jnp.full((), math.log(1 / 0.07), pdt), logical_axes=())
    self.mlm_transform = Transform(cfg, rngs=rngs)
    self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), pdt), logical_axes=("vocab",))
    # The pretraining heads' final projections compute in float32 too (operands, accumulation
    # and output), like the pooler: they are a small share of the step (the decoder runs on the
    # masked positions only) and their logits feed softmaxes over up to 30K classes.
    self.moc_transform = Transform(cfg, rngs=rngs)
    self.moc = Dense(h, cfg.num_object_classes, axes=("embed", "classes"), rngs=rngs,
                     dtype=jnp.float32, param_dtype=pdt, stddev=std)
    self.mrfr_transform = Transform(cfg, rngs=rngs)
    self.mrfr = Dense(h, cfg.region_feature_dim, axes=("embed", "feature"), rngs=rngs,
                      dtype=jnp.float32, param_dtype=pdt, stddev=std)

  # ---------------------------------------------------------------------------------------------
  def embed_text(self, text_ids: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    positions = jnp.arange(text_ids.shape[1])
    x = (self.word(text_ids) + self.position(positions)[None]
         + self.segment(jnp.asarray(TEXT_SEGMENT))[None, None])
    return dropout(self.text_norm(x), cfg.dropout_rate, dropout_key)

  def project_regions(self, region_feat: jax.Array, region_loc: jax.Array) -> jax.Array:
    """The regions' input embeddings before dropout [B, R, H]: a function of the image alone, so
    a batch's images are projected once for every pair and pass they take part in (`encode`'s
    `regions`)."""
    cfg = self.cfg
    if cfg.region_input_norm == "standardise":
      mean = jax.lax.stop_gradient(self.region_feature_mean[...])
      scale = jax.lax.stop_gradient(self.region_feature_scale[...])
      region_feat = (region_feat.astype(jnp.float32) - mean) * scale
    elif self.region_input_norm is not None:
      region_feat = self.region_input_norm(region_feat)
    feat, loc = self.region_feature(region_feat), self.region_location(region_loc)
    if self.region_feature_norm is not None:
      feat, loc = self.region_feature_norm(feat), self.region_location_norm(loc)
    x = (feat + loc + self.segment(jnp.asarray(REGION_SEGMENT))[None, None]
         + self.region_position[...].astype(cfg.compute_dtype)[None, None])
    return self.region_norm(x)

  def encode(self, text_ids: jax.Array, text_mask: jax.Array, region_feat: jax.Array | None,
             region_loc: jax.Array | None, region_mask: jax.Array, *,
             dropout_key: jax.Array | None = None, pack: bool | None = None,
             regions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Runs the encoder. Returns (text hidden [B, T, H], region hidden [B, R, H]).

    text_ids [B, T] int; text_mask [B, T] bool (a valid prefix); region_feat [B, R, D];
    region_loc [B, R, 5]; region_mask [B, R] bool (a valid prefix); or instead of the features
    and locations, `regions` [B, R, H], their `project_regions` (the same function, computed
    once per image). Hidden states at padded positions are unspecified. `dropout_key=None`
    evaluates deterministically. With `pack` (always when cuDNN attention is used) padding is
    moved to the end of the sequence before the encoder and back after it; the result is the
    same function.
    """
    cfg = self.cfg
    impl = resolve_attention_impl(
        cfg, attention_dropout=dropout_key is not None and cfg.attention_dropout_rate > 0)
    pack = impl == "cudnn" if pack is None else (pack or impl == "cudnn")
    keys = KeySplitter(dropout_key)
    t = self.embed_text(text_ids, keys())
    if regions is None:
      regions = self.project_regions(region_feat, region_loc)
    r = dropout(regions, cfg.dropout_rate, keys())
    width_t, width_r = text_ids.shape[1], r.shape[1]
    text_len = text_mask.sum(-1).astype(jnp.int32)
    num_regions = region_mask.sum(-1).astype(jnp.int32)
    first = cfg.separate_layers
    if first:  # each modality alone through the first layers
      t = self.encoder(t, text_mask, text_len, impl, keys, stop=first)
      if width_r:
        r = self.encoder(r, region_mask, num_regions, impl, keys, stop=first)
    x = parallel.constrain(jnp.concatenate([t, r], axis=1), ACT)
    if pack:
      pack_idx, region_at = pack_order(text_len, num_regions, width_t, width_r)
      x = jnp.take_along_axis(x, pack_idx[..., None], axis=1)
      kv_lengths = text_len + num_regions
      mask = jnp.arange(width_t + width_r)[None, :] < kv_lengths[:, None]
      x = self.encoder(x, mask, kv_lengths, impl, keys, start=first)
      text_h = x[:, :width_t]
      region_h = jnp.take_along_axis(x, region_at[..., None], axis=1)
    else:
      mask = jnp.concatenate([text_mask, region_mask], axis=1)
      x = self.encoder(x, mask, None, impl, keys, start=first)
      text_h, region_h = x[:, :width_t], x[:, width_t:]
    return text_h, region_h

  def pooled(self, text_h: jax.Array) -> jax.Array:
    """tanh(Dense([CLS])), float32."""
    return jnp.tanh(self.pooler(text_h[:, 0]))

  def itm_logit(self, text_h: jax.Array, region_h: jax.Array | None = None,
                region_mask: jax.Array | None = None,
                text_mask: jax.Array | None = None) -> jax.Array:
    """The image-text matching score (a logit): [B], float32. From [CLS] (tanh of the pooler);
    with `itm_pool` 'cls+max', the pooler's [CLS] plus the per-dimension maximum of the pooler
    over the region states (which have attended to the words) before the tanh."""
    if self.cfg.itm_pool == "cls":
      return self.itm(self.pooled(text_h))[..., 0]
    pooled = self.pooler(text_h[:, 0])
    projected = jnp.where(region_mask[..., None], self.pooler(region_h), -jnp.inf)
    region_max = jnp.where(region_mask.any(1)[:, None], jnp.max(projected, axis=1), 0.0)
    if self.cfg.itm_pool == "cls*max":
      return self.itm(jnp.tanh(pooled) * jnp.tanh(region_max))[..., 0]
    if self.cfg.itm_pool == "align":
      return self.itm(jnp.tanh(pooled))[..., 0] + self.itc_scale() * self.word_region_alignment(
          text_h, region_h, region_mask, text_mask)
    if self.cfg.itm_pool == "itc":
      text = _normalise(self.itc_text(text_h[:, 0]))
      image = jnp.where(region_mask[..., None], self.itc_image(region_h), -jnp.inf)
      image = _normalise(jnp.where(region_mask.any(1)[:, None], jnp.max(image, axis=1), 0.0))
      return self.itm(jnp.tanh(pooled))[..., 0] + self.itc_scale() * jnp.sum(text * image, -1)
    return self.itm(jnp.tanh(pooled + region_max))[..., 0]

  def word_region_alignment(self, text_h: jax.Array, region_h: jax.Array,
                            region_mask: jax.Array, text_mask: jax.Array) -> jax.Array:
    """How well each word finds a region [B], float32: each word state (after [CLS]) and each
    region state of the joint pass through the contrastive heads, L2-normalised; for each word
    the best cosine over the regions, averaged over the words."""
    words = _normalise(self.itc_text(text_h))
    regions = _normalise(self.itc_image(region_h))
    sim = jnp.einsum("btd,brd->btr", words, regions)
    best = jnp.max(jnp.where(region_mask[:, None, :], sim, -1.0), axis=-1)
    counted = text_mask.at[:, 0].set(False).astype(jnp.float32)
    return jnp.sum(best * counted, -1) / jnp.maximum(jnp.sum(counted, -1), 1.0)

  # Contrastive (single-modality) embeddings ----------------------------------------------------
  def text_embedding(self, text_ids: jax.Array, text_mask: jax.Array, *,
                     dropout_key: jax.Array | None = None) -> jax.Array:
    """The encoder over the text alone; [CLS] projected and L2-normalised: [B, itc_dim], f32."""
    b = text_ids.shape[0]
    no_regions = jnp.zeros((b, 0, self.cfg.region_feature_dim), self.cfg.compute_dtype)
    text_h, _ = self.encode(text_ids, text_mask, no_regions, jnp.zeros((b, 0, 5), jnp.float32),
                            jnp.zeros((b, 0), bool), dropout_key=dropout_key)
    return _normalise(self.itc_text(text_h[:, 0]))

  def image_embedding(self, region_feat: jax.Array | None, region_loc: jax.Array | None,
                      region_mask: jax.Array, cls_sep: tuple[int, int], *,
                      dropout_key: jax.Array | None = None,
                      regions: jax.Array | None = None) -> jax.Array:
    """The encoder over `[CLS] [SEP]` and the regions (or their `project_regions`, `regions`);
    [CLS] projected (with `itc_image_pool` 'cls+max', plus the per-dimension maximum of the
    projected region states) and L2-normalised: [B, itc_dim], f32."""
    b = region_mask.shape[0]
    text_ids = jnp.broadcast_to(jnp.asarray(cls_sep, jnp.int32), (b, 2))
    text_h, region_h = self.encode(text_ids, jnp.ones((b, 2), bool), region_feat, region_loc,
                                   region_mask, dropout_key=dropout_key, regions=regions)
    e = self.itc_image(text_h[:, 0])
    if self.cfg.itc_image_pool == "cls+max":
      projected = jnp.where(region_mask[..., None], self.itc_image(region_h), -jnp.inf)
      e = e + jnp.where(region_mask.any(1)[:, None], jnp.max(projected, axis=1), 0.0)
    return _normalise(e)

  def itc_scale(self) -> jax.Array:
    """The contrastive logit scale, at most 100 (as CLIP clamps it)."""
    return jnp.exp(jnp.minimum(self.itc_log_scale[...].astype(jnp.float32), math.log(100.0)))

  def retrieval_cosine_weight(self) -> jax.Array:
    """What retrieval adds to the matching logit per unit of the embeddings' cosine:
    `retrieval_itc_weight` x the contrastive scale (ModelConfig)."""
    return self.cfg.retrieval_itc_weight * self.itc_scale()

  def mlm_logits(self, h: jax.Array) -> jax.Array:
    """Masked-token logits over the vocabulary (decoder tied to the word embeddings), float32."""
    return (self.word.attend(self.mlm_transform(h), dtype=jnp.float32)
            + self.mlm_bias[...].astype(jnp.float32))

  def moc_logits(self, h: jax.Array) -> jax.Array:
    """Masked-region class logits, float32."""
    return self.moc(self.moc_transform(h))

  def mrfr_prediction(self, h: jax.Array) -> jax.Array:
    """Masked-region feature predictions, float32."""
    return self.mrfr(self.mrfr_transform(h))

  def __call__(self, text_ids, text_mask, region_feat, region_loc, region_mask, *,
               dropout_key=None):
    """The matching logit of each (text, regions) pair: the retrieval cross-encoder."""
    text_h, region_h = self.encode(text_ids, text_mask, region_feat, region_loc, region_mask,
                                   dropout_key=dropout_key)
    return self.itm_logit(text_h, region_h, region_mask, text_mask)


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
