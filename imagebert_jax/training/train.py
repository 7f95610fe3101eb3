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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagebert_jax.training import checkpoint as ckpt_lib
from imagebert_jax.training import evaluators as evaluators_lib
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
from imagebert_jax.data.words import DetectorWords, detector_words

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


def pretrain_objective(obj_cfg: ml_collections.ConfigDict, ids,
                       words: DetectorWords = DetectorWords()) -> PretrainObjective:
  values = obj_cfg.to_dict()  # keys were checked by validate()
  obj = PretrainObjective(pad_id=ids.pad_id, cls_id=ids.cls_id, sep_id=ids.sep_id,
                          mask_id=ids.mask_id, random_token_range=ids.random_token_range,
                          vocab_size=ids.vocab_size, visual_token_ids=words.visual,
                          object_token_ids=words.objects, attribute_token_ids=words.attributes,
                          spatial_opposite_ids=words.opposites, **values)
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
                           spatial_opposite_ids=words.opposites, **values)
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
# A stage's set-up, in small steps.
# ------------------------------------------------------------------------------------------------
def stage_context(config: ml_collections.ConfigDict, name: str,
                  workdir: str) -> evaluators_lib.Context:
  """The stage's data (generated or built when asked), vocabulary, model config and mesh; the
  stage folder with its config.json."""
  from imagebert_jax.data import pipeline
  from imagebert_jax.data.tokenizer import special_ids
  stage = config.stages[name]
  paths.makedirs(paths.join(workdir, name))
  pipeline.hide_gpus_from_tf()
  data_dir, vocab = prepare_data(config, stage.data, workdir)
  ids = special_ids(vocab)
  model_cfg = model_config(config, ids.vocab_size)
  describe_stage(config, name, workdir, model_cfg, vocab, data_dir)
  mesh, rules = make_mesh(config)
  return evaluators_lib.Context(config=config, name=name, workdir=workdir, data_dir=data_dir,
                                vocab=vocab, ids=ids, model_cfg=model_cfg, graphdef=None,
                                mesh=mesh, rules=rules)


def stage_objective(ctx: evaluators_lib.Context):
  """The training stage's objective; masked object classification off (with a warning) where
  the data has no object labels."""
  from imagebert_jax.data import pipeline, records
  stage, name = ctx.stage, ctx.name
  wants_words = any(stage.objective.get(k) for k in ("mlm_visual_share", "itm_foil_share",
                                                      "foil_share"))
  obj = objective_for(stage.kind, stage.objective, ctx.ids,
                      detector_words(ctx.data_dir, ctx.vocab) if wants_words else DetectorWords())
  labelled = [records.read_info(d)["options"].get("has_object_labels", True)
              for d in pipeline.data_dirs(ctx.data_dir)]
  if stage.kind == "pretrain" and obj.moc_weight and not any(labelled):
    logging.warning("[%s] %s has no object class labels (its region features came without "
                    "them): masked object classification is off for this stage", name,
                    ctx.data_dir)
    obj = dataclasses.replace(obj, moc_weight=0.0)
  elif stage.kind == "pretrain" and not all(labelled):
    logging.warning("[%s] some of %s has no object class labels: masked object classification "
                    "counts only the labelled regions", name, ctx.data_dir)
  return obj


def train_pipeline(ctx: evaluators_lib.Context, obj) -> Any:
  """The input pipeline's settings for the stage's training split."""
  from imagebert_jax.data import pipeline
  stage, ids, m = ctx.stage, ctx.ids, ctx.model_cfg
  return pipeline.PipelineConfig(
      data_dir=ctx.data_dir, split=stage.data.train_split, batch_size=stage.train.batch_size,
      max_text_len=m.max_text_len, max_regions=m.max_regions, pad_id=ids.pad_id,
      sep_id=ids.sep_id, seed=ctx.config.seed, shuffle_buffer=stage.data.shuffle_buffer,
      pair_shuffle_buffer=stage.data.pair_shuffle_buffer,
      with_class_probs=stage.kind == "pretrain" and obj.moc_loss == "kl",
      threadpool_size=stage.data.threadpool_size, ram_budget_gb=stage.data.ram_budget_gb,
      prefetch=stage.data.prefetch)


