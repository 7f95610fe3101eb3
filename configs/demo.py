"""The synthetic demo: a tiny ImageBERT pretrained on a generated scene dataset, on a laptop CPU.

Runs the real code path: dataset records written to disk by the builder, read through tf.data,
global arrays on a device mesh, the jitted step, Orbax checkpoints, TensorBoard and metrics.jsonl.
`demo.py:smoke` shrinks it further (used by the tests).
"""

import ml_collections

from imagebert_jax import config_defaults as defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = defaults.run_config()
  c.model.update(dict(
      vocab_size=0,  # 0: the size of the vocabulary file
      hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256, max_text_len=16, max_regions=16,
      region_feature_dim=32, num_object_classes=16, max_position_embeddings=64,
      dropout_rate=0.0, attention_dropout_rate=0.0, dtype="float32"))

  data = defaults.data_default(directory="", train_split="train", eval_split="test")
  data.synthetic.update(dict(enabled=True, train_images=200 if smoke else 3000,
                             eval_images=50 if smoke else 100, feature_dim=32, min_regions=10,
                             max_regions=16, captions_per_image=5))
  data.shuffle_buffer = 500
  data.pair_shuffle_buffer = 256
  steps = 12 if smoke else 1500
  c.stages.pretrain = defaults.pretrain_stage(data, batch_size=32 if smoke else 64,
                                              num_steps=steps, learning_rate=2e-3)
  # A model this small, trained from scratch, finds image-text matching late: its gradients
  # reach the encoder weakly at first (the text side has no BERT initialisation to lean on).
  # A larger matching weight, and an Adam epsilon that does not drown gradients of 1e-6, make it
  # appear within the demo's budget.
  c.stages.pretrain.objective.itm_weight = 5.0
  c.stages.pretrain.optim.eps = 1e-8
  c.stages.pretrain.optim.warmup_steps = 2 if smoke else 100
  c.stages.pretrain.optim.weight_decay = 0.01
  c.stages.pretrain.train.update(dict(
      log_every=4 if smoke else 50, checkpoint_every=6 if smoke else 500, keep_checkpoints=2,
      eval_every=steps, eval_batches=4 if smoke else 20))

  # Retrieval: fine-tune the pretrained model, and score every pair of the test split before and
  # after fine-tuning.
  c.stages.finetune = defaults.finetune_stage(data, from_stage="pretrain", batch_size=16,
                                              num_steps=6 if smoke else 300, learning_rate=1e-3)
  c.stages.finetune.optim.eps = 1e-8
  c.stages.finetune.objective.update(dict(num_candidates=8, num_hard=2))
  c.stages.finetune.train.update(dict(
      log_every=3 if smoke else 50, checkpoint_every=6 if smoke else 300, keep_checkpoints=1,
      eval_every=0, eval_batches=2 if smoke else 10))
  c.stages.zero_shot = defaults.evaluate_stage(data, from_stage="pretrain")
  c.stages.finetuned = defaults.evaluate_stage(data, from_stage="finetune")
  for name in ("zero_shot", "finetuned"):
    c.stages[name].eval.update(dict(tile_images=4, tile_captions=256, chunk_images=40,
                                    progress=False))
  c.run = "pretrain,finetune,zero_shot,finetuned"
  return c
