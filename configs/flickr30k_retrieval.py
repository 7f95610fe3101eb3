"""Flickr30k image<->text retrieval: fine-tune a pretrained ImageBERT, then score the 1K test.

Build the dataset first (README, "Building a dataset"), then:

  python -m imagebert_jax.main --config configs/flickr30k_retrieval.py --workdir runs/flickr30k \
    --config.data_dir=data/flickr30k \
    --config.pretrained=runs/pretrain/stage2/checkpoints \
    --config.text.vocab_file=bert-base-uncased/vocab.txt

Stages: `zero_shot` (the pretrained checkpoint through its matching head), `finetune` (batch 24,
lr 5e-5, the three losses with hard negatives in both directions, as in the paper), `test` (the
fine-tuned model on the 1,000 test images x 5,000 captions). Karpathy splits: train 29K images,
val and test 1K each.
"""

import ml_collections

from imagebert_jax import config_defaults as defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.run_config()
  c.data_dir = "data/flickr30k"      # the built dataset, used by every stage
  c.pretrained = ""      # the pretraining checkpoints folder the fine-tuning starts from
  data = defaults.data_default(directory="", train_split="train",
                               eval_split="test")
  # About 10 epochs of the 145K training pairs at batch 24 (the paper gives no step count).
  c.stages.finetune = defaults.finetune_stage(data, checkpoint="", batch_size=24,
                                              num_steps=60_000, learning_rate=5e-5)
  c.stages.finetune.objective.update(dict(num_candidates=16, num_hard=3, margin=0.2))
  c.stages.finetune.train.update(dict(eval_every=5000, eval_batches=50,
                                      checkpoint_every=2000, log_every=100))
  c.stages.finetune.data.eval_split = "val"
  def test_data():
    return defaults.data_default(directory="", train_split="train", eval_split="test")

  # The zero-shot run scores the same checkpoint the fine-tuning starts from.
  c.stages.zero_shot = defaults.evaluate_stage(test_data(), protocol="full")
  c.stages.zero_shot.init.checkpoint = c.get_ref("pretrained")
  c.stages.test = defaults.evaluate_stage(test_data(), from_stage="finetune", protocol="full")
  for name in ("zero_shot", "test"):
    c.stages[name].eval.update(dict(tile_images=8, tile_captions=128, chunk_images=40))
  c.stages.finetune.init.checkpoint = c.get_ref("pretrained")
  for stage in c.stages.values():
    stage.data.dir = c.get_ref("data_dir")
  c.run = "zero_shot,finetune,test"
  return c
