"""The learnability floor: a small dual encoder trained on a built dataset, with Recall@K.

    python -m benchmarks.dual_encoder --data_dir data/scenes [--max_regions 36] [--steps 1500]
        [--protocol 5x100]

Text: the sum of learned word vectors over the caption's WordPiece tokens (a bag of words).
Image: the maximum over its regions of a linear projection of the region features, standardised
per dimension with the training split's statistics (the 5-d box location appended). Both are
L2-normalised; a learned temperature scales their dot products; the loss is the in-batch softmax
cross-entropy in both directions (image->text and text->image). Scored on every (image, caption)
pair of the evaluation split and ranked exactly as the evaluation stage ranks (ties count against
the model), so its figures compare with ImageBERT's directly. When the dataset has binding tests
for the split (`binding_<split>.jsonl`, imagebert_jax.retrieval.binding), it reports its own shares: a bag
of words scores a caption and its foil of the same words alike, so every test is a tie.

A cross-encoder that sees the same words and the same regions jointly should do at least as well.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def vocab_path(data_dir: str) -> str:
  from imagebert_jax.data import records
  vocab = records.read_info(data_dir)["vocab_file"]
  return vocab if vocab.startswith("/") else os.path.join(data_dir, vocab)


def load(data_dir: str, split: str, max_text_len: int, max_regions: int):
  from imagebert_jax.data import splits
  from imagebert_jax.data.tokenizer import special_ids
  ids = special_ids(vocab_path(data_dir))
  s = splits.load_split(data_dir, split, max_text_len=max_text_len, max_regions=max_regions,
                        pad_id=ids.pad_id, sep_id=ids.sep_id)
  return s, ids


def train_and_score(data_dir: str, *, train_split: str = "train", eval_split: str = "test",
                    max_text_len: int = 24, max_regions: int = 36, dim: int = 64,
                    steps: int = 1500, batch_size: int = 128, learning_rate: float = 3e-3,
                    seed: int = 0, protocol: str = "full") -> dict:
  """Trains the dual encoder; returns Recall@K on `eval_split` by `protocol` (as the evaluation
  stage's `eval.protocol`) and the training time."""
  from imagebert_jax.retrieval import evaluate
  train, ids = load(data_dir, train_split, max_text_len, max_regions)
  test, _ = load(data_dir, eval_split, max_text_len, max_regions)
  r = np.arange(max_regions)
  valid = r[None, :] < train.num_regions[:, None]
  feats = train.region_feat.astype(np.float32)
  mean = feats[valid].mean(0)
  std = feats[valid].std(0) + 1e-3

  def image_inputs(split):
    x = (split.region_feat.astype(np.float32) - mean) / std
    x = np.concatenate([x, split.region_loc], -1)
    return jnp.asarray(x), jnp.asarray(r[None, :] < split.num_regions[:, None])

  special = {ids.pad_id, ids.cls_id, ids.sep_id}

  def word_mask(text):
    return jnp.asarray(~np.isin(text, list(special)))

  tr_x, tr_m = image_inputs(train)
  te_x, te_m = image_inputs(test)
  tr_t, te_t = jnp.asarray(train.text_ids), jnp.asarray(test.text_ids)
  tr_w, te_w = word_mask(train.text_ids), word_mask(test.text_ids)
  owner = jnp.asarray(train.caption_image)

  key = jax.random.key(seed)
  k1, k2 = jax.random.split(key)
  params = {
      "words": 0.1 * jax.random.normal(k1, (ids.vocab_size, dim)),
      "proj": jax.random.normal(k2, (tr_x.shape[-1], dim)) / np.sqrt(tr_x.shape[-1]),
      "log_temp": jnp.log(jnp.float32(10.0)),
  }

  def embed_images(p, x, m):
    h = jnp.einsum("nrd,de->nre", x, p["proj"])
    h = jnp.max(jnp.where(m[..., None], h, -1e9), axis=1)
    return h / jnp.linalg.norm(h, axis=-1, keepdims=True)

  def embed_texts(p, t, w):
    h = jnp.sum(p["words"][t] * w[..., None], axis=1)
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)

  def loss_fn(p, caps):
    img = owner[caps]
    logits = jnp.exp(p["log_temp"]) * embed_texts(p, tr_t[caps], tr_w[caps]) @ embed_images(
        p, tr_x[img], tr_m[img]).T
    same = img[:, None] == img[None, :]  # captions of one image in a batch are not negatives
    logits_t = jnp.where(same & ~jnp.eye(len(caps), dtype=bool), -1e9, logits)
    labels = jnp.arange(len(caps))
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits_t, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits_t.T, labels).mean())

  tx = optax.adam(learning_rate)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, k):
    caps = jax.random.choice(k, tr_t.shape[0], (batch_size,), replace=False)
    loss, g = jax.value_and_grad(loss_fn)(p, caps)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  t0 = time.time()
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(key, i))
  loss = float(loss)
  train_seconds = time.time() - t0
  image_emb = embed_images(params, te_x, te_m)
  scores = np.asarray(image_emb @ embed_texts(params, te_t, te_w).T)
  metrics = evaluate.protocol_metrics(scores, test.caption_image, test.source_order, protocol)
  out = {"metrics": metrics, "final_loss": loss, "train_seconds": round(train_seconds, 1),
         "images": test.num_images, "captions": test.num_captions}
  binding_path = os.path.join(data_dir, f"binding_{eval_split}.jsonl")
  if os.path.exists(binding_path):  # the dataset's binding tests (imagebert_jax.retrieval.binding)
    from imagebert_jax.retrieval import binding
    from imagebert_jax.data.tokenizer import Tokenizer
    tests = binding.read_tests(binding_path, test.image_ids)
    ids_ = Tokenizer(vocab_path(data_dir), max_text_len).encode_padded(
        tests.true_captions + tests.false_captions)
    text = np.asarray(embed_texts(params, jnp.asarray(ids_), word_mask(ids_)))
    images = np.concatenate([tests.image_index, tests.image_index])
    cosine = np.sum(text * np.asarray(image_emb)[images], axis=-1)
    n = len(tests)
    out["binding"] = binding.shares(cosine[:n], cosine[n:], tests.kinds)
  return out


