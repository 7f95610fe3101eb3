"""ImageBERT in Flax NNX. Imports without TensorFlow."""

from imagebert_jax.model.config import ModelConfig
from imagebert_jax.model.imagebert import ImageBert, pack_order

__all__ = ["ImageBert", "ModelConfig", "pack_order"]
