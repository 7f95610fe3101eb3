"""The BERT encoder: post-LayerNorm Transformer layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagebert_jax import parallel
from imagebert_jax.model.config import ModelConfig
from imagebert_jax.model.layers import Dense, KeySplitter, LayerNorm, dropout

ACT = ("batch", "length", "act_embed")


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
                   kv_lengths: jax.Array | None, impl: str, dropout_rate: float,
                   dropout_key: jax.Array | None) -> jax.Array:
  """Softmax attention. q, k, v: [B, L, N, D]; mask: [B, L] bool over keys.

  With attention dropout active (training with a rate > 0) the probabilities are formed
  explicitly so dropout can act on them; otherwise `jax.nn.dot_product_attention` is used, through
  cuDNN's fused kernel when `impl` is 'cudnn' (keys must then be a valid prefix of length
  `kv_lengths`) and XLA's otherwise.
  """
  if dropout_key is not None and dropout_rate > 0.0:
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
      scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None, None, :], implementation="xla")


class SelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    self.cfg = cfg
    self.qkv = Dense(cfg.hidden_size, (3, cfg.num_heads, cfg.head_dim),
                     axes=("embed", None, "heads", "kv"), rngs=rngs, dtype=dt, param_dtype=pdt,
                     stddev=cfg.initializer_range)
    self.out = Dense(cfg.num_heads * cfg.head_dim, cfg.hidden_size, axes=("heads_kv", "embed"),
                     rngs=rngs, dtype=dt, param_dtype=pdt, stddev=cfg.initializer_range)

  def __call__(self, x, mask, kv_lengths, impl, dropout_key):
    qkv = self.qkv(x)  # [B, L, 3, N, D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention_core(q, k, v, mask=mask, kv_lengths=kv_lengths, impl=impl,
                         dropout_rate=self.cfg.attention_dropout_rate, dropout_key=dropout_key)
    return self.out(out.reshape(*out.shape[:2], -1))


class EncoderLayer(nnx.Module):
  """x -> LN(x + Drop(Attn(x))) -> LN(h + Drop(W2 gelu(W1 h)))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    self.cfg = cfg
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dt,
                                    param_dtype=pdt)
    self.mlp_in = Dense(cfg.hidden_size, cfg.mlp_dim, axes=("embed", "mlp"), rngs=rngs, dtype=dt,
                        param_dtype=pdt, stddev=cfg.initializer_range)
    self.mlp_out = Dense(cfg.mlp_dim, cfg.hidden_size, axes=("mlp", "embed"), rngs=rngs,
                         dtype=dt, param_dtype=pdt, stddev=cfg.initializer_range)
    self.mlp_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)

  def __call__(self, x, mask, kv_lengths, impl, keys: tuple):
    rate = self.cfg.dropout_rate
    h = self.attention(x, mask, kv_lengths, impl, keys[0])
    x = self.attention_norm(x + dropout(h, rate, keys[1]))
    h = jax.nn.gelu(self.mlp_in(x), approximate=False)
    h = self.mlp_out(h)
    x = self.mlp_norm(x + dropout(h, rate, keys[2]))
    return parallel.constrain(x, ACT)


def _layer_apply(layer: EncoderLayer, x, mask, kv_lengths, impl, keys):
  return layer(x, mask, kv_lengths, impl, keys)


class Encoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None, kv_lengths: jax.Array | None,
               impl: str, keys: KeySplitter, start: int = 0, stop: int | None = None) -> jax.Array:
    """Layers start..stop-1 (all by default) over x [B, L, H]."""
    apply = _layer_apply
    if self.cfg.remat == "full":
      apply = nnx.remat(_layer_apply, static_argnums=(4,))
    elif self.cfg.remat == "dots":
      apply = nnx.remat(_layer_apply, static_argnums=(4,),
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    for layer in list(self.layers)[start:stop]:
      x = apply(layer, x, mask, kv_lengths, impl, (keys(), keys(), keys()))
    return x


def resolve_attention_impl(cfg: ModelConfig, *, attention_dropout: bool = False) -> str:
  """'cudnn' on GPU in half precision when asked for or left to 'auto'; 'xla' otherwise, and
  whenever attention dropout acts (it needs the explicit path, which takes any mask)."""
  if cfg.attention_impl == "xla":
    return "xla"
  on_gpu = jax.default_backend() == "gpu"
  half = cfg.dtype in ("bfloat16", "float16")
  if cfg.attention_impl == "cudnn" and not (on_gpu and half):
    raise ValueError("config.model.attention_impl='cudnn' needs a GPU and "
                     "config.model.dtype bfloat16 or float16")
  return "cudnn" if (on_gpu and half and not attention_dropout) else "xla"

