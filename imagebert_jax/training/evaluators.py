"""Evaluators: what a stage measures, named in its config and run through one interface.

A stage's `evals` maps a name of the user's choice to an evaluator's settings: its `type` (a key
of TYPES), `every` (training stages: run every that many steps and at the last step; 0: at the
last step only; -1: never) and the type's own options (imagebert_jax.config.defaults has each
type's defaults). Every evaluator is built from its settings and the stage's `Context`, and has

    run(params, step) -> {"<prefix>/<metric>": value}      close()

    loss        the stage's own loss and metrics on `data.eval_split` (`batches` batches without
                padding rows), logged as eval/...
    validation  fine-tuning's retrieval validation: the matching head on every pair of a fixed
                subset of `data.eval_split`; R@1/5/10 and RSUM logged as val/..., and the
                parameters of the best RSUM kept in <stage>/best_checkpoint
    retrieval   an evaluation stage's: the embeddings rank every candidate, the cross-encoder
                re-scores each query's `rerank_k` best (or every pair), recall by protocol,
                the binding tests; scores.npy and metrics.json in the stage's folder
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import ml_collections

from imagebert_jax import parallel, paths
from imagebert_jax.data import pipeline, records, splits
from imagebert_jax.data.tokenizer import Tokenizer
from imagebert_jax.data.words import detector_words
from imagebert_jax.model import ModelConfig
from imagebert_jax.retrieval import binding, grounding, two_stage
from imagebert_jax.retrieval import evaluate as eval_lib
from imagebert_jax.training import checkpoint as ckpt_lib
from imagebert_jax.training import metrics as metrics_lib


@dataclasses.dataclass
class Context:
  """What a stage's evaluators share: the stage, its data and its model's shape and placement."""
  config: ml_collections.ConfigDict
  name: str
  workdir: str
  data_dir: str
  vocab: str
  ids: Any                # imagebert_jax.data.tokenizer.SpecialIds
  model_cfg: ModelConfig
  graphdef: Any
  mesh: Any
  rules: Any
  pipe: Any = None        # training stages: the input pipeline's PipelineConfig
  eval_step: Callable | None = None  # training stages: (params, batch, index) -> metrics
  checkpoint: str = ""    # evaluation stages: the checkpoint the weights come from ('' none)

  @property
  def stage(self) -> ml_collections.ConfigDict:
    return self.config.stages[self.name]

  @property
  def stage_dir(self) -> str:
    return paths.join(self.workdir, self.name)


def itstime(every: int, step: int, last_step: int) -> bool:
  """Whether an evaluator with `every` runs at `step`: every `every` steps and at the last;
  0: at the last step only; -1 (or less): never."""
  if every < 0:
    return False
  return step == last_step or (every > 0 and step % every == 0)


class LossEvaluator:
  """The stage's loss on the evaluation split (the eval_step of the training loss)."""
  prefix = "eval"

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: Context):
    self.every, self.batches, self.ctx = cfg.every, cfg.batches, ctx

  def run(self, params, step: int) -> dict[str, float]:
    ctx = self.ctx
    ecfg = dataclasses.replace(ctx.pipe, split=ctx.stage.data.eval_split, seed=ctx.config.seed)
    history = []
    # The losses are means over batches, so only batches without padding rows count.
    for i, batch in enumerate(pipeline.as_numpy(
        pipeline.eval_dataset(ecfg, max_batches=self.batches, whole_only=True))):
      del batch["mask"]
      history.append(ctx.eval_step(params, parallel.global_batch(batch, ctx.mesh, ctx.rules), i))
    if not history:
      logging.warning("[%s] the split %r has fewer pairs than one batch of %d: no evaluation at "
                      "step %d", ctx.name, ecfg.split, ecfg.batch_size, step)
    return {f"{self.prefix}/{k}": v for k, v in metrics_lib.mean_metrics(history).items()}

  def summary(self) -> dict:
    return {}

  def close(self) -> None:
    pass


