"""The PyTorch peer of the GPU session (benchmarks/torch_peer.py), on the CPU at a tiny shape.

Needs torch and transformers, which the project does not install (the GPU image has both);
skipped without them: `pip install torch==2.13.0 transformers` to run it here.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--mlp", "128", "--text_len", "12",
        "--regions", "10", "--feature_dim", "32", "--vocab", "1200", "--classes", "20",
        "--device", "cpu"]


def _peer():
  spec = importlib.util.spec_from_file_location(
      "torch_peer", os.path.join(ROOT, "benchmarks", "torch_peer.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["torch_peer"] = module
  spec.loader.exec_module(module)
  return module


def test_masking_follows_the_paper_rates():
  peer = _peer()
  a = peer.parse_args(TINY)
  gen = torch.Generator().manual_seed(0)
  b = peer.synthetic_batch(a, 64, gen)
  m = peer.mask_batch(b)
  text = b["text_ids"].numpy()
  pos, w = m["mlm_pos"].numpy(), m["mlm_weights"].numpy()
  swapped = m["itm_labels"].numpy() == 0
  for i in range(64):
    chosen = pos[i][(peer._choose(b["text_ids"] > 0, 0.15)[1][i]).numpy()]
    assert len(chosen) == round(0.15 * 10)  # 10 words between [CLS] and [SEP]: 2 masked (1.5)
    assert np.all((pos[i] >= 1) & (pos[i] <= 10))  # never [CLS] or [SEP]
    assert np.array_equal(m["mlm_labels"].numpy()[i], text[i, pos[i]])
    # Masked-word and region losses count only matched pairs, as ours do.
    assert not w[i].any() if swapped[i] else w[i].sum() == 2
  # The zeroed regions are exactly those chosen for the region objectives.
  zeroed = (m["input_feat"].float().abs().sum(-1) == 0).numpy()
  rpos = m["region_pos"].numpy()
  for i in range(64):
    assert set(np.flatnonzero(zeroed[i])) <= set(rpos[i])
  assert 0.3 < swapped.mean() < 0.7


def test_peer_rows_say_what_ran(tmp_path):
  peer = _peer()
  results = tmp_path / "r.jsonl"
  rows = peer.main(TINY + ["--batch_size", "8", "--score_batch", "16", "--steps", "2",
                           "--warmup", "1", "--dtype", "float32", "--results", str(results),
                           "--hidden_dropout", "0.1", "--attention_dropout", "0.05"])
  saved = [json.loads(line) for line in results.read_text().splitlines()]
  assert [r["mode"] for r in saved] == ["train", "score"] == [r["mode"] for r in rows]
  for r in saved:
    assert r["impl"] == "torch-peer" and r["label"] == "torch peer"
    assert r["positions"] == 22
  assert (saved[0]["hidden_dropout"], saved[0]["attention_dropout"]) == (0.1, 0.05)
  assert (saved[1]["hidden_dropout"], saved[1]["attention_dropout"]) == (0.0, 0.0)  # eval mode
  assert saved[0]["samples_per_s"] > 0 and saved[1]["pairs_per_s"] > 0
  # The four objectives from random weights: about ln 2 + ln V + ln C + the features' variance.
  assert np.log(1200) < saved[0]["loss"] < np.log(1200) + np.log(20) + 3
