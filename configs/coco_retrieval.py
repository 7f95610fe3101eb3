"""MSCOCO image<->text retrieval: fine-tune on Karpathy train + restval, score the 5K test (COCO
5K) and its five 1K folds (COCO 1K).

  python -m imagebert_jax.main --config configs/coco_retrieval.py --workdir runs/coco \
    --config.data_dir=data/coco \
    --config.pretrained=runs/pretrain/stage2/checkpoints \
    --config.text.vocab_file=bert-base-uncased/vocab.txt

The 5K test is 5,000 images x 25,000 captions = 125M pairs; its scores are reused by COCO 1K only
through the same stage when `protocol` is changed, so both are separate stages here.
"""

import ml_collections

from imagebert_jax import config_defaults as defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  # About 5 epochs of the 567K training pairs at batch 24 (the paper gives no step count).
  return defaults.retrieval_run(
      "data/coco", train_split="train+restval", num_steps=120_000, eval_every=10_000,
      evaluations={"zero_shot_5k": ("pretrained", "full"), "test_5k": ("finetune", "full"),
                   "test_1k": ("finetune", "coco1k")},
      run="zero_shot_5k,finetune,test_5k,test_1k")
