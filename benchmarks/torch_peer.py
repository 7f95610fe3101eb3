"""The PyTorch peer: ImageBERT's pretraining step and cross-encoder scoring written the way a
PyTorch user would, timed on the same card, shapes, dropouts and objectives as `imagebert-bench`.

  python benchmarks/torch_peer.py --batch_size 128 --modes train,score --results r.jsonl

The encoder is Hugging Face's `BertModel` with PyTorch's scaled-dot-product attention
(`attn_implementation='sdpa'`, which keeps attention dropout inside the fused kernel) over the
words' embeddings followed by the regions' (a projection of the 2048-d features plus one of the
5-d box, normalised, segment 1). One training step does what ours does (imagebert_jax/objectives/
pretraining.py, the paper's four objectives): a share of the pairs get another pair's image
(image-text matching on the pooled [CLS]), 15% of the words are masked and predicted through the
tied decoder on the masked positions only, 15% of the regions are zeroed and their detector class
(1,600) and features (L2 regression) predicted; loss = the four summed; gradients clipped to norm
1; fused AdamW; bf16 autocast with float32 weights. Scoring runs the encoder in eval mode on
`--score_batch` (image, caption) pairs and reads the matching logit.

Each row printed and appended to --results (JSON lines) names itself the peer's
(`"impl": "torch-peer"`) and records the hidden and attention dropout rates it ran with; the
session's summary (`python -m imagebert_jax.bench --summary`) divides ours by it, row by row.
Nothing is downloaded: the weights start random (their values do not change the cost).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

# BERT-uncased's special ids (the bench's synthetic batches use the same).
PAD, CLS, SEP, MASK, FIRST_WORD = 0, 101, 102, 103, 999


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--score_batch", type=int, default=1024, help="pairs per scoring step")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--modes", default="train,score", help="train, score or both")
  p.add_argument("--hidden_dropout", type=float, default=0.1)
  p.add_argument("--attention_dropout", type=float, default=0.1)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--mlp", type=int, default=3072)
  p.add_argument("--text_len", type=int, default=44, help="text positions ([CLS] words [SEP])")
  p.add_argument("--regions", type=int, default=100)
  p.add_argument("--feature_dim", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--classes", type=int, default=1600)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="autocast dtype (weights stay float32)")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--results", default="", help="append each row to this JSON-lines file")
  p.add_argument("--label", default="torch peer")
  return p.parse_args(argv)


class Peer(nn.Module):
  """BertModel over [words | regions] with ImageBERT's four pretraining heads."""

  def __init__(self, a: argparse.Namespace):
    super().__init__()
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=a.heads, intermediate_size=a.mlp,
                     hidden_dropout_prob=a.hidden_dropout,
                     attention_probs_dropout_prob=a.attention_dropout,
                     max_position_embeddings=512, type_vocab_size=2)
    cfg._attn_implementation = "sdpa"
    self.bert = BertModel(cfg, add_pooling_layer=True)
    h = a.hidden
    self.region_feature = nn.Linear(a.feature_dim, h)
    self.region_location = nn.Linear(5, h)
    self.region_norm = nn.LayerNorm(h, eps=1e-12)
    self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12))
    self.mlm_bias = nn.Parameter(torch.zeros(a.vocab))
    self.moc = nn.Linear(h, a.classes)
    self.mrfr = nn.Linear(h, a.feature_dim)
    self.itm = nn.Linear(h, 1)

  def encode(self, text_ids, text_mask, feat, loc, region_mask):
    words = self.bert.embeddings.word_embeddings(text_ids)
    if not torch.is_autocast_enabled(feat.device.type):  # features are stored as float16
      feat = feat.to(self.region_feature.weight.dtype)
    regions = self.region_norm(self.region_feature(feat) + self.region_location(loc))
    x = torch.cat([words, regions], dim=1)
    segments = torch.cat([torch.zeros_like(text_ids),
                          torch.ones(region_mask.shape, dtype=text_ids.dtype,
                                     device=text_ids.device)], dim=1)
    mask = torch.cat([text_mask, region_mask], dim=1).long()
    out = self.bert(inputs_embeds=x, token_type_ids=segments, attention_mask=mask)
    return out.last_hidden_state, out.pooler_output

  def forward(self, b: dict) -> torch.Tensor:
    """The summed loss of the four objectives over a masked batch (`mask_batch`)."""
    t = b["text_ids"].shape[1]
    hidden, pooled = self.encode(b["input_ids"], b["text_ids"] != PAD, b["input_feat"],
                                 b["region_loc"], b["region_mask"])
    itm = self.itm(pooled)[:, 0].float()
    l_itm = F.binary_cross_entropy_with_logits(itm, b["itm_labels"])
    words = torch.gather(hidden[:, :t], 1, b["mlm_pos"][..., None].expand(-1, -1, hidden.shape[-1]))
    logits = (self.mlm_transform(words) @ self.bert.embeddings.word_embeddings.weight.T
              + self.mlm_bias).float()
    l_mlm = _weighted(F.cross_entropy(logits.flatten(0, 1), b["mlm_labels"].flatten(),
                                      reduction="none"), b["mlm_weights"])
    regions = torch.gather(hidden[:, t:], 1,
                           b["region_pos"][..., None].expand(-1, -1, hidden.shape[-1]))
    l_moc = _weighted(F.cross_entropy(self.moc(regions).float().flatten(0, 1),
                                      b["region_labels"].flatten(), reduction="none"),
                      b["region_weights"])
    target = torch.gather(b["region_feat"], 1,
                          b["region_pos"][..., None].expand(-1, -1, b["region_feat"].shape[-1]))
    l_mrfr = _weighted(((self.mrfr(regions).float() - target.float()) ** 2).mean(-1).flatten(),
                       b["region_weights"])
    return l_itm + l_mlm + l_moc + l_mrfr

  def score(self, text_ids, feat, loc) -> torch.Tensor:
    region_mask = torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)
    _, pooled = self.encode(text_ids, text_ids != PAD, feat, loc, region_mask)
    return self.itm(pooled)[:, 0].float()


