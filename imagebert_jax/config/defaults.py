"""Defaults shared by the run configs in configs/, one function per part of a run.

A run config (see imagebert_base.py, demo.py) is the whole description of a run:

  seed, model, text, mesh       shared by every stage
  stages.<name>                 one entry per stage: kind ('pretrain', ...), data, objective,
                                optim, train, init
  run                           the stages to run, in order (comma-separated names)
"""

from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Logical axis -> mesh axes. 'batch' is the data dimension of activations; the rest name weight
# dimensions (see imagebert_jax.model). FSDP shards weights over their 'embed' dimension, tensor
# parallelism over heads, MLP, vocabulary, classes and the region-feature dimension.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("heads_kv", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", "tensor"),
    ("feature", "tensor"),
    ("length", None),
    ("act_embed", None),
)


def run_config(model: ConfigDict | None = None) -> ConfigDict:
  """A run config's shared parts: seed, model (BERT-base unless given), text, mesh; no stages."""
  c = ConfigDict()
  c.seed = 0
  c.model = model or model_base()
  c.text = ConfigDict(dict(vocab_file="", lowercase=True))
  c.mesh = mesh_default()
  c.stages = ConfigDict()
  return c


def model_base() -> ConfigDict:
  """BERT-base over 44 text positions and 100 regions of 2048-d (144 positions in all)."""
  return ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
      max_text_len=44, max_regions=100, region_feature_dim=2048, num_object_classes=1600,
      max_position_embeddings=512, type_vocab_size=2, dropout_rate=0.1,
      attention_dropout_rate=0.1, layer_norm_eps=1e-12, initializer_range=0.02,
      dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat="none",
      region_input_norm="none", region_part_norms=False, itc_dim=256,
      itc_image_pool="cls", itm_pool="cls", separate_layers=0, retrieval_itc_weight=0.0))


def mesh_default() -> ConfigDict:
  return ConfigDict(dict(shape=(-1, 1, 1), rules=DEFAULT_RULES))


def objective_default() -> ConfigDict:
  """The paper's masking rates and equal loss weights."""
  return ConfigDict(dict(
      mlm_rate=0.15, mlm_mask_prob=0.8, mlm_random_prob=0.1, region_rate=0.15,
      region_zero_prob=0.9, itm_neg_prob=0.5, itm_negatives="random", itm_random_share=0.0,
      itm_inputs="masked", mlm_visual_share=0.0, itm_foil_share=0.0, itm_foil_spatial=False,
      moc_loss="ce",
      mlm_weight=1.0, moc_weight=1.0, mrfr_weight=1.0, itm_weight=1.0, itm_rank_weight=0.0,
      itm_num_negatives=1, itc_weight=0.0))


def optim_default(learning_rate: float = 1e-4) -> ConfigDict:
  return ConfigDict(dict(
      learning_rate=learning_rate, warmup_steps=10_000, end_lr_fraction=0.0, weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0,
      # "pattern=factor,...": a larger step for the parameters a pattern names (optim.py).
      lr_scale=""))


def train_default(batch_size: int = 48, num_steps: int = 1_000_000) -> ConfigDict:
  return ConfigDict(dict(
      batch_size=batch_size, num_steps=num_steps, grad_accum_steps=1, log_every=100,
      checkpoint_every=5000, keep_checkpoints=3,
      skip_nonfinite=True, max_nonfinite_in_a_row=20,
      # Alarms (imagebert_jax/training/monitor.py): matching scores whose std across a batch stays below
      # collapse_min_score_std for collapse_patience log intervals; pretraining ITM accuracy
      # still at chance after itm_chance_steps steps (0: no such alarm).
      collapse_min_score_std=1e-3, collapse_patience=3, itm_chance_steps=0,
      # > 0: a jax.profiler trace of this many steps, from after step profile_first_step, in
      # <workdir>/<stage>/plugins/profile/ (TensorBoard's profile plugin).
      profile_steps=0, profile_first_step=10))