def initial_state(ctx: evaluators_lib.Context, spec, tx, checkpointer) -> Any:
  """The stage's latest checkpoint when it has one (a resumed run); else a fresh state, with the
  parameters another stage or checkpoint (or BERT) gives, and the feature statistics set."""
  stage, name, seed = ctx.stage, ctx.name, ctx.config.seed
  state, latest = checkpointer.restore_latest(spec.abstract)
  if state is not None:
    logging.info("[%s] resuming from step %d", name, latest)
  elif init_source(stage, ctx.workdir) or stage.init.bert:
    _, fresh = state_lib.create_params(ctx.model_cfg, ctx.mesh, ctx.rules, seed=seed)
    params = starting_params(name, stage, ctx.workdir, ctx.model_cfg, spec.abstract.params, fresh)
    params = with_feature_statistics(name, params, ctx.model_cfg, ctx.data_dir,
                                     stage.data.train_split)
    state = state_lib.state_with_params(spec, tx, params)
  else:
    state = state_lib.create_state(spec, ctx.model_cfg, tx, seed=seed)
    state = state.replace(params=with_feature_statistics(
        name, state.params, ctx.model_cfg, ctx.data_dir, stage.data.train_split))
  state_lib.log_param_count(state.params)
  if stage.optim.get("lr_scale", ""):
    optim.lr_scale_tree(state.params, stage.optim.lr_scale)  # a pattern naming nothing: refused
  return state


def make_steps(ctx: evaluators_lib.Context, spec, tx, schedule, obj) -> tuple[Any, Any]:
  """The jitted (train_step, eval_step) of the stage's loss."""
  tcfg, seed = ctx.stage.train, ctx.config.seed
  loss_fn = pretrain_loss if ctx.stage.kind == "pretrain" else retrieval_loss
  train_step = state_lib.make_train_step(
      spec, functools.partial(loss_fn, obj=obj, train=True), tx, seed=seed,
      grad_accum_steps=tcfg.grad_accum_steps, schedule=schedule,
      skip_nonfinite=tcfg.skip_nonfinite)
  eval_step = state_lib.make_eval_step(spec, functools.partial(loss_fn, obj=obj, train=False),
                                       seed=seed + 1)
  return train_step, eval_step


def check_finite(values: dict, step: int, ctx: evaluators_lib.Context) -> None:
  """Stops the stage on a non-finite update when skipping is off, or on too many in a row."""
  tcfg, name = ctx.stage.train, ctx.name
  in_a_row = int(values["nonfinite_in_a_row"])
  if in_a_row and not tcfg.skip_nonfinite:
    raise FloatingPointError(
        f"[{name}] step {step}: the loss or the gradients are not finite "
        f"(config.stages.{name}.train.skip_nonfinite=False); stopping")
  if in_a_row >= tcfg.max_nonfinite_in_a_row:
    raise FloatingPointError(
        f"[{name}] step {step}: {in_a_row} updates in a row had a non-finite loss or gradient "
        f"and were skipped (config.stages.{name}.train.max_nonfinite_in_a_row="
        f"{tcfg.max_nonfinite_in_a_row}); stopping")


