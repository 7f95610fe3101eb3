"""ImageBERT-base as in the paper: BERT-base over 44 text positions and 100 regions (144 in all).

One pretraining stage on a built dataset (see the README for building one). Batch 48, Adam at
1e-4 as in the paper. Override anything from the command line, e.g.
  python -m imagebert_jax.main --config configs/imagebert_base.py --workdir runs/base \
    --config.stages.pretrain.data.dir=data/cc,data/sbu \
    --config.text.vocab_file=bert-base-uncased/vocab.txt
No held-out split by default (the README's CC and SBU builds make only `train`);
`--config.stages.pretrain.data.eval_split=<split>` names one a dataset has.
"""

import ml_collections

from imagebert_jax.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = defaults.run_config()
  c.stages.pretrain = defaults.pretrain_stage(defaults.data_default(eval_split=""), batch_size=48,
                                              num_steps=1_000_000, learning_rate=1e-4)
  c.run = "pretrain"
  return c