def data_default(directory: str = "", train_split: str = "train",
                 eval_split: str = "val") -> ConfigDict:
  return ConfigDict(dict(
      dir=directory, train_split=train_split, eval_split=eval_split, shuffle_buffer=1000,
      pair_shuffle_buffer=256, threadpool_size=0, ram_budget_gb=0.0, prefetch=2,
      # Generated data (train.prepare_data): kind 'scenes' (realistic: splits train, val, test,
      # and with web_images a web set of other images with alt-text captions, split 'web', which
      # a stage with web=True reads) or 'toy' (splits train_split and eval_split).
      synthetic=ConfigDict(dict(enabled=False, kind="toy", train_images=0, val_images=0,
                                eval_images=0, web_images=0, web=False, feature_dim=0,
                                min_regions=10, max_regions=16, captions_per_image=5))))


def init_default(*, from_stage: str = "", checkpoint: str = "") -> ConfigDict:
  """Where a stage's weights come from.

  bert         a Hugging Face BERT folder for the text side (applied first)
  checkpoint   a checkpoint folder of this project; every parameter it has is restored
  from_stage   an earlier stage of this run, instead of `checkpoint`; `select` picks its
               checkpoint: 'best' (the best validation RSUM of a fine-tuning stage, kept in
               <stage>/best_checkpoint; its last checkpoint when it kept none) or 'last'
  from_scratch fine-tuning and evaluation stages refuse to start without any of the above
               unless this says random initial weights are meant
  """
  return ConfigDict(dict(from_stage=from_stage, checkpoint=checkpoint, bert="", select="best",
                         from_scratch=False))


def pretrain_stage(data: ConfigDict, *, batch_size: int, num_steps: int,
                   learning_rate: float = 1e-4) -> ConfigDict:
  """A pretraining stage; it warns when image-text matching is still at chance after 10,000
  steps (train.itm_chance_steps)."""
  train = train_default(batch_size, num_steps)
  train.itm_chance_steps = 10_000
  return ConfigDict(dict(
      kind="pretrain", data=data, objective=objective_default(),
      optim=optim_default(learning_rate), train=train, init=init_default(),
      evals=ConfigDict(dict(loss=loss_eval()))))


# Evaluators (imagebert_jax/training/evaluators.py): a stage's `evals` maps a name to one of
# these, by `type`. `every`: every that many steps and at the last step; 0: at the last step
# only; -1: never.
def loss_eval(every: int = 10_000, batches: int = 50) -> ConfigDict:
  """The stage's loss and metrics on `data.eval_split`, over `batches` batches: eval/..."""
  return ConfigDict(dict(type="loss", every=every, batches=batches))


def validation_eval(every: int = 10_000, max_images: int = 100) -> ConfigDict:
  """Fine-tuning's retrieval on `data.eval_split`: R@1/5/10 and RSUM logged as val/..., and the
  parameters of the best RSUM kept in <stage>/best_checkpoint. A fixed subset keeps it cheap:
  the split's first `max_images` images with their captions (0: all of them)."""
  return ConfigDict(dict(type="validation", every=every, max_images=max_images,
                         captions_per_image=5, tile_images=8, tile_captions=128))


def retrieval_eval(protocol: str = "full") -> ConfigDict:
  """An evaluation stage's retrieval of `data.eval_split`: the cross-encoder on every pair
  (`rerank_k` = 0), or on each query's top `rerank_k` after the contrastive embeddings rank
  every candidate (imagebert_jax.retrieval.two_stage)."""
  # captions_per_image: each image's first captions in the caption file's order (the Karpathy
  # protocol's five); 0 keeps all. binding_file: tests of captions against foils of the same
  # words (imagebert_jax.retrieval.binding); 'auto': the dataset's binding_<eval_split>.jsonl
  # when it has one; '' none. grounding: each visual word of the captions masked and predicted
  # beside its own image and another (imagebert_jax.retrieval.grounding), where the dataset
  # names its detector's words.
  return ConfigDict(dict(type="retrieval", protocol=protocol, tile_images=8, tile_captions=128,
                         chunk_images=64, max_images=0, captions_per_image=5, progress=True,
                         rerank_k=0, binding_file="auto", grounding=True))


