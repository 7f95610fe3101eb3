"""Checks a run config before anything is built or compiled.

Every problem is one `ConfigError` line that names the config key and its value: unknown keys,
sizes that do not fit, missing files and folders, a mesh or batch that does not match the devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from imagebert_jax import paths
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.errors import ConfigError
from imagebert_jax.retrieval.evaluate import PROTOCOL_HELP, protocol_images, protocol_names
from imagebert_jax.model.config import ModelConfig

TOP_LEVEL = {"seed", "model", "text", "mesh", "stages", "run"}
STAGE_KINDS = ("pretrain", "finetune", "evaluate")


def _keys(cd: Any) -> set[str]:
  return set(cd.keys()) if hasattr(cd, "keys") else set()


def _unknown(section: Any, reference: Any, where: str) -> None:
  extra = sorted(_keys(section) - _keys(reference))
  if extra:
    raise ConfigError(f"{where}: unknown keys {extra}; known keys are "
                      f"{sorted(_keys(reference))}")


def _objective_fields(kind: str) -> set[str]:
  from imagebert_jax.objectives.pretraining import PretrainObjective
  from imagebert_jax.objectives.retrieval import RetrievalObjective
  cls = PretrainObjective if kind == "pretrain" else RetrievalObjective
  ids = {"pad_id", "cls_id", "sep_id", "mask_id", "random_token_range", "vocab_size",
         "visual_token_ids", "object_token_ids", "attribute_token_ids",
         "spatial_opposite_ids"}  # from the data
  return {f.name for f in dataclasses.fields(cls)} - ids


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError on the first problem found."""
  # Top level: the known sections, plus plain values that stages share through references
  # (dataset paths, a checkpoint path).
  extra = sorted(k for k in _keys(config) - TOP_LEVEL if isinstance(config[k], ml_collections.ConfigDict))
  if extra:
    raise ConfigError(f"config: unknown sections {extra}; known sections are "
                      f"{sorted(TOP_LEVEL - {'seed', 'run'})}")
  try:
    model = ModelConfig.from_config(config.model)
    if model.vocab_size:
      model.validate()
    else:
      dataclasses.replace(model, vocab_size=1).validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.text.vocab_file and not paths.isfile(config.text.vocab_file):
    raise ConfigError(f"config.text.vocab_file={config.text.vocab_file!r}: no such file")

  # Mesh and devices.
  try:
    from imagebert_jax import parallel
    mesh = parallel.make_mesh(tuple(config.mesh.shape))
    parallel.rules_from_config(config.mesh.rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if jax.process_count() > 1 and jax.local_device_count() % mesh.shape["tensor"]:
    raise ConfigError(f"config.mesh.shape={tuple(config.mesh.shape)}: the tensor axis "
                      f"({mesh.shape['tensor']}) must fit within one host's "
                      f"{jax.local_device_count()} devices, since each host feeds its own "
                      "batch rows")

  names = run_names(config)
  if not names:
    raise ConfigError(f"config.run={config.run!r}: no stages to run")
  for i, name in enumerate(names):
    if name not in config.stages:
      raise ConfigError(f"config.run={config.run!r}: no stage {name!r} in config.stages "
                        f"({sorted(config.stages.keys())})")
    _validate_stage(config, name, names[:i], workdir, model, batch_devices)


def run_names(config: ml_collections.ConfigDict) -> list[str]:
  """The stages `config.run` lists, in order."""
  return [s.strip() for s in str(config.run).split(",") if s.strip()]


def _digest(path: str) -> str | None:
  return paths.sha256(path) if paths.isfile(path) else None


def _validate_data(config, stage, where: str, kind: str, model: ModelConfig) -> None:
  if not stage.data.dir:
    raise ConfigError(f"{where}.data.dir is empty: give the folder of a built dataset")
  from imagebert_jax.data import pipeline, records
  dirs = pipeline.data_dirs(stage.data.dir)
  if kind == "evaluate" and len(dirs) > 1:
    raise ConfigError(f"{where}.data.dir={stage.data.dir!r}: an evaluation scores one dataset")
  infos = {}
  for d in dirs:
    try:
      infos[d] = records.read_info(d)
    except FileNotFoundError:
      raise ConfigError(f"{where}.data.dir={stage.data.dir!r}: {d} is not a built dataset "
                        f"(no {records.INFO_FILE})") from None
  # Splits: training needs its train split everywhere, evaluation its split somewhere.
  if kind != "evaluate":
    for d, info in infos.items():
      if not pipeline.has_split(info, stage.data.train_split):
        raise ConfigError(f"{where}.data.train_split={stage.data.train_split!r}: {d} has splits "
                          f"{sorted(info['splits'])}")
  split = stage.data.eval_split
  if split and not any(pipeline.has_split(info, split) for info in infos.values()):
    hint = "" if kind == "evaluate" else " (data.eval_split='' turns evaluation off)"
    raise ConfigError(f"{where}.data.eval_split={split!r}: {stage.data.dir} has splits "
                      f"{sorted({s for i in infos.values() for s in i['splits']})}{hint}")
  if kind == "evaluate":
    if not split:
      raise ConfigError(f"{where}.data.eval_split is empty: name the split to score")
    info = infos[dirs[0]]
    images = sum(info["splits"][n]["records"] for n in pipeline._split_names(split))
    for ev_name, ev in stage.evals.items():
      if ev.max_images:
        images = min(images, ev.max_images)
      need = max((protocol_images(p) for p in protocol_names(ev.protocol)), default=0)
      if images < need:
        raise ConfigError(f"{where}.evals.{ev_name}.protocol={ev.protocol!r} needs {need} images; "
                          f"{split!r} of {dirs[0]} gives {images}")
  # One vocabulary: the one the datasets were tokenized with.
  vocabs = {d: _digest(records.vocab_path(d, info))
            for d, info in infos.items()}
  known = {v for v in vocabs.values() if v}
  if len(known) > 1:
    raise ConfigError(f"{where}.data.dir={stage.data.dir!r}: the datasets were tokenized with "
                      "different vocabularies")
  if config.text.vocab_file and known and _digest(config.text.vocab_file) not in known:
    raise ConfigError(f"config.text.vocab_file={config.text.vocab_file!r} is not the vocabulary "
                      f"{dirs[0]} was tokenized with")
  for d, info in infos.items():
    opts = info["options"]
    if opts["feature_dim"] != model.region_feature_dim:
      raise ConfigError(f"config.model.region_feature_dim={model.region_feature_dim}: {d} "
                        f"holds {opts['feature_dim']}-d region features")
    if opts["max_boxes"] > model.max_regions:
      raise ConfigError(f"config.model.max_regions={model.max_regions} is smaller than the "
                        f"{opts['max_boxes']} regions per image {d} may hold: raise it, or "
                        "rebuild with --max_boxes")
    if kind == "pretrain" and stage.objective.moc_loss == "kl" and not opts.get(
        "class_probs_dim"):
      raise ConfigError(f"{where}.objective.moc_loss='kl': {d} stores no class distributions "
                        "(build it with --class_probs_dim)")


def _validate_evals(stage, where: str, kind: str) -> None:
  """A stage's evaluators (imagebert_jax/training/evaluators.py): each of a type that serves the
  stage's kind, with that type's keys and sensible values; an evaluation stage has at least one."""
  evals = stage.get("evals")
  if evals is None or not isinstance(evals, ml_collections.ConfigDict):
    raise ConfigError(f"{where}.evals: want a ConfigDict of evaluators by name (e.g. "
                      "config_defaults.loss_eval())")
  serve = [t for t, kinds in config_defaults.EVALUATOR_KINDS.items() if kind in kinds]
  if kind == "evaluate" and not evals:
    raise ConfigError(f"{where}.evals is empty: an evaluation stage runs at least one "
                      "evaluator (config_defaults.retrieval_eval())")
  for one in config_defaults.EVALUATOR_DEFAULTS:
    named = [n for n, ev in evals.items()
             if isinstance(ev, ml_collections.ConfigDict) and ev.get("type") == one]
    if len(named) > 1:
      raise ConfigError(f"{where}.evals: {named} are all of type {one!r}; a stage takes one of "
                        "each type (they log under one prefix; a stage keeps one best checkpoint "
                        "and writes one metrics.json)")
  for name, ev in evals.items():
    at = f"{where}.evals.{name}"
    kind_of = ev.get("type") if isinstance(ev, ml_collections.ConfigDict) else None
    if kind_of not in serve:
      raise ConfigError(f"{at}.type={kind_of!r}: a {kind} stage takes evaluators of type "
                        f"{serve}")
    _unknown(ev, config_defaults.EVALUATOR_DEFAULTS[ev.type](), at)
    if ev.get("every", 0) < -1:
      raise ConfigError(f"{at}.every={ev.every}: want N > 0 (every N steps and the last), 0 "
                        "(the last step only) or -1 (never)")
    for key in ("tile_images", "tile_captions", "chunk_images", "batches"):
      if key in ev and ev[key] < 1:
        raise ConfigError(f"{at}.{key}={ev[key]}: want a positive number")
    for key in ("max_images", "captions_per_image"):
      if key in ev and ev[key] < 0:
        raise ConfigError(f"{at}.{key}={ev[key]}: want 0 (all) or more")
    if ev.type != "retrieval":
      continue
    names = protocol_names(ev.protocol)
    try:
      for p in names:
        protocol_images(p)
    except ValueError:
      names = []
    if not names:
      raise ConfigError(f"{at}.protocol={ev.protocol!r}: {PROTOCOL_HELP}, or several of them "
                        "separated by commas")
    binding = ev.get("binding_file", "auto")
    if binding not in ("auto", "") and not paths.isfile(binding):
      raise ConfigError(f"{at}.binding_file={binding!r}: no such file ('auto' takes the "
                        "dataset's binding_<split>.jsonl when it has one, '' none)")
    if ev.get("rerank_k", 0) < 0:
      raise ConfigError(f"{at}.rerank_k={ev.rerank_k}: want 0 (the cross-encoder on every pair) "
                        "or a positive number of candidates per query")


def _validate_init(config, stage, where: str, kind: str) -> None:
  """Fine-tuning and evaluation need starting weights, or an explicit init.from_scratch."""
  init = stage.init
  if init.select not in ("best", "last"):
    raise ConfigError(f"{where}.init.select={init.select!r}: want 'best' or 'last'")
  sources = [k for k in ("checkpoint", "from_stage", "bert") if init[k]]
  if init.from_scratch and sources:
    raise ConfigError(f"{where}.init.from_scratch=True but init.{sources[0]}="
                      f"{init[sources[0]]!r} is set: choose one")
  if kind != "pretrain" and not sources and not init.from_scratch:
    hint = ""
    if "pretrained" in config and not config.pretrained:
      hint = (" (config.pretrained is empty: give the pretraining checkpoints with "
              "--config.pretrained=<folder>)")
    raise ConfigError(f"{where}.init: no starting weights{hint}; init.checkpoint, "
                      "init.from_stage and init.bert are all empty. Set init.from_scratch=True "
                      "to start from random weights on purpose")


def _validate_stage(config, name: str, earlier: list[str], workdir: str, model: ModelConfig,
                    batch_devices: int) -> None:
  stage = config.stages[name]
  where = f"config.stages.{name}"
  kind = stage.get("kind")
  if kind not in STAGE_KINDS:
    raise ConfigError(f"{where}.kind={kind!r}: want one of {STAGE_KINDS}")
  defaults = config_defaults
  if kind == "evaluate":
    reference = defaults.evaluate_stage(defaults.data_default())
  elif kind == "finetune":
    reference = defaults.finetune_stage(defaults.data_default())
  else:
    reference = defaults.pretrain_stage(defaults.data_default(), batch_size=1, num_steps=1)
  _unknown(stage, reference, where)
  _unknown(stage.data, reference.data, f"{where}.data")
  _unknown(stage.data.synthetic, reference.data.synthetic, f"{where}.data.synthetic")
  _unknown(stage.init, reference.init, f"{where}.init")
  _validate_init(config, stage, where, kind)
  _validate_evals(stage, where, kind)
  if kind != "evaluate":
    _unknown(stage.optim, reference.optim, f"{where}.optim")
    _unknown(stage.train, reference.train, f"{where}.train")
    extra = sorted(_keys(stage.objective) - _objective_fields(kind))
    if extra:
      raise ConfigError(f"{where}.objective: unknown keys {extra}; known keys are "
                        f"{sorted(_objective_fields(kind))}")
    t = stage.train
    for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "grad_accum_steps",
                "keep_checkpoints", "max_nonfinite_in_a_row"):
      if t[key] < 1:
        raise ConfigError(f"{where}.train.{key}={t[key]}: want a positive number")
    if t.profile_steps < 0 or t.profile_first_step < 1:
      raise ConfigError(f"{where}.train.profile_steps={t.profile_steps}, profile_first_step="
                        f"{t.profile_first_step}: want profile_steps >= 0 and "
                        "profile_first_step >= 1")
    micro = t.batch_size // t.grad_accum_steps
    if t.batch_size % t.grad_accum_steps:
      raise ConfigError(f"{where}.train.batch_size={t.batch_size} is not divisible by "
                        f"grad_accum_steps={t.grad_accum_steps}")
    if micro % batch_devices:
      raise ConfigError(f"{where}.train.batch_size={t.batch_size}: each micro-batch of {micro} "
                        f"must split evenly over the {batch_devices} data-parallel devices")
    if t.batch_size % jax.process_count():
      raise ConfigError(f"{where}.train.batch_size={t.batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
    if stage.optim.learning_rate <= 0:
      raise ConfigError(f"{where}.optim.learning_rate={stage.optim.learning_rate}: want > 0")

  # Data.
  syn = stage.data.synthetic
  if syn.enabled and syn.kind not in ("scenes", "toy"):
    raise ConfigError(f"{where}.data.synthetic.kind={syn.kind!r}: want 'scenes' or 'toy'")
  if syn.enabled and syn.kind == "scenes":
    if syn.web:
      if not syn.web_images:
        raise ConfigError(f"{where}.data.synthetic.web=True: the generated web set has no images "
                          "(synthetic.web_images=0)")
      generated, what = {"web": syn.web_images}, "the web set has one split, 'web'"
    else:
      generated = {"train": syn.train_images, "val": syn.val_images, "test": syn.eval_images}
      what = ("they have train, val and test, from synthetic.train_images, val_images and "
              "eval_images")
    for split in (stage.data.train_split, stage.data.eval_split):
      if split and not generated.get(split):
        raise ConfigError(f"{where}.data: the generated scenes have no {split!r} split ({what})")
  elif syn.enabled and syn.web:
    raise ConfigError(f"{where}.data.synthetic.web=True: only the 'scenes' kind has a web set")
  if not syn.enabled:
    _validate_data(config, stage, where, kind, model)
  elif not stage.data.eval_split and not (syn.kind == "scenes" and syn.web):
    raise ConfigError(f"{where}.data.eval_split is empty: the synthetic data needs a name for its "
                      "evaluation split")

  # Where the weights come from.
  init = stage.init
  if init.checkpoint:
    from imagebert_jax.training import checkpoint
    try:
      checkpoint.state_dir(init.checkpoint)
    except FileNotFoundError:
      raise ConfigError(f"{where}.init.checkpoint={init.checkpoint!r}: no checkpoint there") \
          from None
  elif init.from_stage:
    if init.from_stage not in earlier and not paths.isdir(
        paths.join(workdir, init.from_stage, "checkpoints")):
      raise ConfigError(f"{where}.init.from_stage={init.from_stage!r}: that stage neither runs "
                        f"before this one nor has checkpoints in {workdir}")
  if init.bert:
    from imagebert_jax.training import bert
    try:
      bert.check_compatible(init.bert, model)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"{where}.init.bert={init.bert!r}: {e}") from None