class ValidationEvaluator:
  """Fine-tuning's retrieval validation, keeping the parameters of the best RSUM."""
  prefix = "val"

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: Context):
    self.every, self.ctx = cfg.every, ctx
    split_name = ctx.stage.data.eval_split
    dirs = [d for d in pipeline.data_dirs(ctx.data_dir)
            if pipeline.has_split(records.read_info(d), split_name)]
    self.split = splits.load_split(
        dirs[0], split_name, max_text_len=ctx.model_cfg.max_text_len,
        max_regions=ctx.model_cfg.max_regions, pad_id=ctx.ids.pad_id, sep_id=ctx.ids.sep_id,
        max_images=cfg.max_images or None, captions_per_image=cfg.captions_per_image)
    logging.info("[%s] retrieval validation (%s) on %s of %s: %d images x %d captions",
                 ctx.name, "at the last step" if cfg.every == 0 else f"every {cfg.every} steps",
                 split_name, dirs[0], self.split.num_images, self.split.num_captions)
    self.scorer = eval_lib.SplitScorer(self.split, ctx.graphdef, ctx.mesh, ctx.rules,
                                       pad_id=ctx.ids.pad_id, tile_images=cfg.tile_images,
                                       tile_captions=cfg.tile_captions)
    self.best = ckpt_lib.BestCheckpoint(paths.join(ctx.stage_dir, ckpt_lib.BEST_DIR), "rsum")

  def run(self, params, step: int) -> dict[str, float]:
    scores = self.scorer.rows(params, 0, self.split.num_images)
    metrics = eval_lib.recall(scores, self.split.caption_image)
    metrics["nonfinite_scores"] = eval_lib.count_nonfinite(
        scores, f"[{self.ctx.name}] validation at step {step}")
    if self.best.consider(step, params, metrics["rsum"]):
      logging.info("[%s] step %d: validation RSUM %.2f, the best so far: kept in %s",
                   self.ctx.name, step, metrics["rsum"], self.best.directory)
    return {f"{self.prefix}/{k}": v for k, v in metrics.items()}

  def summary(self) -> dict:
    """The best validated step (after `close`, which waits for its checkpoint's writes)."""
    step, rsum = self.best.best()
    logging.info("[%s] best validation RSUM %.2f at step %d", self.ctx.name, rsum, step)
    return {"best": {"step": step, "val/rsum": rsum}}

  def close(self) -> None:
    self.best.close()


