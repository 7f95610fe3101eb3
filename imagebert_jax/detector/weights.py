"""Loads the detectron2-format conversion of the bottom-up-attention weights.

The public conversion (py-bottom-up-attention, e.g. `faster_rcnn_from_caffe_attr.pkl`) is a pickle
of a dict whose "model" entry maps detectron2 parameter names to NumPy arrays in PyTorch layout.
Names come from detectron2's ResNet (`backbone.stem.conv1`, `backbone.res{2..4}.{i}.conv{1,2,3}`,
`.shortcut`, each with `.weight` and a frozen batch norm `.norm.{weight,bias,running_mean,
running_var}`), its RPN head (`proposal_generator.rpn_head.{conv,objectness_logits,
anchor_deltas}.{weight,bias}`), the C4 RoI head (`roi_heads.res5.{i}...`) and the box predictor
of the attribute variant (`roi_heads.box_predictor.{cls_score,bbox_pred,fc_attr,attr_score}.
{weight,bias}`, `roi_heads.box_predictor.cls_embedding.weight`).

The expected key set and shapes are derived from the config (`model.module_specs`), so the same
check covers the full model and tiny test configs. Batch-norm running statistics may be absent
(detectron2 then uses mean 0, variance 1, as for Caffe2 checkpoints); `num_batches_tracked`
entries are ignored; stored anchors (`proposal_generator.anchor_generator.cell_anchors.0`, saved by
some detectron2 versions) must match the config's anchors.
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from imagebert_jax import paths
from imagebert_jax.detector.boxes import cell_anchors
from imagebert_jax.detector.config import DetectorConfig
from imagebert_jax.detector.model import Params, module_specs
from imagebert_jax.errors import WeightsError

_OPTIONAL_SUFFIXES = (".norm.running_mean", ".norm.running_var")
_ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"


def expected_keys(cfg: DetectorConfig) -> dict[str, tuple[int, ...]]:
  """Every detectron2 key the config needs, with its PyTorch-layout shape."""
  keys = {}
  for name, spec in module_specs(cfg).items():
    if spec.kind == "conv_bn":
      out_ch = spec.shape[0]
      keys[f"{name}.weight"] = spec.shape
      for part in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.norm.{part}"] = (out_ch,)
    elif spec.kind in ("conv", "linear"):
      keys[f"{name}.weight"] = spec.shape
      keys[f"{name}.bias"] = (spec.shape[0],)
    else:
      keys[f"{name}.weight"] = spec.shape
  return keys


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The name -> array mapping stored in a detectron2 .pkl (or a plain pickled state dict)."""
  try:
    with paths.open(path, "rb") as f:
      data = pickle.load(f, encoding="latin1")
  except FileNotFoundError:
    raise WeightsError(f"weights {path}: no such file") from None
  except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
    raise WeightsError(f"weights {path}: not a readable pickle ({type(e).__name__}: {e})") from None
  if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
    data = data["model"]
  if not isinstance(data, Mapping):
    raise WeightsError(f"weights {path}: expected a dict of arrays, got {type(data).__name__}")
  out = {}
  for key, value in data.items():
    key = str(key)
    if key.startswith("module."):
      key = key[len("module."):]
    out[key] = _to_numpy(value)
  return out


def _listing(items: list[str], limit: int = 12) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(state: Mapping[str, np.ndarray], cfg: DetectorConfig,
                     source: str = "weights") -> None:
  """Raises one WeightsError listing missing keys, unexpected keys and shape mismatches."""
  expected = expected_keys(cfg)
  ignored = {k for k in state if k.endswith("num_batches_tracked") or k == _ANCHOR_KEY}
  # Listed in model order (missing, mismatched) and file order (unexpected).
  missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
  unexpected = [k for k in state if k not in expected and k not in ignored]
  mismatched = [f"{k} {tuple(state[k].shape)} (want {expected[k]})"
                for k in expected if k in state and tuple(state[k].shape) != expected[k]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing keys [{_listing(missing)}]")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys [{_listing(unexpected)}]")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches [{_listing(mismatched)}]")
  if _ANCHOR_KEY in state:
    want = cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)
    got = np.asarray(state[_ANCHOR_KEY], np.float32)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-2):
      problems.append(f"stored anchors {_ANCHOR_KEY} differ from the config's anchor_sizes "
                      f"{cfg.anchor_sizes} x anchor_ratios {cfg.anchor_ratios}")
  if problems:
    raise WeightsError(f"{source} do not match the detector config: " + "; ".join(problems))


def convert_state_dict(state: Mapping[str, np.ndarray], cfg: DetectorConfig) -> Params:
  """detectron2 arrays (PyTorch layout) -> the detector's parameters (call check first)."""
  params: Params = {}
  for name, spec in module_specs(cfg).items():
    w = np.asarray(state[f"{name}.weight"], np.float32)
    if spec.kind in ("conv_bn", "conv"):
      kernel = np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
      if spec.kind == "conv":
        params[name] = {"kernel": kernel, "bias": np.asarray(state[f"{name}.bias"], np.float32)}
      else:
        out_ch = spec.shape[0]
        gamma = np.asarray(state[f"{name}.norm.weight"], np.float64)
        beta = np.asarray(state[f"{name}.norm.bias"], np.float64)
        mean = np.asarray(state.get(f"{name}.norm.running_mean", np.zeros(out_ch)), np.float64)
        var = np.asarray(state.get(f"{name}.norm.running_var", np.ones(out_ch)), np.float64)
        scale = gamma / np.sqrt(var + cfg.bn_eps)
        params[name] = {"kernel": kernel, "scale": scale.astype(np.float32),
                        "shift": (beta - mean * scale).astype(np.float32)}
    elif spec.kind == "linear":
      params[name] = {"kernel": np.ascontiguousarray(w.T),
                      "bias": np.asarray(state[f"{name}.bias"], np.float32)}
    else:
      params[name] = {"embedding": w}
  return {k: {n: jnp.asarray(v) for n, v in d.items()} for k, d in params.items()}


def load_detectron2_weights(path: str, cfg: DetectorConfig) -> Params:
  """Reads, checks and converts a detectron2-format weight file for `cfg`."""
  state = read_state_dict(path)
  check_state_dict(state, cfg, source=f"weights {path}")
  return convert_state_dict(state, cfg)


def export_state_dict(params: Params, cfg: DetectorConfig) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict` (with identity running statistics), e.g. for tests."""
  state = {}
  for name, spec in module_specs(cfg).items():
    p = {k: np.asarray(v) for k, v in params[name].items()}
    if spec.kind in ("conv_bn", "conv"):
      state[f"{name}.weight"] = np.transpose(p["kernel"], (3, 2, 0, 1))
      if spec.kind == "conv":
        state[f"{name}.bias"] = p["bias"]
      else:
        state[f"{name}.norm.weight"] = p["scale"] * np.float32(np.sqrt(1.0 + cfg.bn_eps))
        state[f"{name}.norm.bias"] = p["shift"]
        state[f"{name}.norm.running_mean"] = np.zeros_like(p["shift"])
        state[f"{name}.norm.running_var"] = np.ones_like(p["shift"])
    elif spec.kind == "linear":
      state[f"{name}.weight"] = p["kernel"].T
      state[f"{name}.bias"] = p["bias"]
    else:
      state[f"{name}.weight"] = p["embedding"]
  return state
