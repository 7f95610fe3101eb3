"""Self-describing runs: the resolved config written beside the work a run produces.

`workdir/config.json` is the whole run config as it ran (references resolved, command-line
overrides applied), rewritten whenever a run starts. Each stage writes `workdir/<stage>/config.json`
when it starts: the run config again, plus what is only known once the data is open, so that the
stage folder alone rebuilds its model with no flags:

  stage, kind          the stage's name and kind
  model                config.model with the vocabulary size filled in (the ModelConfig fields)
  text                 the vocabulary, copied into the stage folder as `vocab.txt` (its SHA-256
                       and lower-casing beside it)
  data_options         the region selection the training data was built with (confidence
                       threshold, 10..100 boxes), applied again to new images' regions
  run_config           the run config

`config_digest` identifies a model description (its shapes and vocabulary; not its weights).
Everything goes through `etils.epath`, so a work directory may be a bucket URL. TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from etils import epath

from imagebert_jax import paths
from imagebert_jax.errors import RunConfigError
from imagebert_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"


def config_to_dict(config: Any) -> dict:
  """A ConfigDict (or mapping) as plain JSON-able values, references resolved."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(values, default=_plain))


def _plain(value: Any) -> Any:
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  return str(value)


def write_run_config(config: Any, workdir: str) -> epath.Path:
  path = epath.Path(workdir) / CONFIG_FILE
  paths.makedirs(workdir)
  paths.write_json(str(path), config_to_dict(config))
  return path


def write_stage_config(config: Any, name: str, workdir: str, *, vocab_size: int,
                       vocab_file: str, data_options: dict | None = None) -> epath.Path:
  """`workdir/<name>/config.json` and `workdir/<name>/vocab.txt` (process 0 calls this)."""
  stage_dir = epath.Path(workdir) / name
  stage_dir.mkdir(parents=True, exist_ok=True)
  run = config_to_dict(config)
  model = dict(run["model"])
  if not model.get("vocab_size"):
    model["vocab_size"] = int(vocab_size)
  model = dataclasses.asdict(ModelConfig.from_config(model))  # every field, defaults included
  vocab = epath.Path(vocab_file)
  local_vocab = stage_dir / VOCAB_FILE
  data = vocab.read_bytes()
  if not local_vocab.exists() or local_vocab.read_bytes() != data:
    local_vocab.write_bytes(data)
  value = {
      "stage": name,
      "kind": run["stages"][name]["kind"],
      "model": model,
      "text": {"vocab_file": VOCAB_FILE, "vocab_sha256": hashlib.sha256(data).hexdigest(),
               "lowercase": bool(run.get("text", {}).get("lowercase", True))},
      "data_options": dict(data_options or {}),
      "run_config": run,
  }
  path = stage_dir / CONFIG_FILE
  paths.write_json(str(path), value)
  return path


def read_json(path: str | epath.Path) -> dict:
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RunConfigError(f"{path}: not valid JSON ({e})") from None


def is_stage_config(value: dict) -> bool:
  return "stage" in value and "model" in value


def read_stage_config(stage_dir: str | epath.Path) -> dict:
  """The stage's config.json; RunConfigError (one line) when it is missing or incomplete."""
  stage_dir = epath.Path(stage_dir)
  path = stage_dir / CONFIG_FILE
  if not path.exists():
    raise RunConfigError(
        f"{stage_dir}: no {CONFIG_FILE} describing the model of this checkpoint (a run writes "
        "it when a stage starts: rerun the run's command on its work directory, which skips "
        "finished stages and writes their missing config.json)")
  value = read_json(path)
  if not is_stage_config(value):
    raise RunConfigError(f"{path}: not a stage config (it has no 'stage' and 'model' entries)")
  try:
    ModelConfig.from_config(value["model"]).validate()
  except ValueError as e:
    raise RunConfigError(f"{path}: {e}") from None
  vocab = stage_dir / value["text"]["vocab_file"]
  if not vocab.exists():
    raise RunConfigError(f"{path}: its vocabulary {vocab} is missing")
  return value


def model_config(stage_config: dict) -> ModelConfig:
  return ModelConfig.from_config(stage_config["model"])


def config_digest(stage_config: dict) -> str:
  """SHA-256 of what defines the model's function apart from its weights: the model fields and
  the vocabulary (and its casing). Two checkpoints of one run share it."""
  key = {"model": stage_config["model"], "vocab_sha256": stage_config["text"]["vocab_sha256"],
         "lowercase": stage_config["text"].get("lowercase", True)}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