class RetrievalEvaluator:
  """An evaluation stage's retrieval: two-stage ranking, recall by protocol, binding; writes the
  scores and metrics.json into the stage's folder and prints the tables."""
  prefix = "retrieval"

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: Context):
    self.cfg, self.ctx = cfg, ctx
    self.every = cfg.get("every", 0)
    self.split = splits.load_split(
        ctx.data_dir, ctx.stage.data.eval_split, max_text_len=ctx.model_cfg.max_text_len,
        max_regions=ctx.model_cfg.max_regions, pad_id=ctx.ids.pad_id, sep_id=ctx.ids.sep_id,
        max_images=cfg.max_images or None, captions_per_image=cfg.captions_per_image)
    logging.info("[%s] %d images x %d captions = %s pairs", ctx.name, self.split.num_images,
                 self.split.num_captions,
                 f"{self.split.num_images * self.split.num_captions:,}")
    self.result: dict = {}

  def run(self, params, step: int) -> dict[str, float]:
    ctx, cfg, split = self.ctx, self.cfg, self.split
    started = time.time()
    # The contrastive first stage always; the cross-encoder on every pair (rerank_k = 0) or on
    # each query's top rerank_k.
    result = two_stage.evaluate_split(params, split, ctx.graphdef, ctx.mesh, ctx.rules,
                                      ctx.stage_dir, ids=ctx.ids, ecfg=cfg)
    binding_table = self._binding(params, result)
    grounding_table = self._grounding(params, result)
    seconds = time.time() - started
    spread = eval_lib.score_spread(result.scores)
    if spread["scores_near_constant"]:
      logging.warning("[%s] the score matrix is (near-)constant: std %.2e over %s pairs. The "
                      "scorer has collapsed and these recall figures mean nothing", ctx.name,
                      spread["score_std"], f"{result.scores.size:,}")
    extra = {"protocol": cfg.protocol, "split": ctx.stage.data.eval_split,
             "images": split.num_images, "captions": split.num_captions,
             "captions_per_image": cfg.captions_per_image, "checkpoint": ctx.checkpoint,
             "checkpoint_step": ckpt_lib.step_of(ctx.checkpoint) if ctx.checkpoint else None,
             "seconds": round(seconds, 2), **spread, **result.extra}
    eval_lib.write_results(ctx.stage_dir, result.scores, split, result.metrics, extra)
    two_stage.write_itc_scores(ctx.stage_dir, result.itc_scores)
    if jax.process_index() == 0:
      print(f"[{ctx.name}] {cfg.protocol} retrieval on {ctx.stage.data.eval_split} "
            f"({split.num_images} images, {split.num_captions} captions, {seconds:.1f}s)\n"
            + eval_lib.format_metrics({**table_rows(ctx.name, result.by_protocol),
                                       **table_rows(f"{ctx.name} itc", result.itc_by_protocol)})
            + f"\n(cross-encoder on {result.extra['pairs_scored']:,} of "
            f"{result.extra['all_pairs']:,} pairs; rows 'itc': the embeddings alone)"
            + (f"\n{binding_table}" if binding_table else "")
            + (f"\n{grounding_table}" if grounding_table else ""), flush=True)
    self.result = {"metrics": result.metrics, "by_protocol": result.by_protocol, **extra}
    return {f"{self.prefix}/{k}": v for k, v in dict(
        result.metrics, nonfinite_scores=result.extra["nonfinite_scores"]).items()}

  def binding_file(self) -> str:
    """The binding tests scored: `binding_file`, or with 'auto' the dataset's
    `binding_<split>.jsonl` when it has one ('' for none)."""
    chosen = self.cfg.get("binding_file", "auto")
    if chosen != "auto":
      return chosen
    path = paths.join(self.ctx.data_dir, f"binding_{self.ctx.stage.data.eval_split}.jsonl")
    return path if paths.exists(path) else ""

  def _binding(self, params, result) -> str:
    """Scores the binding tests (imagebert_jax.retrieval.binding), adds their shares to
    `result.metrics` and returns their table ('' without tests)."""
    path = self.binding_file()
    if not path:
      return ""
    ctx = self.ctx
    tests = binding.read_tests(path, self.split.image_ids)
    if not len(tests):
      logging.warning("%s: no binding test names an image of this split", path)
      return ""
    tokenizer = Tokenizer(ctx.vocab, ctx.model_cfg.max_text_len, ctx.config.text.lowercase)
    cross, text_embed = binding.split_scorers(params, ctx.graphdef, ctx.mesh, ctx.rules,
                                              self.split, pad_id=ctx.ids.pad_id,
                                              cls_sep=(ctx.ids.cls_id, ctx.ids.sep_id))
    by_scorer = binding.evaluate(tests, cross_scores=cross, text_embed=text_embed,
                                 image_embeddings=result.image_embeddings,
                                 tokenize=tokenizer.encode_padded,
                                 cosine_weight=result.extra["itc_weight_per_cosine"])
    result.metrics.update(binding.flat_metrics(by_scorer, tests.skipped))
    result.extra["binding_file"] = path
    return binding.format_table(by_scorer)

  def _grounding(self, params, result) -> str:
    """Word grounding (imagebert_jax.retrieval.grounding) of the split's captions, with
    `grounding` on and a dataset that names its detector's words: adds it to `result.metrics`
    and returns its table ('' otherwise)."""
    if not self.cfg.get("grounding", True):
      return ""
    ctx = self.ctx
    words = detector_words(ctx.data_dir, ctx.vocab)
    kinds = {"object": words.objects, "attribute": words.attributes,
             "spatial": tuple(t for pair in words.opposites for t in pair)}
    if not any(kinds.values()) or self.split.num_images < 2:
      return ""
    predict = grounding.split_predictor(params, ctx.graphdef, ctx.mesh, ctx.rules, self.split,
                                        pad_id=ctx.ids.pad_id)
    by_kind = grounding.evaluate(self.split.text_ids, self.split.caption_image,
                                 self.split.num_images, kinds, predict, mask_id=ctx.ids.mask_id)
    if not by_kind:
      return ""
    result.metrics.update(grounding.flat_metrics(by_kind))
    return grounding.format_table(by_kind)

  def summary(self) -> dict:
    return self.result

  def close(self) -> None:
    pass


def table_rows(name: str, by_protocol: dict[str, dict]) -> dict[str, dict]:
  """Rows of a retrieval table: the stage's name, with the protocol when it has several."""
  if len(by_protocol) == 1:
    return {name: next(iter(by_protocol.values()))}
  return {f"{name} {p}": m for p, m in by_protocol.items()}


# The types by name (their settings' defaults and the stage kinds each serves:
# imagebert_jax.config.defaults.EVALUATOR_DEFAULTS and EVALUATOR_KINDS).
TYPES = {"loss": LossEvaluator, "validation": ValidationEvaluator,
         "retrieval": RetrievalEvaluator}


def build(ctx: Context) -> dict[str, Any]:
  """The stage's evaluators by name (in name order, as the config keeps them); those with
  every=-1 are left out, and so is every evaluator when the stage has no evaluation split."""
  stage = ctx.stage
  if not stage.data.eval_split:
    return {}
  return {name: TYPES[cfg.type](cfg, ctx) for name, cfg in stage.evals.items()
          if cfg.get("every", 0) >= 0}