class Logbook:
  """A training stage's record: each step's metrics (read from the device one step late, so it
  never waits), their means every log interval (metrics.jsonl, TensorBoard, the learning
  monitor's alarms), the evaluators' figures and the progress reports."""

  def __init__(self, ctx: evaluators_lib.Context, start_step: int):
    tcfg = ctx.stage.train
    self.ctx = ctx
    self.writer = metrics_lib.Writer(ctx.workdir, ctx.name)
    self.monitor = monitor_lib.LearningMonitor(ctx.name,
                                               monitor_lib.MonitorConfig.from_config(tcfg))
    self.progress = metrics_lib.Progress(
        logdir=ctx.stage_dir, num_steps=tcfg.num_steps, start_step=start_step,
        every_steps=tcfg.log_every, batch_size=tcfg.batch_size,
        profile_steps=tcfg.profile_steps, profile_first_step=tcfg.profile_first_step)
    self.history: list[dict] = []  # this log interval's per-step metrics (host values)
    self.pending = None            # the last step's metrics, still on the device
    self.first = self.last = None  # the first and last log interval's means
    self.evals: dict[str, float] = {}  # the evaluators' figures at the last step

  def step(self, step: int, metrics, read_now: bool) -> None:
    """Notes a dispatched step: reads the one before it, and this one too when `read_now`."""
    self.progress(step)
    if self.pending is not None:
      self._read(self.pending, step - 1)
    self.pending = metrics
    if read_now:
      self._read(self.pending, step)
      self.pending = None

  def _read(self, metrics, step: int) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.history.append(values)
    check_finite(values, step, self.ctx)

  def log(self, step: int) -> None:
    scalars = metrics_lib.mean_metrics(self.history)
    self.history = []
    scalars.update(self.progress.timings())
    scalars.update(self.monitor.check(step, scalars))
    self.writer.scalars(step, scalars)
    self.first = self.first or scalars
    self.last = scalars

  def evaluate(self, evaluators: dict, params, step: int) -> None:
    """Runs the evaluators due at `step` and writes their figures."""
    for evaluator in evaluators.values():
      if evaluators_lib.itstime(evaluator.every, step, self.ctx.stage.train.num_steps):
        with self.progress.timed("eval"):
          figures = evaluator.run(params, step)
        self.writer.scalars(step, figures)
        self.evals.update(figures)

  def close(self) -> None:
    self.progress.close()
    self.writer.close()


class TrainData:
  """The training batches, resumable: the input pipeline's position (and the log interval's
  metrics so far) is saved beside each checkpoint and restored with it."""

  def __init__(self, ctx: evaluators_lib.Context, start_step: int, book: Logbook):
    from imagebert_jax.data import pipeline
    self.ctx, self.saved = ctx, ckpt_lib.DataState(ctx.stage_dir)
    has_state = bool(start_step) and self.saved.has(start_step)
    pipe = ctx.pipe
    if start_step and not has_state:
      logging.warning("[%s] no input-pipeline state saved for step %d: the data order restarts "
                      "(seeded by the step), so this run will not repeat an uninterrupted one "
                      "exactly", ctx.name, start_step)
      pipe = dataclasses.replace(pipe, seed=ctx.config.seed + start_step)
    self.batches = pipeline.TrainIterator(pipeline.train_dataset(pipe))
    if has_state:
      book.history = self.saved.restore(start_step, self.batches)

  def next(self):
    return parallel.global_batch(next(self.batches), self.ctx.mesh, self.ctx.rules)

  def checkpoint(self, step: int, state, checkpointer, book: Logbook) -> None:
    """Saves the state and, beside it, the data position; refuses non-finite parameters."""
    if not bool(jax.device_get(state_lib.all_finite(state.params))):
      raise FloatingPointError(f"[{self.ctx.name}] step {step}: the parameters are not finite; "
                               "not checkpointing them")
    self.saved.save(step, self.batches, book.history)
    checkpointer.save(step, state)
    self.saved.prune(checkpointer.all_steps() + [step])


def close_stage(book: Logbook, checkpointer, evaluators: dict) -> None:
  """Waits for the stage's writes to finish and closes its writers, checkpoints and
  evaluators (the best checkpoint's among them)."""
  book.close()
  checkpointer.close()
  for evaluator in evaluators.values():
    evaluator.close()


def finish_stage(ctx: evaluators_lib.Context, step: int, book: Logbook, evaluators: dict,
                 checkpointer) -> dict:
  """Closes the stage; its summary (DONE.json), printed for pretraining."""
  close_stage(book, checkpointer, evaluators)
  summary = {"kind": ctx.stage.kind, "final_step": step, "train_first": book.first,
             "train_last": book.last, "eval": book.evals, "alarms": book.monitor.alarms}
  for evaluator in evaluators.values():
    summary.update(evaluator.summary())
  if ctx.stage.kind == "pretrain":
    ids = ctx.ids
    summary["chance"] = {
        "mlm_accuracy": 1.0 / (ids.random_token_range[1] - ids.random_token_range[0]),
        "moc_accuracy": 1.0 / ctx.model_cfg.num_object_classes}
    print_pretrain_summary(ctx.name, summary)
  mark_done(ctx.workdir, ctx.name, summary)
  return summary


