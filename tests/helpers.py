"""Small shared pieces for the tests: a tiny model config and a random batch."""

import socket

import numpy as np

from imagebert_jax.model import ModelConfig

TINY = ModelConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                   max_text_len=10, max_regions=8, region_feature_dim=12, num_object_classes=7,
                   max_position_embeddings=32, dropout_rate=0.0, attention_dropout_rate=0.0)
PAD, CLS, SEP, MASK = 0, 2, 3, 4
RANDOM_RANGE = (5, 60)


def random_batch(rng: np.random.Generator, batch: int, cfg: ModelConfig = TINY,
                 distinct_images: bool = True) -> dict:
  """A batch in the pipeline's layout with random lengths (at least one word, one region)."""
  t, r = cfg.max_text_len, cfg.max_regions
  ids = np.full((batch, t), PAD, np.int32)
  for i in range(batch):
    n = rng.integers(1, t - 1)  # words
    ids[i, 0] = CLS
    ids[i, 1:n + 1] = rng.integers(*RANDOM_RANGE, size=n)
    ids[i, n + 1] = SEP
  keys = np.arange(batch) if distinct_images else rng.integers(0, max(batch // 2, 1), batch)
  return {
      "text_ids": ids,
      "region_feat": rng.normal(size=(batch, r, cfg.region_feature_dim)).astype(np.float32),
      "region_loc": rng.uniform(size=(batch, r, 5)).astype(np.float32),
      "num_regions": rng.integers(1, r + 1, size=batch).astype(np.int32),
      "region_class": rng.integers(0, cfg.num_object_classes, size=(batch, r)).astype(np.int32),
      "image_key": keys.astype(np.int32),
  }


def free_port() -> int:
  """A TCP port nothing listens on now (for a JAX coordinator the test starts)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