EVALUATOR_DEFAULTS = {"loss": loss_eval, "validation": validation_eval,
                      "retrieval": retrieval_eval}
EVALUATOR_KINDS = {"loss": ("pretrain", "finetune"), "validation": ("finetune",),
                   "retrieval": ("evaluate",)}  # the stage kinds each type serves


def retrieval_objective_default() -> ConfigDict:
  """The paper's three fine-tuning losses, combined, with online hard negatives."""
  return ConfigDict(dict(bce_weight=1.0, softmax_weight=1.0, triplet_weight=1.0, margin=0.2,
                         num_candidates=16, num_hard=3, itc_weight=0.0, hard_from_step=0,
                         mine_with="cross_encoder", foil_share=0.0, foil_spatial=False))


def finetune_stage(data: ConfigDict, *, from_stage: str = "", checkpoint: str = "",
                   batch_size: int = 24, num_steps: int = 50_000,
                   learning_rate: float = 5e-5) -> ConfigDict:
  """Retrieval fine-tuning: batch 24, lr 5e-5 as in the paper."""
  optim = optim_default(learning_rate)
  optim.warmup_steps = min(1000, num_steps // 10)
  return ConfigDict(dict(
      kind="finetune", data=data, objective=retrieval_objective_default(), optim=optim,
      train=train_default(batch_size, num_steps),
      init=init_default(from_stage=from_stage, checkpoint=checkpoint),
      evals=ConfigDict(dict(loss=loss_eval(), val=validation_eval()))))


def evaluate_stage(data: ConfigDict, *, from_stage: str = "", checkpoint: str = "",
                   protocol: str = "full") -> ConfigDict:
  """An evaluation stage: `evals.retrieval` scores the split `data.eval_split` (retrieval_eval)."""
  return ConfigDict(dict(
      kind="evaluate", data=data, evals=ConfigDict(dict(retrieval=retrieval_eval(protocol))),
      init=init_default(from_stage=from_stage, checkpoint=checkpoint)))


def retrieval_run(data_dir: str, *, train_split: str, num_steps: int, eval_every: int,
                  evaluations: dict[str, tuple[str, str]], run: str) -> ConfigDict:
  """A retrieval run: fine-tuning from `config.pretrained` on `config.data_dir` (validated on
  'val') and evaluations on 'test', each {stage name: (its weights: 'pretrained' or 'finetune',
  protocol)}. Both folders are config fields that every stage refers to; an empty `pretrained`
  is refused unless the stages say they start from BERT (init.bert) or from scratch.

  Fine-tuning validates retrieval on the first 1,000 'val' images (Flickr30k's whole val split,
  a fold of COCO's 5K) every `eval_every` steps; the evaluations after it score the checkpoint
  of the best validation RSUM (init.select='last' for the last one)."""
  c = run_config()
  c.data_dir = data_dir      # the built dataset, used by every stage
  c.pretrained = ""          # the pretraining checkpoints folder the fine-tuning starts from
  data = data_default(directory=c.get_ref("data_dir"), train_split=train_split,
                      eval_split="val")
  c.stages.finetune = finetune_stage(data, checkpoint=c.get_ref("pretrained"), batch_size=24,
                                     num_steps=num_steps, learning_rate=5e-5)
  c.stages.finetune.train.checkpoint_every = 2000
  c.stages.finetune.evals.loss.every = eval_every
  c.stages.finetune.evals.val.update(dict(every=eval_every, max_images=1000))
  for name, (weights, protocol) in evaluations.items():
    stage = evaluate_stage(data_default(directory=c.get_ref("data_dir"), eval_split="test"),
                           protocol=protocol)
    if weights == "pretrained":
      stage.init.checkpoint = c.get_ref("pretrained")
    else:
      stage.init.from_stage = weights
      stage.init.select = "best"
    stage.evals.retrieval.chunk_images = 40
    c.stages[name] = stage
  c.run = run
  return c