# ------------------------------------------------------------------------------------------------
# Training stages: pretraining and retrieval fine-tuning share this loop.
# ------------------------------------------------------------------------------------------------
def train_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> dict:
  """Runs (or resumes) one training stage; returns its summary."""
  ctx = stage_context(config, name, workdir)
  tcfg = ctx.stage.train
  obj = stage_objective(ctx)
  ctx.pipe = train_pipeline(ctx, obj)
  tx, schedule = optim.make_optimizer(ctx.stage.optim, tcfg.num_steps)
  spec = state_lib.state_spec(ctx.model_cfg, tx, ctx.mesh, ctx.rules, seed=config.seed)
  ctx.graphdef = spec.graphdef
  checkpointer = ckpt_lib.Checkpointer(paths.join(ctx.stage_dir, "checkpoints"),
                                       keep=tcfg.keep_checkpoints)
  state = initial_state(ctx, spec, tx, checkpointer)
  step = int(jax.device_get(state.step))
  train_step, ctx.eval_step = make_steps(ctx, spec, tx, schedule, obj)
  evaluators = evaluators_lib.build(ctx)
  book = Logbook(ctx, step)
  data = TrainData(ctx, step, book)
  preemption = Preemption()
  itstime = functools.partial(evaluators_lib.itstime, last_step=tcfg.num_steps)
  try:
    while step < tcfg.num_steps:
      state, metrics = train_step(state, data.next())
      step = preemption.step = step + 1
      log_now = itstime(tcfg.log_every, step)
      stop = preemption.reached(step, boundary=log_now or itstime(tcfg.checkpoint_every, step))
      save_now = itstime(tcfg.checkpoint_every, step) or stop
      book.step(step, metrics, read_now=log_now or save_now)
      if log_now:
        book.log(step)
      # Before the step's checkpoint: a run resumed from it has evaluated that step already.
      book.evaluate(evaluators, state.params, step)
      if save_now:
        data.checkpoint(step, state, checkpointer, book)
      if stop:
        close_stage(book, checkpointer, evaluators)
        raise Preempted(f"[{name}] stopped at step {step} on a termination signal; the "
                        "checkpoint is written: rerun the same command to resume")
  finally:
    preemption.restore()
  return finish_stage(ctx, step, book, evaluators, checkpointer)


# ------------------------------------------------------------------------------------------------
# Evaluation stages.
# ------------------------------------------------------------------------------------------------
def evaluate_stage(config: ml_collections.ConfigDict, name: str, workdir: str) -> dict:
  """Runs the stage's evaluators (`evals`) once on the weights it starts from."""
  ctx = stage_context(config, name, workdir)
  ctx.graphdef, params = state_lib.create_params(ctx.model_cfg, ctx.mesh, ctx.rules,
                                                 seed=config.seed)
  ctx.checkpoint = init_source(ctx.stage, workdir)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                          params)
  start = starting_params(name, ctx.stage, workdir, ctx.model_cfg, abstract, params)
  if start is None:
    logging.warning("[%s] init.from_scratch=True: scoring with random weights", name)
  else:
    params = start  # already placed with the fresh parameters' shardings
  writer = metrics_lib.Writer(workdir, name)
  summary = {"kind": "evaluate"}
  for evaluator in evaluators_lib.build(ctx).values():
    writer.scalars(0, evaluator.run(params, 0))
    summary.update(evaluator.summary())
    evaluator.close()
  writer.close()
  mark_done(workdir, name, summary)
  return summary


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
      evaluations.update(evaluators_lib.table_rows(n, r.get("by_protocol") or {"": r["metrics"]}))
  if evaluations and jax.process_index() == 0:
    from imagebert_jax.retrieval.evaluate import format_metrics
    print("Retrieval (Recall@K in %, RSUM):\n" + format_metrics(evaluations), flush=True)
  return results

