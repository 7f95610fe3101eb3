"""Flickr30k image<->text retrieval: fine-tune a pretrained ImageBERT, then score the 1K test.

Build the dataset first (README, "Building a dataset"), then:

  python -m imagebert_jax.main --config configs/flickr30k_retrieval.py --workdir runs/flickr30k \
    --config.data_dir=data/flickr30k \
    --config.pretrained=runs/pretrain/stage2/checkpoints \
    --config.text.vocab_file=bert-base-uncased/vocab.txt

Stages: `zero_shot` (the pretrained checkpoint through its matching head), `finetune` (batch 24,
lr 5e-5, the three losses with hard negatives in both directions, as in the paper; retrieval
validated on the 1K val images every 5,000 steps, the best RSUM kept in finetune/best_checkpoint),
`test` (that best checkpoint on the 1,000 test images x 5,000 captions;
--config.stages.test.init.select=last scores the last one). Karpathy splits: train 29K images,
val and test 1K each. `pretrained` must be given: an empty one is refused before anything runs.
"""

import ml_collections

from imagebert_jax.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  # About 10 epochs of the 145K training pairs at batch 24 (the paper gives no step count).
  # The zero-shot run scores the same checkpoint the fine-tuning starts from.
  return defaults.retrieval_run(
      "data/flickr30k", train_split="train", num_steps=60_000, eval_every=5000,
      evaluations={"zero_shot": ("pretrained", "full"), "test": ("finetune", "full")},
      run="zero_shot,finetune,test")
