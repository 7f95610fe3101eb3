"""The benchmark's FLOP count and table, and the TensorFlow-free import of the model side."""

import json
import os
import subprocess
import sys

import pytest

from imagebert_jax import bench
from imagebert_jax.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.subprocess
def test_bench_runs_on_cpu_and_prints_a_table(tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text(json.dumps({"label": "tests", "status": "failed", "seconds": 3}) + "\n")
  out = subprocess.run(
      [sys.executable, "-m", "imagebert_jax.bench", "--config", "configs/demo.py",
       "--batch_size", "16", "--steps", "2", "--warmup", "1", "--vocab_size", "64",
       "--score_tile", "4x8", "--results", str(results), "--label", "demo"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  header = lines[-4].split()
  assert header[:3] == ["mode", "device", "dtype"] and "samples_per_s" in header
  rows = {}
  for line in lines[-2:]:
    cells = line.split()
    rows[cells[0]] = dict(zip(header, [cells[0], " ".join(cells[1:3])] + cells[3:]))
  assert float(rows["train"]["samples_per_s"].replace(",", "")) > 0
  assert float(rows["score"]["pairs_per_s"].replace(",", "")) > 0
  assert rows["score"]["batch"] == "32"  # the 4 x 8 tile
  assert int(rows["train"]["params"].replace(",", "")) > 50_000
  # The rows went to --results too; --summary makes one table of them and of status rows.
  saved = [json.loads(line) for line in results.read_text().splitlines()]
  assert [(r["label"], r.get("mode")) for r in saved] == [("tests", None), ("demo", "train"),
                                                         ("demo", "score")]
  status = {"label": "demo", "status": "ok", "seconds": 20}
  table = bench.summary_table(saved + [status]).splitlines()
  assert table[0].split()[:3] == ["label", "status", "mode"]
  assert table[2].split()[:2] == ["tests", "failed"]
  assert table[3].split()[:3] == ["demo", "ok", "train"]
  assert table[4].split()[:3] == ["demo", "ok", "score"]
  assert f"{saved[1]['samples_per_s']:,.0f}" in table[3]


@pytest.mark.subprocess
def test_model_side_imports_without_tensorflow():
  code = ("import sys; import imagebert_jax.model, imagebert_jax.objectives.pretraining, "
          "imagebert_jax.parallel, imagebert_jax.state, imagebert_jax.bench, "
          "imagebert_jax.metrics; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
