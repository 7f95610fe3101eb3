"""MSCOCO image<->text retrieval: fine-tune on Karpathy train + restval, score the 5K test once
and report both COCO 5K and the mean over its five 1K folds (COCO 1K).

  python -m imagebert_jax.main --config configs/coco_retrieval.py --workdir runs/coco \
    --config.data_dir=data/coco \
    --config.pretrained=runs/pretrain/stage2/checkpoints \
    --config.text.vocab_file=bert-base-uncased/vocab.txt

The 5K test is 5,000 images x 25,000 captions (each image's first five) = 125M pairs; COCO 1K is
read from the same scores (metrics.json holds the 5K metrics under their plain names and the 1K
ones as `coco1k/...`). Fine-tuning validates retrieval on the first 1,000 val images every 10,000
steps and keeps the best RSUM in finetune/best_checkpoint, which `test` scores
(--config.stages.test.init.select=last for the last checkpoint). `pretrained` must be given.
"""

import ml_collections

from imagebert_jax.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  # About 5 epochs of the 567K training pairs at batch 24 (the paper gives no step count).
  return defaults.retrieval_run(
      "data/coco", train_split="train+restval", num_steps=120_000, eval_every=10_000,
      evaluations={"zero_shot": ("pretrained", "full,coco1k"),
                   "test": ("finetune", "full,coco1k")},
      run="zero_shot,finetune,test")