def main() -> None:
  from absl import app, flags
  flags.DEFINE_string("data_dir", None, "A built dataset folder.")
  flags.DEFINE_string("train_split", "train", "Training split.")
  flags.DEFINE_string("eval_split", "test", "Split scored on every pair.")
  flags.DEFINE_integer("max_text_len", 24, "Text positions (as the model's config).")
  flags.DEFINE_integer("max_regions", 36, "Regions per image (as the model's config).")
  flags.DEFINE_integer("steps", 1500, "Training steps.")
  flags.DEFINE_integer("batch_size", 128, "Captions per step.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.DEFINE_string("protocol", "full", "Evaluation protocol: full, coco1k, first1k or "
                      "<folds>x<images>, as the evaluation stage's eval.protocol.")
  flags.mark_flags_as_required(["data_dir"])
  f = flags.FLAGS

  def run(_):
    from imagebert_jax.retrieval.evaluate import format_metrics
    out = train_and_score(f.data_dir, train_split=f.train_split, eval_split=f.eval_split,
                          max_text_len=f.max_text_len, max_regions=f.max_regions,
                          steps=f.steps, batch_size=f.batch_size, seed=f.seed,
                          protocol=f.protocol)
    print(format_metrics({"dual encoder": out["metrics"]}))
    if "binding" in out:
      from imagebert_jax.retrieval import binding
      print(binding.format_table({"dual encoder": out["binding"]}))
    print(json.dumps({k: v for k, v in out.items() if k not in ("metrics", "binding")}))

  app.run(run)


if __name__ == "__main__":
  main()
