"""Initialising the text side from a Hugging Face BERT checkpoint.

A checkpoint folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, which
needs PyTorch to read). Parameter names follow Hugging Face's BertModel (`embeddings.*`,
`encoder.layer.<i>.*`, `pooler.*`), optionally under `bert.`, with BertForPreTraining's masked
language model head (`cls.predictions.*`) used when present. Old TensorFlow conversions name the
LayerNorm parameters `gamma` and `beta`; both spellings are read.

What is filled: the word, position and segment embeddings and their LayerNorm, every encoder
layer, the pooler and, when the checkpoint has it, the MLM head. The region embedding, the
object and feature heads and the matching head are not in a BERT checkpoint and keep their fresh
initialisation. A vocabulary larger than the checkpoint's (padded for speed) gets zero rows past
the checkpoint's end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imagebert_jax import paths
from imagebert_jax.model.config import ModelConfig

# config.json key -> ModelConfig field that must agree.
_MUST_MATCH = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
               "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
               "type_vocab_size": "type_vocab_size"}


def read_config(path: str) -> dict:
  cfg_path = paths.join(path, "config.json")
  if not paths.isfile(cfg_path):
    raise FileNotFoundError(f"no config.json in {path}")
  return paths.read_json(cfg_path)


def _weights_file(path: str) -> str:
  for name in ("model.safetensors", "pytorch_model.bin"):
    if paths.isfile(paths.join(path, name)):
      return paths.join(path, name)
  raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")


def check_compatible(path: str, model: ModelConfig) -> None:
  """Raises ValueError naming the first size that differs between the checkpoint and the model."""
  hf = read_config(path)
  _weights_file(path)
  for hf_key, ours in _MUST_MATCH.items():
    if hf_key in hf and hf[hf_key] != getattr(model, ours):
      raise ValueError(f"config.model.{ours}={getattr(model, ours)} but the checkpoint's "
                       f"{hf_key} is {hf[hf_key]}")
  if model.vocab_size and hf.get("vocab_size", 0) > model.vocab_size:
    raise ValueError(f"config.model.vocab_size={model.vocab_size} is smaller than the "
                     f"checkpoint's {hf['vocab_size']}")
  if hf.get("max_position_embeddings", model.max_position_embeddings) < model.max_text_len:
    raise ValueError(f"config.model.max_text_len={model.max_text_len} exceeds the checkpoint's "
                     f"{hf['max_position_embeddings']} positions")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"the checkpoint's hidden_act is {act!r}; this model uses exact GELU")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("the checkpoint uses relative position embeddings; this model uses "
                     "absolute ones")


def load_weights(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as NumPy arrays, names without a `bert.` prefix."""
  file = _weights_file(path)
  if file.endswith(".safetensors"):
    from safetensors.numpy import load
    raw = load(paths.read_bytes(file))
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{file}: reading pytorch_model.bin needs PyTorch; install it or save "
                        "the checkpoint as model.safetensors") from e
    import io
    state = torch.load(io.BytesIO(paths.read_bytes(file)), map_location="cpu", weights_only=True)
    raw = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  out = {}
  for name, value in raw.items():
    name = name[len("bert."):] if name.startswith("bert.") else name
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias")
    out[name] = np.asarray(value)
  return out


def convert(weights: dict[str, np.ndarray], model: ModelConfig) -> dict[tuple, np.ndarray]:
  """BERT tensors -> this model's parameters, keyed by their path (strings)."""
  h, n, d = model.hidden_size, model.num_heads, model.head_dim

  def get(name):
    if name not in weights:
      raise KeyError(f"the checkpoint lacks {name}")
    return weights[name].astype(np.float32)

  def linear(prefix):
    return get(prefix + ".weight").T, get(prefix + ".bias")

  def norm(prefix):
    return get(prefix + ".weight"), get(prefix + ".bias")

  out: dict[tuple, np.ndarray] = {}
  word = get("embeddings.word_embeddings.weight")
  out[("word", "embedding")] = word
  out[("position", "embedding")] = get("embeddings.position_embeddings.weight")
  out[("segment", "embedding")] = get("embeddings.token_type_embeddings.weight")
  out[("text_norm", "scale")], out[("text_norm", "bias")] = norm("embeddings.LayerNorm")
  for i in range(model.num_layers):
    p = f"encoder.layer.{i}."
    layer = ("encoder", "layers", str(i))
    qkv_w, qkv_b = zip(*(linear(p + f"attention.self.{x}") for x in ("query", "key", "value")))
    out[layer + ("attention", "qkv", "kernel")] = np.stack(
        [w.reshape(h, n, d) for w in qkv_w], axis=1)
    out[layer + ("attention", "qkv", "bias")] = np.stack([b.reshape(n, d) for b in qkv_b])
    out[layer + ("attention", "out", "kernel")], out[layer + ("attention", "out", "bias")] = \
        linear(p + "attention.output.dense")
    out[layer + ("attention_norm", "scale")], out[layer + ("attention_norm", "bias")] = \
        norm(p + "attention.output.LayerNorm")
    out[layer + ("mlp_in", "kernel")], out[layer + ("mlp_in", "bias")] = \
        linear(p + "intermediate.dense")
    out[layer + ("mlp_out", "kernel")], out[layer + ("mlp_out", "bias")] = \
        linear(p + "output.dense")
    out[layer + ("mlp_norm", "scale")], out[layer + ("mlp_norm", "bias")] = \
        norm(p + "output.LayerNorm")
  if "pooler.dense.weight" in weights:
    out[("pooler", "kernel")], out[("pooler", "bias")] = linear("pooler.dense")
  if "cls.predictions.transform.dense.weight" in weights:
    out[("mlm_transform", "dense", "kernel")], out[("mlm_transform", "dense", "bias")] = \
        linear("cls.predictions.transform.dense")
    out[("mlm_transform", "norm", "scale")], out[("mlm_transform", "norm", "bias")] = \
        norm("cls.predictions.transform.LayerNorm")
    out[("mlm_bias",)] = get("cls.predictions.bias")
  return out


def initial_params(path: str, model: ModelConfig, shapes: dict[tuple, Any]
                   ) -> tuple[dict[tuple, np.ndarray], list[str]]:
  """The BERT checkpoint's weights for the model's parameters, as host arrays shaped like
  `shapes` (path -> anything with .shape and .dtype). Returns (arrays by path, the model's paths
  it has no weights for). Vocabulary rows past the checkpoint's (a padded vocabulary) are zero:
  no token maps to them and they are never predicted."""
  check_compatible(path, model)
  converted = convert(load_weights(path), model)
  out = {}
  for key, value in converted.items():
    if key not in shapes:
      raise KeyError(f"converted BERT parameter {'/'.join(key)} has no place in the model")
    shape, dtype = tuple(shapes[key].shape), shapes[key].dtype
    if value.shape != shape:
      if key in (("word", "embedding"), ("mlm_bias",)) and value.shape[1:] == shape[1:] \
          and value.shape[0] < shape[0]:
        value = np.concatenate([value, np.zeros((shape[0] - value.shape[0],) + shape[1:],
                                                value.dtype)], axis=0)
      elif key == ("position", "embedding") and value.shape[0] > shape[0]:
        value = value[:shape[0]]
      else:
        raise ValueError(f"{'/'.join(key)}: checkpoint shape {value.shape}, model {shape}")
    out[key] = value.astype(dtype)
  left = sorted("/".join(k) for k in shapes if k not in converted)
  return out, left
