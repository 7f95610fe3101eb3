"""The paper's full recipe, stage after stage (Qi et al. 2020, sections 3-4):

  stage1     pretraining on large weak web data (the paper's LAIT, 10M pairs), text side from
             BERT-base uncased, the four objectives, batch 48, Adam 1e-4
  stage2     pretraining on Conceptual Captions + SBU, from stage 1
  finetune   Flickr30k retrieval, from stage 2: batch 24, lr 5e-5, the three losses, hard
             negatives in both directions
  zero_shot  Flickr30k 1K test with the stage-2 model;  test  the same with the fine-tuned one

Every stage starts from the previous stage's final checkpoint; rerunning the command skips the
stages that finished and resumes the one that did not. Paths are config fields (local folders or
bucket URLs); the datasets are the ones the README's build commands make (web, cc, sbu: one
`train` split each; flickr30k: the Karpathy splits train, val and test):

  python -m imagebert_jax.main --config configs/imagebert_paper.py --workdir runs/paper \
    --config.bert=bert-base-uncased --config.text.vocab_file=bert-base-uncased/vocab.txt \
    --config.web_data=data/web --config.cc_sbu_data=data/cc,data/sbu --config.flickr_data=data/flickr30k

The pretraining stages hold out no split of their own (the web, CC and SBU builds make only
`train`): how far pretraining went is measured by `zero_shot`, retrieval on Flickr30k's test
split. A held-out pretraining split can be named with `--config.stages.stage1.data.eval_split`
(and stage2's) once the datasets have one.

Step counts are not all in the paper; the ones here are this project's choice (about one epoch
of stage 1 and four of stage 2 at batch 48, with gradient accumulation available through
`train.grad_accum_steps`).
"""

import ml_collections

from imagebert_jax.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.run_config()
  # Paths (shared by the stages through references; override these).
  c.bert = ""                          # BERT-base uncased: config.json + model.safetensors
  c.web_data = "data/web"              # stage 1: built from your web pairs (jsonl captions)
  c.cc_sbu_data = "data/cc,data/sbu"   # stage 2: both datasets, sampled by size
  c.flickr_data = "data/flickr30k"     # fine-tuning and evaluation

  c.stages.stage1 = defaults.pretrain_stage(
      defaults.data_default(train_split="train", eval_split=""), batch_size=48,
      num_steps=200_000, learning_rate=1e-4)
  c.stages.stage1.data.dir = c.get_ref("web_data")
  c.stages.stage1.init.bert = c.get_ref("bert")

  c.stages.stage2 = defaults.pretrain_stage(
      defaults.data_default(train_split="train", eval_split=""), batch_size=48,
      num_steps=300_000, learning_rate=1e-4)
  c.stages.stage2.data.dir = c.get_ref("cc_sbu_data")
  c.stages.stage2.init.from_stage = "stage1"

  c.stages.finetune = defaults.finetune_stage(
      defaults.data_default(train_split="train", eval_split="val"), from_stage="stage2",
      batch_size=24, num_steps=60_000, learning_rate=5e-5)
  c.stages.finetune.data.dir = c.get_ref("flickr_data")
  # Flickr30k's whole val split; `test` scores the best
  c.stages.finetune.evals.val.max_images = 1000
  for name, source in (("zero_shot", "stage2"), ("test", "finetune")):
    c.stages[name] = defaults.evaluate_stage(defaults.data_default(eval_split="test"),
                                             from_stage=source, protocol="full")
    c.stages[name].data.dir = c.get_ref("flickr_data")
  c.run = "stage1,stage2,zero_shot,finetune,test"
  return c
