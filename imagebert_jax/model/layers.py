"""Small NNX layers whose weights carry logical axis names.

Every `nnx.Param` here has `logical_axes` metadata, one name per dimension, which
`imagebert_jax.parallel` maps to mesh axes through the config's rules table. Parameters are stored
in `param_dtype` and cast to the compute `dtype` at use; LayerNorm statistics and softmax run in
float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def normal(stddev: float):
  return jax.nn.initializers.normal(stddev)


class Dense(nnx.Module):
  """y = x W + b over the last axis, W of shape [in, *out_shape]."""

  def __init__(self, in_features: int, out_shape: int | Sequence[int], *,
               axes: Sequence[str | None], rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, stddev: float = 0.02, use_bias: bool = True):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    if len(axes) != 1 + len(out_shape):
      raise ValueError(f"axes {axes} do not match kernel shape ({in_features}, *{out_shape})")
    self.out_shape = out_shape
    self.dtype = dtype
    self.kernel = nnx.Param(
        normal(stddev)(rngs.params(), (in_features, *out_shape), param_dtype),
        logical_axes=tuple(axes))
    self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype),
                          logical_axes=tuple(axes[1:])) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel,
                            (((x.ndim - 1,), (0,)), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, axis_name: str = "embed"):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table [num, features]; `attend` is the tied output projection."""

  def __init__(self, num: int, features: int, *, axes: tuple[str | None, str | None],
               rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               stddev: float = 0.02):
    self.dtype = dtype
    self.embedding = nnx.Param(normal(stddev)(rngs.params(), (num, features), param_dtype),
                               logical_axes=axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array, dtype: Any = None) -> jax.Array:
    """x @ table.T, in `dtype` (the layer's compute dtype unless given)."""
    dtype = dtype or self.dtype
    return jnp.einsum("...d,vd->...v", x.astype(dtype), self.embedding[...].astype(dtype))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None (evaluation) or the rate is 0.

  Each element draws 16 random bits and is dropped when they fall below round(rate x 2^16): the
  rate exact to 2^-16 (0.1 drops 6,554 / 65,536 = 0.10001), for half the random bits of a
  float32 uniform (`jax.random.bernoulli`), which matters where dropout acts on the attention
  probabilities (B x heads x L x L elements per layer; `_bits16`). Kept values are scaled by one
  over the kept share, so the expectation is unchanged."""
  if key is None or rate == 0.0:
    return x
  threshold = min(round(rate * 65536), 65535)
  if threshold == 0:
    return x
  keep = _bits16(key, x.shape) >= jnp.uint16(threshold)
  scale = 65536.0 / (65536 - threshold)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x)).astype(x.dtype)


def _bits16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform 16-bit values of `shape`: each 32-bit word the generator makes gives two (asked for
  uint16 directly, JAX makes one word per value and drops half of it). The leading dimensions
  are drawn as they are, so a batch-sharded shape stays sharded."""
  if not shape or 0 in shape:  # a scalar, or nothing to draw (e.g. an image side of no regions)
    return jax.random.bits(key, shape, jnp.uint16)
  last = shape[-1]
  words = jax.random.bits(key, (*shape[:-1], (last + 1) // 2), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last / 2), 2]
  return halves.reshape(*shape[:-1], -1)[..., :last]


class KeySplitter:
  """Hands out independent dropout keys from one key; yields None when evaluating."""

  def __init__(self, key: jax.Array | None):
    self._key = key
    self._count = 0

  def __call__(self) -> jax.Array | None:
    if self._key is None:
      return None
    self._count += 1
    return jax.random.fold_in(self._key, self._count)