def _weighted(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
  w = weights.flatten().float()
  return (losses * w).sum() / w.sum().clamp(min=1.0)


def synthetic_batch(a: argparse.Namespace, batch: int, gen: torch.Generator) -> dict:
  """Full-length captions and `--regions` regions per image, as the bench's batches."""
  dev = a.device
  words = torch.randint(FIRST_WORD, a.vocab, (batch, a.text_len), generator=gen, device=dev)
  words[:, 0], words[:, -1] = CLS, SEP
  return {"text_ids": words,
          "region_feat": torch.relu(torch.randn(batch, a.regions, a.feature_dim, generator=gen,
                                                device=dev)).half(),
          "region_loc": torch.rand(batch, a.regions, 5, generator=gen, device=dev),
          "region_mask": torch.ones(batch, a.regions, dtype=torch.bool, device=dev),
          "region_class": torch.randint(0, a.classes, (batch, a.regions), generator=gen,
                                        device=dev)}


def _choose(valid: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
  """round(rate x valid) random positions per row (at least one), in a fixed number of slots:
  (positions [B, S], weights [B, S])."""
  slots = max(1, math.ceil(rate * valid.shape[1]))
  scores = torch.where(valid, torch.rand(valid.shape, device=valid.device), -1.0)
  top, pos = scores.topk(slots, dim=1)
  count = (valid.sum(1, keepdim=True) * rate).round().clamp(min=1)
  weights = (torch.arange(slots, device=valid.device)[None] < count) & (top >= 0)
  return pos, weights


def mask_batch(b: dict) -> dict:
  """The step's masking, drawn on the device as ours is: half the pairs get the next pair's
  image; 15% of the words (80% [MASK], 10% random, 10% kept) and 15% of the regions (zeroed)."""
  text, feat = b["text_ids"], b["region_feat"]
  n = text.shape[0]
  swap = torch.rand(n, device=text.device) < 0.5
  src = torch.where(swap, torch.roll(torch.arange(n, device=text.device), 1),
                    torch.arange(n, device=text.device))
  feat, loc = feat[src], b["region_loc"][src]
  words = (text != PAD) & (text != CLS) & (text != SEP)
  mlm_pos, mlm_w = _choose(words, 0.15)
  labels = torch.gather(text, 1, mlm_pos)
  u = torch.rand(mlm_pos.shape, device=text.device)
  random_words = torch.randint_like(labels, FIRST_WORD, int(text.max()) + 1)
  replaced = torch.where(u < 0.8, MASK, torch.where(u < 0.9, random_words, labels))
  input_ids = text.scatter(1, mlm_pos, torch.where(mlm_w, replaced, labels))
  region_pos, region_w = _choose(b["region_mask"], 0.15)
  zero = torch.zeros_like(feat)
  keep = torch.ones(feat.shape[:2], dtype=feat.dtype, device=feat.device)
  keep = keep.scatter(1, region_pos, torch.where(region_w, 0.0, 1.0).to(feat.dtype))
  input_feat = torch.where(keep[..., None] > 0, feat, zero)
  return {**b, "input_ids": input_ids, "input_feat": input_feat, "region_feat": feat,
          "region_loc": loc, "itm_labels": (~swap).float(), "mlm_pos": mlm_pos,
          "mlm_labels": labels, "mlm_weights": mlm_w & ~swap[:, None],
          "region_pos": region_pos, "region_labels": torch.gather(b["region_class"][src], 1,
                                                                  region_pos),
          "region_weights": region_w & ~swap[:, None]}


def _sync(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def _device_name(device: str) -> str:
  if device.startswith("cuda"):
    return torch.cuda.get_device_name()
  return "cpu"


def bench_train(a: argparse.Namespace, model: Peer) -> dict:
  model.train()
  fused = a.device.startswith("cuda")
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-6,
                          weight_decay=0.01, fused=fused)
  gen = torch.Generator(device=a.device).manual_seed(0)
  batches = [synthetic_batch(a, a.batch_size, gen) for _ in range(2)]
  dtype = getattr(torch, a.dtype)

  def step(b):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=a.device.split(":")[0], dtype=dtype,
                        enabled=a.dtype != "float32"):
      loss = model(mask_batch(b))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    return loss

  first = time.perf_counter()
  for i in range(a.warmup):
    loss = step(batches[i % 2])
  _sync(a.device)
  warmup_s = time.perf_counter() - first
  if a.device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for i in range(a.steps):
    loss = step(batches[i % 2])
  _sync(a.device)
  seconds = time.perf_counter() - start
  return {"mode": "train", "batch": a.batch_size, "step_ms": 1000 * seconds / a.steps,
          "samples_per_s": a.batch_size * a.steps / seconds, "warmup_s": warmup_s,
          "loss": float(loss.detach()), "peak_mem_gib": _peak_memory(a.device)}


def bench_score(a: argparse.Namespace, model: Peer) -> dict:
  model.eval()
  gen = torch.Generator(device=a.device).manual_seed(1)
  b = synthetic_batch(a, a.score_batch, gen)
  dtype = getattr(torch, a.dtype)

  @torch.no_grad()
  def step():
    with torch.autocast(device_type=a.device.split(":")[0], dtype=dtype,
                        enabled=a.dtype != "float32"):
      return model.score(b["text_ids"], b["region_feat"], b["region_loc"])

  for _ in range(a.warmup):
    out = step()
  _sync(a.device)
  if a.device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(a.steps):
    out = step()
  _sync(a.device)
  seconds = time.perf_counter() - start
  del out
  return {"mode": "score", "batch": a.score_batch, "step_ms": 1000 * seconds / a.steps,
          "pairs_per_s": a.score_batch * a.steps / seconds, "peak_mem_gib": _peak_memory(a.device)}


def _peak_memory(device: str) -> float | None:
  if device.startswith("cuda"):
    return torch.cuda.max_memory_allocated() / 2**30
  return None


def main(argv=None) -> list[dict]:
  a = parse_args(argv)
  torch.manual_seed(0)
  if a.device.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = True
  model = Peer(a).to(a.device)
  common = {"impl": "torch-peer", "device": _device_name(a.device), "torch": torch.__version__,
            "dtype": a.dtype, "positions": a.text_len + a.regions,
            "hidden_dropout": a.hidden_dropout, "attention_dropout": a.attention_dropout,
            "params": sum(p.numel() for p in model.parameters())}
  try:
    import transformers
    common["transformers"] = transformers.__version__
  except ImportError:  # pragma: no cover - Peer() needs it
    pass
  rows = []
  modes = [m.strip() for m in a.modes.split(",") if m.strip()]
  for mode in modes:
    if mode == "train":
      rows.append({**bench_train(a, model), **common})
    elif mode == "score":  # eval mode: no dropout, as ours scores
      rows.append({**bench_score(a, model), **common, "hidden_dropout": 0.0,
                   "attention_dropout": 0.0})
    else:
      raise SystemExit(f"--modes: unknown mode {mode!r} (want train, score)")
  for r in rows:
    rate = (f"{r['samples_per_s']:,.0f} samples/s" if "samples_per_s" in r
            else f"{r['pairs_per_s']:,.0f} pairs/s")
    print(f"torch peer {r['mode']}: batch {r['batch']}, {r['step_ms']:.1f} ms/step, {rate}, "
          f"dropout {r['hidden_dropout']}/{r['attention_dropout']} (hidden/attention), "
          f"{r['device']}, torch {r['torch']}")
  if a.results:
    with open(a.results, "a", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps({"label": a.label, **r}) + "\n")
  return rows


if __name__ == "__main__":
  main()
