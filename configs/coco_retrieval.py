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
  c = defaults.run_config()
  c.data_dir = "data/coco"      # the built dataset, used by every stage
  c.pretrained = ""      # the pretraining checkpoints folder the fine-tuning starts from
  data = defaults.data_default(directory="", train_split="train+restval",
                               eval_split="val")
  # About 5 epochs of the 567K training pairs at batch 24 (the paper gives no step count).
  c.stages.finetune = defaults.finetune_stage(data, checkpoint="", batch_size=24,
                                              num_steps=120_000, learning_rate=5e-5)
  c.stages.finetune.objective.update(dict(num_candidates=16, num_hard=3, margin=0.2))
  c.stages.finetune.train.update(dict(eval_every=10_000, eval_batches=50,
                                      checkpoint_every=2000, log_every=100))
  for name, protocol in (("zero_shot_5k", "full"), ("test_5k", "full"), ("test_1k", "coco1k")):
    test_data = defaults.data_default(directory="", eval_split="test")
    c.stages[name] = defaults.evaluate_stage(test_data, protocol=protocol)
    c.stages[name].eval.update(dict(tile_images=8, tile_captions=128, chunk_images=40))
  c.stages.zero_shot_5k.init.checkpoint = c.get_ref("pretrained")
  c.stages.test_5k.init.from_stage = "finetune"
  c.stages.test_1k.init.from_stage = "finetune"
  c.stages.finetune.init.checkpoint = c.get_ref("pretrained")
  for stage in c.stages.values():
    stage.data.dir = c.get_ref("data_dir")
  c.run = "zero_shot_5k,finetune,test_5k,test_1k"
  return c
