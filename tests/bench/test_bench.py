"""The benchmark's FLOP count and table, and the TensorFlow-free import of the model side."""

import json
import os
import subprocess
import sys

import pytest

from imagebert_jax.bench import model as bench
from imagebert_jax.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flops_match_the_reference_formula():
  """12 x (24 L d^2 + 4 L^2 d) + 2 x 100 x 2048 d, plus the decoder on masked positions."""
  cfg = ModelConfig()  # BERT-base, 44 + 100 positions
  length, d = 144, 768
  encoder = 12 * (24 * length * d * d + 4 * length * length * d)
  regions = 2 * 100 * 2048 * d
  decoder = 2 * (0.15 * 42) * d * 30522
  got = bench.flops_per_sample(cfg, text_words=42)
  assert abs(got["forward"] - (encoder + regions + decoder)) < 1e-3 * got["forward"]
  assert got["train"] == 3 * got["forward"]
  # About 77 GFLOP per training sample at the paper's shape.
  assert 75e9 < got["train"] < 80e9


def test_retrieval_flops_count_mining_training_and_the_contrastive_passes():
  """Hand count for a 2-layer, d = 8, m = 16 model over 4 text + 3 region positions of 10-d
  features: one forward is 2 x (8 L d^2 + 4 L d m + 4 L^2 d) + 2 R F d."""
  from imagebert_jax.objectives.retrieval import RetrievalObjective
  cfg = ModelConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16,
                    max_text_len=4, max_regions=3, region_feature_dim=10,
                    max_position_embeddings=16)
  layer = lambda n: 8 * n * 64 + 4 * n * 8 * 16 + 4 * n * n * 8
  forward = 2 * layer(7) + 2 * 3 * 10 * 8
  assert bench.flops_per_sample(cfg, 2, mlm_rate=0.0)["forward"] == forward
  # M = 8 mined of which K = 2 trained on: 16 forward passes, then 3 x 5 for training.
  obj = RetrievalObjective(num_candidates=8, num_hard=2)
  assert bench.retrieval_flops_per_pair(cfg, 2, obj) == 16 * forward + 15 * forward
  # M = K: random negatives, nothing mined.
  assert bench.retrieval_flops_per_pair(cfg, 2, RetrievalObjective(num_candidates=2,
                                                                   num_hard=2)) == 15 * forward
  # The contrastive loss adds each modality alone (text 4 positions; regions 3 and their input),
  # and mining by its similarities costs no forward pass.
  alone = 2 * layer(4) + 2 * layer(3) + 2 * 3 * 10 * 8
  obj = RetrievalObjective(num_candidates=8, num_hard=2, itc_weight=1.0, mine_with="itc")
  assert bench.retrieval_flops_per_pair(cfg, 2, obj) == 15 * forward + 3 * alone


@pytest.mark.subprocess
def test_bench_runs_on_cpu_and_prints_a_table(tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text(json.dumps({"label": "tests", "status": "failed", "seconds": 3}) + "\n")
  out = subprocess.run(
      [sys.executable, "-m", "imagebert_jax.bench", "--config", "configs/demo.py:smoke",
       "--batch_size", "16", "--steps", "2", "--warmup", "1", "--vocab_size", "64",
       "--score_tile", "4x8", "--results", str(results), "--label", "demo",
       "--modes", "train,finetune,score", "--candidates", "3", "--num_hard", "1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  header = lines[-5].split()
  assert header[:3] == ["mode", "device", "dtype"] and "samples_per_s" in header
  rows = {}
  for line in lines[-3:]:
    cells = line.split()
    rows[cells[0]] = dict(zip(header, [cells[0], " ".join(cells[1:3])] + cells[3:]))
  assert float(rows["train"]["samples_per_s"].replace(",", "")) > 0
  assert float(rows["score"]["pairs_per_s"].replace(",", "")) > 0
  assert rows["score"]["batch"] == "32"  # the 4 x 8 tile
  # The fine-tuning row: the best K = 1 of M = 3 candidates mined.
  assert set(rows) == {"train", "ft-M3K1", "score"}
  assert float(rows["ft-M3K1"]["samples_per_s"].replace(",", "")) > 0
  assert int(rows["train"]["params"].replace(",", "")) > 50_000
  # The rows went to --results too; --summary makes one table of them and of status rows.
  saved = [json.loads(line) for line in results.read_text().splitlines()]
  assert [(r["label"], r.get("mode")) for r in saved] == [
      ("tests", None), ("demo", "train"), ("demo", "ft-M3K1"), ("demo", "score")]
  status = {"label": "demo", "status": "ok", "seconds": 20}
  table = bench.summary_table(saved + [status]).splitlines()
  assert table[0].split()[:4] == ["label", "status", "impl", "mode"]
  assert table[2].split()[:2] == ["tests", "failed"]
  assert table[3].split()[:4] == ["demo", "ok", "ours", "train"]
  assert table[5].split()[:4] == ["demo", "ok", "ours", "score"]
  assert f"{saved[1]['samples_per_s']:,.0f}" in table[3]
  # Each row says how it ran: the config's dropout rates (the demo's are 0), the compile time.
  assert saved[1]["hidden_dropout"] == 0.0 and saved[1]["attention_dropout"] == 0.0
  assert saved[1]["compile_s"] > 0 and saved[1]["xla_gflop_per_step"] > 0


def test_summary_divides_ours_by_the_peer_like_for_like():
  ours = {"label": "a", "impl": "ours", "mode": "train", "batch": 128, "hidden_dropout": 0.1,
          "attention_dropout": 0.1, "samples_per_s": 300.0, "mfu": 0.30}
  peer = {"label": "p", "impl": "torch-peer", "mode": "train", "batch": 128,
          "hidden_dropout": 0.1, "attention_dropout": 0.1, "samples_per_s": 200.0}
  other = dict(ours, label="b", attention_dropout=0.0, samples_per_s=500.0)  # not like for like
  rows = bench.against_peer([peer, ours, other])
  assert rows[1]["x_peer"] == 1.5 and "x_peer" not in rows[2]
  assert abs(rows[0]["mfu"] - 0.20) < 1e-12  # the same FLOPs per sample, 200 / 300 the rate
  assert rows[1]["dropout"] == "0.1/0.1" and rows[2]["dropout"] == "0.1/0"
  table = bench.summary_table([peer, ours]).splitlines()
  assert "1.50x" in table[3] and "20.0%" in table[2]


@pytest.mark.subprocess
def test_model_side_imports_without_tensorflow():
  code = ("import sys; import imagebert_jax.model, imagebert_jax.objectives.pretraining, "
          "imagebert_jax.parallel, imagebert_jax.training.state, imagebert_jax.bench.model, "
          "imagebert_jax.training.metrics; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
