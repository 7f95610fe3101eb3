"""The training loop and the stages of a run.

`train_and_evaluate(config, workdir)` runs the stages named in `config.run`, in order. Each stage
reads top to bottom: set-up, data, mesh, model and optimizer, checkpoint, steps, loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagebert_jax.training import checkpoint as ckpt_lib
from imagebert_jax.training import metrics as metrics_lib
from imagebert_jax.training import monitor as monitor_lib
from imagebert_jax import parallel, paths
from imagebert_jax.training import optim
from imagebert_jax.config import runconfig
from imagebert_jax.training import state as state_lib
from imagebert_jax.model import ModelConfig
from imagebert_jax.objectives.pretraining import PretrainObjective, pretrain_loss
from imagebert_jax.objectives.retrieval import RetrievalObjective, retrieval_loss
from imagebert_jax.config.validate import run_names, validate

DONE_FILE = "DONE.json"


# ------------------------------------------------------------------------------------------------
# Helpers shared by the stages.
# ------------------------------------------------------------------------------------------------
def prepare_data(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                 workdir: str) -> tuple[str, str]:
  """(dataset folder, vocabulary file); generates and builds the synthetic dataset first when
  asked to: kind 'scenes' (imagebert_jax/data/realistic.py: detector-like features in the public
  TSV and Karpathy formats, built like downloaded data; splits train, val and test, and with
  `synthetic.web_images` a web set of other images with alt-text captions in the Conceptual
  Captions format, its one split 'web', which the stages with `synthetic.web` read) or 'toy'
  (imagebert_jax/data/synthetic.py: the small scenes of the tests; splits train_split and
  eval_split)."""
  from imagebert_jax.data import records
  data_dir = data.dir
  syn = data.synthetic
  if syn.enabled:
    web = syn.kind == "scenes" and syn.get("web", False)
    data_dir = data_dir or paths.join(workdir, "synthetic_web" if web else "synthetic_data")
    feature_dim = syn.feature_dim or config.model.region_feature_dim
    if jax.process_index() == 0 and syn.kind == "scenes":
      from imagebert_jax.data import realistic
      splits = {"train": syn.train_images, "val": syn.val_images, "test": syn.eval_images}
      source = paths.join(workdir, "synthetic_source")
      if paths.is_url(source):  # the generator writes local files; the dataset may be anywhere
        source = os.path.join(tempfile.gettempdir(), "imagebert_synthetic_source",
                              paths.absolute(source).replace("://", "/"))
      realistic.build(data_dir, source,
                      {k: v for k, v in splits.items() if v},
                      realistic.RealisticSpec(seed=config.seed, feature_dim=feature_dim,
                                              min_regions=syn.min_regions,
                                              max_regions=syn.max_regions,
                                              captions_per_image=syn.captions_per_image),
                      max_text_len=config.model.max_text_len,
                      max_boxes=min(syn.max_regions, config.model.max_regions),
                      vocab_file=config.text.vocab_file, web_images=syn.get("web_images", 0),
                      web=web, name="web_scenes" if web else "scenes")
    elif jax.process_index() == 0:
      from imagebert_jax.data import synthetic
      spec = synthetic.SyntheticSpec(
          seed=config.seed, feature_dim=feature_dim, min_regions=syn.min_regions,
          max_regions=syn.max_regions, captions_per_image=syn.captions_per_image)
      synthetic.build(data_dir, {data.train_split: syn.train_images,
                                 data.eval_split: syn.eval_images}, spec,
                      max_text_len=config.model.max_text_len)
    parallel.barrier("synthetic_data")
  from imagebert_jax.data import pipeline
  dirs = pipeline.data_dirs(data_dir)
  # validate() checked that every folder is a dataset built with the same vocabulary.
  info = records.read_info(dirs[0])
  vocab = config.text.vocab_file or records.vocab_path(dirs[0], info)
  return data_dir, vocab


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  cfg = ModelConfig.from_config(config.model)
  if cfg.vocab_size == 0:
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
  elif cfg.vocab_size < vocab_size:
    raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
                     f"vocabulary file's {vocab_size} tokens")
  if jax.default_backend() == "cpu" and cfg.dtype != "float32":
    logging.info("On CPU: computing in float32 instead of %s", cfg.dtype)
    cfg = dataclasses.replace(cfg, dtype="float32")
  cfg.validate()
  return cfg


# Words inside detector names that name nothing visual ("leg of table", "street light").
_NOT_VISUAL = frozenset(("of", "the", "a", "an", "in", "on", "and"))
# Where things are, which only the boxes tell: visual words whatever the detector's names.
SPATIAL_WORDS = ("left", "right", "above", "below", "under", "behind", "front", "top",
                 "bottom", "beside", "between", "inside", "outside")


@dataclasses.dataclass(frozen=True)
class DetectorWords:
  """Token ids of the words that name what the detector sees (`detector_words`)."""

  objects: tuple[int, ...] = ()     # its object names' tokens
  attributes: tuple[int, ...] = ()  # its attribute names' tokens
  spatial: tuple[int, ...] = ()     # SPATIAL_WORDS' tokens

  @property
  def visual(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.objects) | set(self.attributes) | set(self.spatial)))


def detector_words(data_dir: str, vocab: str) -> DetectorWords:
  """The tokens of the object and attribute names the datasets' summaries list (`class_names`,
  `attribute_names`: a detector's vocabularies, synonyms separated by commas) and of the spatial
  words, WordPiece-tokenized with the stage's vocabulary, without function words, special and
  unknown tokens. Objects and attributes are each only the names of one token (a foil swaps
  whole words); no names at all gives no words."""
  from imagebert_jax.data import pipeline, records
  from imagebert_jax.data.tokenizer import Tokenizer
  names = {"class_names": [], "attribute_names": []}
  for d in pipeline.data_dirs(data_dir):
    info = records.read_info(d)
    for key in names:
      for line in info.get(key, []):
        names[key] += [n.strip() for n in str(line).split(",") if n.strip()]
  if not any(names.values()):
    return DetectorWords()
  tok = Tokenizer(vocab, max_len=16)
  ids = tok.ids
  ignore = {ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id}
  ignore |= {int(t) for w in _NOT_VISUAL for t in tok.encode(w)}

  def single(words):
    rows = tok.encode_batch(words) if words else []
    return tuple(sorted({int(r[1]) for r in rows if len(r) == 3} - ignore))  # [CLS] w [SEP]

  spatial = {int(t) for row in tok.encode_batch(list(SPATIAL_WORDS)) for t in row} - ignore
  return DetectorWords(single(names["class_names"]), single(names["attribute_names"]),
                       tuple(sorted(spatial)))


def pretrain_objective(obj_cfg: ml_collections.ConfigDict, ids,
                       words: DetectorWords = DetectorWords()) -> PretrainObjective:
  values = obj_cfg.to_dict()  # keys were checked by validate()
  obj = PretrainObjective(pad_id=ids.pad_id, cls_id=ids.cls_id, sep_id=ids.sep_id,
                          mask_id=ids.mask_id, random_token_range=ids.random_token_range,
                          vocab_size=ids.vocab_size, visual_token_ids=words.visual,
                          object_token_ids=words.objects, attribute_token_ids=words.attributes,
                          **values)
  obj.validate()
  return obj


def make_mesh(config: ml_collections.ConfigDict):
  mesh = parallel.make_mesh(tuple(config.mesh.shape))
  rules = parallel.rules_from_config(config.mesh.rules)
  parallel.log_mesh(mesh)
  return mesh, rules


def stage_done(workdir: str, name: str) -> dict | None:
  path = paths.join(workdir, name, DONE_FILE)
  if paths.isfile(path):
    return paths.read_json(path)
  return None


def mark_done(workdir: str, name: str, info: dict) -> None:
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, name, DONE_FILE), info)  # whole or not at all


def describe_stage(config: ml_collections.ConfigDict, name: str, workdir: str,
                   model_cfg: ModelConfig, vocab: str, data_dir: str) -> None:
  """Writes `<stage>/config.json` and the vocabulary beside the stage's checkpoints, so the stage
  folder alone rebuilds its model (imagebert_jax.config.runconfig)."""
  if jax.process_index() != 0:
    return
  from imagebert_jax.data import pipeline, records
  options = records.read_info(pipeline.data_dirs(data_dir)[0]).get("options", {})
  runconfig.write_stage_config(config, name, workdir, vocab_size=model_cfg.vocab_size,
                               vocab_file=vocab, data_options=options)


def describe_finished_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> None:
  """A stage finished by an older run, before stages described themselves, gets its config.json
  from the config of the run that finds it (the checkpoint's shapes are checked when loaded)."""
  if paths.exists(paths.join(workdir, name, runconfig.CONFIG_FILE)):
    return
  from imagebert_jax.data.tokenizer import special_ids
  data_dir, vocab = prepare_data(config, config.stages[name].data, workdir)
  model_cfg = model_config(config, special_ids(vocab).vocab_size)
  describe_stage(config, name, workdir, model_cfg, vocab, data_dir)
  logging.info("[%s] finished before stages described themselves: wrote its %s", name,
               runconfig.CONFIG_FILE)


def objective_for(kind: str, obj_cfg: ml_collections.ConfigDict, ids,
                  words: DetectorWords = DetectorWords()):
  """The stage's static objective: PretrainObjective or RetrievalObjective (`words`: the
  detector's words, for visual-word masking and foils)."""
  if kind == "pretrain":
    return pretrain_objective(obj_cfg, ids, words)
  values = obj_cfg.to_dict()  # keys were checked by validate()
  obj = RetrievalObjective(pad_id=ids.pad_id, cls_id=ids.cls_id, sep_id=ids.sep_id,
                           object_token_ids=words.objects, attribute_token_ids=words.attributes,
                           **values)
  obj.validate()
  return obj


def init_source(stage: ml_collections.ConfigDict, workdir: str) -> str:
  """The checkpoint a stage starts from ('' for none): init.checkpoint, or init.from_stage's:
  its best checkpoint by validation when it kept one and init.select is 'best', else its last."""
  init = stage.init
  if init.checkpoint:
    return init.checkpoint
  if init.from_stage:
    best = paths.join(workdir, init.from_stage, ckpt_lib.BEST_DIR)
    if init.select == "best" and ckpt_lib.has_checkpoint(best):
      return best
    return paths.join(workdir, init.from_stage, "checkpoints")
  return ""


def starting_params(name: str, stage: ml_collections.ConfigDict, workdir: str,
                    model_cfg: ModelConfig, abstract_params: Any, fresh: Any) -> Any | None:
  """The parameters a stage starts from, or None to keep `fresh` as it is.

  `init.bert` puts a Hugging Face BERT checkpoint into the text embeddings and the encoder;
  `init.checkpoint` / `init.from_stage` then restore every parameter such a checkpoint has. The
  model's parameters that no source has keep their fresh initialisation and are listed in the log.
  """
  source = init_source(stage, workdir)
  if not source and not stage.init.bert:
    return None
  flat = ckpt_lib.flatten_paths(fresh)
  if stage.init.bert:
    from imagebert_jax.training import bert
    arrays, left = bert.initial_params(stage.init.bert, model_cfg, flat)
    for key, value in arrays.items():  # placed shard by shard: works across processes
      flat[key] = jax.make_array_from_callback(value.shape, flat[key].sharding,
                                               lambda index, v=value: v[index])
    logging.info("[%s] %d parameters from the BERT checkpoint %s", name, len(arrays),
                 stage.init.bert)
    if not source:
      logging.warning("[%s] not in the BERT checkpoint, freshly initialised: %s", name,
                      ", ".join(left))
  if source:
    restored, missing, unexpected = ckpt_lib.load_params(source, abstract_params)
    logging.info("[%s] starting from %s (step %s): %d parameters restored", name, source,
                 ckpt_lib.step_of(source), len(restored))
    if stage.init.from_stage and stage.init.select == "best" and ckpt_lib.BEST_DIR not in source:
      logging.info("[%s] %s kept no best checkpoint (it ran no retrieval validation): using its "
                   "last", name, stage.init.from_stage)
    if missing:
      logging.warning("[%s] not in %s, %s: %s", name, source,
                      "from the BERT checkpoint or freshly initialised" if stage.init.bert
                      else "freshly initialised", ", ".join(missing))
    if unexpected:
      logging.info("[%s] in %s but not in the model, ignored: %s", name, source,
                   ", ".join(unexpected))
    flat.update(restored)
  return ckpt_lib.nest_like(flat, fresh)


def region_feature_statistics(data_dir: str, split: str,
                              max_images: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """(mean, 1 / std) per feature dimension over the regions of the first `max_images` images of
  a split (shared between the datasets of a comma-separated list): the same on every process."""
  import tensorflow_datasets as tfds
  from imagebert_jax.data import pipeline
  dirs = [d for d in pipeline.data_dirs(data_dir)
          if pipeline.has_split(pipeline.open_dataset(d)[1], split)]
  total = count = square = None
  for d in dirs:
    builder, _ = pipeline.open_dataset(d)
    decoders = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k != "features"}
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    for ex in tfds.as_numpy(ds.take(max(1, max_images // len(dirs)))):
      f = np.asarray(ex["features"], np.float64)
      total = f.sum(0) if total is None else total + f.sum(0)
      square = (f * f).sum(0) if square is None else square + (f * f).sum(0)
      count = len(f) if count is None else count + len(f)
  if not count:
    raise ValueError(f"{data_dir}: split {split!r} has no region features to standardise with")
  mean = total / count
  std = np.sqrt(np.maximum(square / count - mean * mean, 0.0))
  # Dimensions that hardly vary are not blown up: std is floored at 1% of the mean std.
  std = np.maximum(std, 0.01 * float(np.mean(std)) + 1e-12)
  return mean.astype(np.float32), (1.0 / std).astype(np.float32)


def with_feature_statistics(name: str, params: Any, model_cfg: ModelConfig, data_dir: str,
                            split: str) -> Any:
  """Sets the model's feature statistics from the training data when they are still at their
  initial values (mean 0, scale 1): a model started from scratch or from BERT. Ones restored
  from a checkpoint are the statistics of the data that model was trained on, and are kept."""
  if model_cfg.region_input_norm != "standardise":
    return params
  mean, scale = params["region_feature_mean"], params["region_feature_scale"]
  unset = jax.jit(lambda m, s: jnp.all(m == 0) & jnp.all(s == 1))(mean, scale)
  if not bool(jax.device_get(unset)):
    return params
  m, s = region_feature_statistics(data_dir, split)
  logging.info("[%s] region features standardised with the statistics of %s %s (mean of the "
               "means %.3g, of the stds %.3g)", name, data_dir, split, float(np.mean(m)),
               float(np.mean(1.0 / s)))
  place = lambda like, v: jax.make_array_from_callback(v.shape, like.sharding,
                                                       lambda index: v[index])
  return {**params, "region_feature_mean": place(mean, m), "region_feature_scale": place(scale, s)}


def retrieval_validation(stage: ml_collections.ConfigDict, name: str, data_dir: str, ids,
                         model_cfg: ModelConfig, spec: state_lib.StateSpec,
                         stage_dir: str) -> Any | None:
  """Fine-tuning's validation: `validate(params, step) -> {'val/...': value}` scores every pair
  of a fixed subset of `data.eval_split` (stage.val) with the matching head, and keeps the
  parameters of the best RSUM in <stage>/best_checkpoint (`validate.best`). None when the stage
  does not validate (not fine-tuning, val.retrieval off, eval_every 0, or no eval split)."""
  val = stage.val if stage.kind == "finetune" else None
  if not val or not val.retrieval or not stage.train.eval_every or not stage.data.eval_split:
    return None
  from imagebert_jax.retrieval import evaluate as eval_lib
  from imagebert_jax.data import pipeline, records
  dirs = [d for d in pipeline.data_dirs(data_dir)
          if pipeline.has_split(records.read_info(d), stage.data.eval_split)]
  split = eval_lib.load_split(dirs[0], stage.data.eval_split,
                              max_text_len=model_cfg.max_text_len,
                              max_regions=model_cfg.max_regions, pad_id=ids.pad_id,
                              sep_id=ids.sep_id, max_images=val.max_images or None,
                              captions_per_image=val.captions_per_image)
  logging.info("[%s] retrieval validation every %d steps on %s of %s: %d images x %d captions",
               name, stage.train.eval_every, stage.data.eval_split, dirs[0], split.num_images,
               split.num_captions)
  scorer = eval_lib.SplitScorer(split, spec.graphdef, spec.mesh, spec.rules, pad_id=ids.pad_id,
                                tile_images=val.tile_images, tile_captions=val.tile_captions)
  best = ckpt_lib.BestCheckpoint(paths.join(stage_dir, ckpt_lib.BEST_DIR), "rsum")

  def validate(params, step: int) -> dict[str, float]:
    scores = scorer.rows(params, 0, split.num_images)
    metrics = eval_lib.recall(scores, split.caption_image)
    metrics["nonfinite_scores"] = eval_lib.count_nonfinite(
        scores, f"[{name}] validation at step {step}")
    if best.consider(step, params, metrics["rsum"]):
      logging.info("[%s] step %d: validation RSUM %.2f, the best so far: kept in %s", name, step,
                   metrics["rsum"], best.directory)
    return {f"val/{k}": v for k, v in metrics.items()}

  validate.best = best
  return validate


class Preempted(Exception):
  """Training stopped cleanly on SIGTERM after checkpointing."""


class Preemption:
  """Notes SIGTERM (the preemption signal of cloud VMs); `reached(step, boundary)` says when to stop.

  One process: a Python signal handler sets a flag, read at every step. Several processes: JAX's
  preemption service (started by jax.distributed.initialize) catches the signal on any host and
  the hosts agree on the step to stop at; `reached` must then be called at every step by all of
  them. Without that service, the processes all-gather their flags at log and checkpoint steps
  only (`boundary`), so there is no per-step synchronisation.
  """

  def __init__(self):
    self.requested = False
    self.step = 0  # the steps dispatched so far (the loop keeps it current), for the log
    self._previous = None
    self._service = jax.process_count() > 1 and _preemption_service_running()
    if not self._service and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if not self.requested:
      logging.warning("Termination signal after step %d: checkpointing at the next step "
                      "boundary", self.step)
    self.requested = True

  def reached(self, step: int, boundary: bool) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    if self._service:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return boundary and parallel.any_process(self.requested)

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_running() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


# ------------------------------------------------------------------------------------------------
# Training stages: pretraining and retrieval fine-tuning share this loop.
# ------------------------------------------------------------------------------------------------
def train_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> dict:
  """Runs (or resumes) one training stage; returns its summary."""
  stage = config.stages[name]
  kind = stage.kind
  stage_dir = paths.join(workdir, name)
  paths.makedirs(stage_dir)
  tcfg = stage.train

  # ---- Data -------------------------------------------------------------------------------
  from imagebert_jax.data import pipeline, records
  from imagebert_jax.data.tokenizer import special_ids
  pipeline.hide_gpus_from_tf()
  data_dir, vocab = prepare_data(config, stage.data, workdir)
  ids = special_ids(vocab)
  model_cfg = model_config(config, ids.vocab_size)
  describe_stage(config, name, workdir, model_cfg, vocab, data_dir)
  wants_words = any(stage.objective.get(k) for k in ("mlm_visual_share", "itm_foil_share",
                                                      "foil_share"))
  obj = objective_for(kind, stage.objective, ids,
                      detector_words(data_dir, vocab) if wants_words else DetectorWords())
  labelled = [records.read_info(d)["options"].get("has_object_labels", True)
              for d in pipeline.data_dirs(data_dir)]
  if kind == "pretrain" and obj.moc_weight and not any(labelled):
    logging.warning("[%s] %s has no object class labels (its region features came without "
                    "them): masked object classification is off for this stage", name, data_dir)
    obj = dataclasses.replace(obj, moc_weight=0.0)
  elif kind == "pretrain" and not all(labelled):
    logging.warning("[%s] some of %s has no object class labels: masked object classification "
                    "counts only the labelled regions", name, data_dir)
  pipe = pipeline.PipelineConfig(
      data_dir=data_dir, split=stage.data.train_split, batch_size=tcfg.batch_size,
      max_text_len=model_cfg.max_text_len, max_regions=model_cfg.max_regions,
      pad_id=ids.pad_id, sep_id=ids.sep_id, seed=config.seed,
      shuffle_buffer=stage.data.shuffle_buffer, pair_shuffle_buffer=stage.data.pair_shuffle_buffer,
      with_class_probs=kind == "pretrain" and obj.moc_loss == "kl",
      threadpool_size=stage.data.threadpool_size, ram_budget_gb=stage.data.ram_budget_gb,
      prefetch=stage.data.prefetch)

  # ---- Mesh, model, optimizer ---------------------------------------------------------------
  mesh, rules = make_mesh(config)
  tx, schedule = optim.make_optimizer(stage.optim, tcfg.num_steps)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=config.seed)

  # ---- Checkpoint: resume, or start (from another stage's parameters when asked) ------------
  checkpointer = ckpt_lib.Checkpointer(paths.join(stage_dir, "checkpoints"),
                                       keep=tcfg.keep_checkpoints)
  data_state = ckpt_lib.DataState(stage_dir)
  state, latest = checkpointer.restore_latest(spec.abstract)
  if state is not None:
    logging.info("[%s] resuming from step %d", name, latest)
  elif init_source(stage, workdir) or stage.init.bert:
    _, fresh = state_lib.create_params(model_cfg, mesh, rules, seed=config.seed)
    params = starting_params(name, stage, workdir, model_cfg, spec.abstract.params, fresh)
    params = with_feature_statistics(name, params, model_cfg, data_dir, stage.data.train_split)
    state = state_lib.state_with_params(spec, tx, params)
  else:
    state = state_lib.create_state(spec, model_cfg, tx, seed=config.seed)
    state = state.replace(params=with_feature_statistics(
        name, state.params, model_cfg, data_dir, stage.data.train_split))
  state_lib.log_param_count(state.params)
  if stage.optim.get("lr_scale", ""):
    optim.lr_scale_tree(state.params, stage.optim.lr_scale)  # a pattern naming nothing: refused
  start_step = int(jax.device_get(state.step))

  # ---- Steps ----------------------------------------------------------------------------------
  loss_fn = pretrain_loss if kind == "pretrain" else retrieval_loss
  train_step = state_lib.make_train_step(
      spec, functools.partial(loss_fn, obj=obj, train=True), tx, seed=config.seed,
      grad_accum_steps=tcfg.grad_accum_steps, schedule=schedule,
      skip_nonfinite=tcfg.skip_nonfinite)
  eval_step = state_lib.make_eval_step(spec, functools.partial(loss_fn, obj=obj, train=False),
                                       seed=config.seed + 1)

  def evaluate(params) -> dict[str, float]:
    if not stage.data.eval_split:
      return {}
    ecfg = dataclasses.replace(pipe, split=stage.data.eval_split, seed=config.seed)
    history = []
    # The losses are means over batches, so only batches without padding rows count.
    for i, batch in enumerate(pipeline.as_numpy(
        pipeline.eval_dataset(ecfg, max_batches=tcfg.eval_batches, whole_only=True))):
      del batch["mask"]
      history.append(eval_step(params, parallel.global_batch(batch, mesh, rules), i))
    if not history:
      logging.warning("[%s] the split %r has fewer pairs than one batch of %d: no evaluation",
                      name, stage.data.eval_split, tcfg.batch_size)
    return {f"eval/{k}": v for k, v in metrics_lib.mean_metrics(history).items()}

  validation = retrieval_validation(stage, name, data_dir, ids, model_cfg, spec, stage_dir)

  # ---- Loop -----------------------------------------------------------------------------------
  writer = metrics_lib.Writer(workdir, name)
  monitor = monitor_lib.LearningMonitor(name, monitor_lib.MonitorConfig.from_config(tcfg))
  history: list[dict] = []  # this log interval's per-step metrics (host values)
  data_saved = bool(start_step) and data_state.has(start_step)
  train_pipe = pipe
  if start_step and not data_saved:
    logging.warning("[%s] no input-pipeline state saved for step %d: the data order restarts "
                    "(seeded by the step), so this run will not repeat an uninterrupted one "
                    "exactly", name, start_step)
    train_pipe = dataclasses.replace(pipe, seed=config.seed + start_step)
  batches = pipeline.TrainIterator(pipeline.train_dataset(train_pipe))
  if data_saved:
    history = data_state.restore(start_step, batches)

  def save(step: int, state) -> None:
    if not bool(jax.device_get(state_lib.all_finite(state.params))):
      raise FloatingPointError(f"[{name}] step {step}: the parameters are not finite; not "
                               "checkpointing them")
    data_state.save(step, batches, history)
    checkpointer.save(step, state)
    data_state.prune(checkpointer.all_steps() + [step])

  def check_finite(metrics: dict, step: int) -> None:
    in_a_row = int(metrics["nonfinite_in_a_row"])
    if in_a_row and not tcfg.skip_nonfinite:
      raise FloatingPointError(
          f"[{name}] step {step}: the loss or the gradients are not finite "
          f"(config.stages.{name}.train.skip_nonfinite=False); stopping")
    if in_a_row >= tcfg.max_nonfinite_in_a_row:
      raise FloatingPointError(
          f"[{name}] step {step}: {in_a_row} updates in a row had a non-finite loss or gradient "
          f"and were skipped (config.stages.{name}.train.max_nonfinite_in_a_row="
          f"{tcfg.max_nonfinite_in_a_row}); stopping")

  preemption = Preemption()
  progress = metrics_lib.Progress(
      logdir=stage_dir, num_steps=tcfg.num_steps, start_step=start_step,
      every_steps=tcfg.log_every, batch_size=tcfg.batch_size, profile_steps=tcfg.profile_steps,
      profile_first_step=tcfg.profile_first_step)
  first = last = None
  step = preemption.step = start_step
  previous = None  # the last step's metrics: read one step late so the device never waits

  def take(metrics, at_step):
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append(values)
    check_finite(values, at_step)

  try:
    while step < tcfg.num_steps:
      state, step_metrics = train_step(state, parallel.global_batch(next(batches), mesh, rules))
      step += 1
      preemption.step = step
      progress(step)
      if previous is not None:
        take(previous, step - 1)
      previous = step_metrics
      log_now = step % tcfg.log_every == 0 or step == tcfg.num_steps
      stop = preemption.reached(step, boundary=log_now or step % tcfg.checkpoint_every == 0)
      save_now = step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps or stop
      if log_now or save_now:
        take(previous, step)
        previous = None
      if log_now:
        scalars = metrics_lib.mean_metrics(history)
        history = []
        scalars.update(progress.timings())
        scalars.update(monitor.check(step, scalars))
        writer.scalars(step, scalars)
        first = first or scalars
        last = scalars
      if validation and (step % tcfg.eval_every == 0 or step == tcfg.num_steps):
        # Before the step's checkpoint: a run resumed from it has validated that step already.
        with progress.timed("eval"):
          writer.scalars(step, validation(state.params, step))
      if save_now:
        save(step, state)
      if stop:
        progress.close()
        checkpointer.close()
        if validation:
          validation.best.close()
        writer.close()
        raise Preempted(f"[{name}] stopped at step {step} on a termination signal; the "
                        "checkpoint is written: rerun the same command to resume")
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.num_steps:
        writer.scalars(step, evaluate(state.params))
  finally:
    preemption.restore()
  progress.close()
  final_eval = evaluate(state.params)
  if final_eval:
    writer.scalars(step, final_eval)
  checkpointer.close()
  writer.close()
  summary = {"kind": kind, "final_step": step, "train_first": first, "train_last": last,
             "eval": final_eval, "alarms": monitor.alarms}
  if validation:
    validation.best.close()
    best_step, best_rsum = validation.best.best()
    summary["best"] = {"step": best_step, "val/rsum": best_rsum}
    logging.info("[%s] best validation RSUM %.2f at step %d", name, best_rsum, best_step)
  if kind == "pretrain":
    summary["chance"] = {
        "mlm_accuracy": 1.0 / (ids.random_token_range[1] - ids.random_token_range[0]),
        "moc_accuracy": 1.0 / model_cfg.num_object_classes}
    print_pretrain_summary(name, summary)
  mark_done(workdir, name, summary)
  return summary


# ------------------------------------------------------------------------------------------------
# Retrieval evaluation stage.
# ------------------------------------------------------------------------------------------------
def evaluate_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> dict:
  """Scores every pair of a split with the cross-encoder; writes scores and metrics."""
  from imagebert_jax.retrieval import evaluate as eval_lib
  from imagebert_jax.data import pipeline
  from imagebert_jax.data.tokenizer import special_ids
  stage = config.stages[name]
  out_dir = paths.join(workdir, name)
  paths.makedirs(out_dir)
  pipeline.hide_gpus_from_tf()
  data_dir, vocab = prepare_data(config, stage.data, workdir)
  ids = special_ids(vocab)
  model_cfg = model_config(config, ids.vocab_size)
  describe_stage(config, name, workdir, model_cfg, vocab, data_dir)
  mesh, rules = make_mesh(config)
  graphdef, params = state_lib.create_params(model_cfg, mesh, rules, seed=config.seed)
  source = init_source(stage, workdir)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                          params)
  start = starting_params(name, stage, workdir, model_cfg, abstract, params)
  if start is None:
    logging.warning("[%s] init.from_scratch=True: scoring with random weights", name)
  else:
    params = start  # already placed with the fresh parameters' shardings
  ecfg = stage.eval
  split = eval_lib.load_split(data_dir, stage.data.eval_split, max_text_len=model_cfg.max_text_len,
                              max_regions=model_cfg.max_regions, pad_id=ids.pad_id,
                              sep_id=ids.sep_id, max_images=ecfg.max_images or None,
                              captions_per_image=ecfg.captions_per_image)
  logging.info("[%s] %d images x %d captions = %s pairs", name, split.num_images,
               split.num_captions, f"{split.num_images * split.num_captions:,}")
  started = time.time()
  # The contrastive first stage always; the cross-encoder on every pair (eval.rerank_k = 0) or
  # on each query's top rerank_k (imagebert_jax.retrieval.two_stage).
  from imagebert_jax.retrieval import two_stage
  result = two_stage.evaluate_split(params, split, graphdef, mesh, rules, out_dir, ids=ids,
                                    ecfg=ecfg)
  scores, metrics, by_protocol = result.scores, result.metrics, result.by_protocol
  binding_table = evaluate_binding(stage, data_dir, vocab, config.text.lowercase, params, graphdef,
                                   mesh, rules, split, ids, model_cfg, result)
  seconds = time.time() - started
  spread = eval_lib.score_spread(scores)
  if spread["scores_near_constant"]:
    logging.warning("[%s] the score matrix is (near-)constant: std %.2e over %s pairs. The "
                    "scorer has collapsed and these recall figures mean nothing", name,
                    spread["score_std"], f"{scores.size:,}")
  extra = {"protocol": ecfg.protocol, "split": stage.data.eval_split,
           "images": split.num_images, "captions": split.num_captions,
           "captions_per_image": ecfg.captions_per_image,
           "checkpoint": source, "checkpoint_step": ckpt_lib.step_of(source) if source else None,
           "seconds": round(seconds, 2), **spread, **result.extra}
  eval_lib.write_results(out_dir, scores, split, metrics, extra)
  two_stage.write_itc_scores(out_dir, result.itc_scores)
  writer = metrics_lib.Writer(workdir, name)
  writer.scalars(0, {f"retrieval/{k}": v for k, v in
                     dict(metrics, nonfinite_scores=result.extra["nonfinite_scores"]).items()})
  writer.close()
  if jax.process_index() == 0:
    print(f"[{name}] {ecfg.protocol} retrieval on {stage.data.eval_split} "
          f"({split.num_images} images, {split.num_captions} captions, {seconds:.1f}s)\n"
          + eval_lib.format_metrics({**_table_rows(name, by_protocol),
                                     **_table_rows(f"{name} itc", result.itc_by_protocol)})
          + f"\n(cross-encoder on {result.extra['pairs_scored']:,} of "
          f"{result.extra['all_pairs']:,} pairs; rows 'itc': the embeddings alone)"
          + (f"\n{binding_table}" if binding_table else ""), flush=True)
  summary = {"kind": "evaluate", "metrics": metrics, "by_protocol": by_protocol, **extra}
  mark_done(workdir, name, summary)
  return summary


def binding_file(stage: ml_collections.ConfigDict, data_dir: str) -> str:
  """The binding tests an evaluation stage scores: `eval.binding_file`, or with 'auto' the
  dataset's `binding_<split>.jsonl` when it has one ('' for none)."""
  chosen = stage.eval.get("binding_file", "auto")
  if chosen != "auto":
    return chosen
  path = paths.join(data_dir, f"binding_{stage.data.eval_split}.jsonl")
  return path if paths.exists(path) else ""


def evaluate_binding(stage, data_dir, vocab, lowercase, params, graphdef, mesh, rules, split,
                     ids, model_cfg, result) -> str:
  """Scores the stage's binding tests (imagebert_jax.retrieval.binding), adds their shares to
  `result.metrics` and returns their table ('' without tests)."""
  path = binding_file(stage, data_dir)
  if not path:
    return ""
  from imagebert_jax.retrieval import binding
  from imagebert_jax.data.tokenizer import Tokenizer
  tests = binding.read_tests(path, split.image_ids)
  if not len(tests):
    logging.warning("%s: no binding test names an image of this split", path)
    return ""
  tokenizer = Tokenizer(vocab, model_cfg.max_text_len, lowercase)
  cross, text_embed = binding.split_scorers(params, graphdef, mesh, rules, split,
                                            pad_id=ids.pad_id, cls_sep=(ids.cls_id, ids.sep_id))
  by_scorer = binding.evaluate(tests, cross_scores=cross, text_embed=text_embed,
                               image_embeddings=result.image_embeddings,
                               tokenize=tokenizer.encode_padded,
                               cosine_weight=result.extra["itc_weight_per_cosine"])
  result.metrics.update(binding.flat_metrics(by_scorer, tests.skipped))
  result.extra["binding_file"] = path
  return binding.format_table(by_scorer)


def _table_rows(name: str, by_protocol: dict[str, dict]) -> dict[str, dict]:
  """Rows of the retrieval table: the stage's name, with the protocol when it has several."""
  if len(by_protocol) == 1:
    return {name: next(iter(by_protocol.values()))}
  return {f"{name} {p}": m for p, m in by_protocol.items()}


def print_pretrain_summary(name: str, s: dict) -> None:
  if jax.process_index() != 0:
    return
  first, last, ev = s["train_first"] or {}, s["train_last"] or {}, s["eval"]
  rows = [("mlm_loss", None), ("moc_loss", None), ("mrfr_loss", None), ("itm_loss", None),
          ("mlm_accuracy", s["chance"]["mlm_accuracy"]),
          ("moc_accuracy", s["chance"]["moc_accuracy"]), ("itm_accuracy", 0.5)]
  if "itc_loss" in first:  # the contrastive loss; chance is ln(batch size)
    rows[4:4] = [("itc_loss", None)]
  lines = [f"[{name}] summary after {s['final_step']} steps",
           f"  {'metric':<14}{'first log':>11}{'last log':>11}{'eval':>11}{'chance':>11}"]
  for key, chance in rows:
    fmt = lambda v: f"{v:>11.4f}" if isinstance(v, float) else f"{'-':>11}"
    lines.append(f"  {key:<14}{fmt(first.get(key))}{fmt(last.get(key))}"
                 f"{fmt(ev.get('eval/' + key))}{fmt(chance)}")
  for alarm in s.get("alarms", []):
    lines.append(f"  alarm at step {alarm['step']}: {alarm['message']}")
  print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------
STAGE_KINDS = {"pretrain": train_stage, "finetune": train_stage, "evaluate": evaluate_stage}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the stages of `config.run` in order; a finished stage is not run again.

  The whole config is checked first (ConfigError, one line naming the key), before anything is
  built or compiled.
  """
  validate(config, workdir)
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    runconfig.write_run_config(config, workdir)  # workdir/config.json: the run as it ran
  results = {}
  for name in run_names(config):
    kind = config.stages[name].kind
    done = stage_done(workdir, name)
    if done is not None:
      logging.info("Stage %s already finished; skipping it", name)
      describe_finished_stage(config, name, workdir)
      results[name] = done
      continue
    results[name] = STAGE_KINDS[kind](config, name, workdir)
  evaluations = {}
  for n, r in results.items():
    if r.get("kind") == "evaluate":
      evaluations.update(_table_rows(n, r.get("by_protocol") or {"": r["metrics"]}))
  if evaluations and jax.process_index() == 0:
    from imagebert_jax.retrieval.evaluate import format_metrics
    print("Retrieval (Recall@K in %, RSUM):\n" + format_metrics(evaluations), flush=True)
  return results

