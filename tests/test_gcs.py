"""The demo with its work directory and its dataset in a bucket, against a local Google Cloud
Storage that this test starts (gcp-storage-emulator behind tests/gcs_emulator.py's front).

The smoke run (conftest's smoke_config, `data.dir=gs://.../data` for every stage) builds its
dataset in the bucket, pretrains, fine-tunes and evaluates with `--workdir gs://.../run`; it is
killed (SIGKILL) once the first pretraining checkpoint is complete in the bucket, rerun to the end
(it resumes from that checkpoint and its input-pipeline state), and run once more (every stage is
skipped). Its metrics, step by step, and its evaluations are those of the same run on local
folders (conftest's demo_smoke_run), and the model loaded from the bucket scores pairs exactly as
the local one does. No local folder named `gs:` appears.

Every client is pointed at the emulator, so no part is left to etils.epath's testing tools:
TensorFlow's GCS file system (the path layer through etils.epath, TFDS and tf.data reading the
records, tf.data's iterator checkpoints, TensorBoard's event files; it has no endpoint setting,
so it goes through the front as its HTTPS proxy), the JAX profiler (its trace, the same way),
TensorStore (Orbax's array files, TENSORSTORE_GCS_HTTP_URL) and google-cloud-storage (Orbax's
question about the bucket's layout, STORAGE_EMULATOR_HOST). Not run here: etils.epath's fsspec
backend (gcsfs), which etils.epath picks only where TensorFlow is not installed (an inference
host; gcsfs is not one of this project's dependencies).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "imagebert-test"
RUN = f"gs://{BUCKET}/run"
DATA = f"gs://{BUCKET}/data"
STAGES = ("pretrain", "finetune", "zero_shot", "finetuned")
TIMING = ("steps_per_sec", "samples_per_sec", "uptime")
# conftest.smoke_config() as flags, with the dataset in the bucket.
ARGS = ["--config", "configs/demo.py:smoke", "--workdir", RUN,
        "--config.stages.pretrain.train.profile_steps=2",
        "--config.stages.pretrain.train.profile_first_step=4",
        "--config.stages.finetune.evals.val.every=3",
        "--config.stages.finetune.evals.val.max_images=10",
        *[f"--config.stages.{s}.data.dir={DATA}" for s in STAGES]]


def fallbacks() -> list[str]:
  """Local folders a bucket URL would have become (os.path.abspath('gs://b/x') is
  '<current folder>/gs:/b/x'; os.path.join('gs://b', ...) relative to wherever it is used):
  any folder named `gs:` in the checkout, where the runs start, or here."""
  found = []
  for top in {ROOT, os.getcwd()}:
    for base, dirs, _ in os.walk(top):
      dirs[:] = [d for d in dirs if d not in (".venv", ".git")]
      found += [os.path.join(base, d) for d in dirs if d == "gs:"]
  return sorted(set(found))


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  emulator = gcs_emulator.Emulator(BUCKET, str(tmp_path_factory.mktemp("emulator")))
  yield emulator
  emulator.close()


def start(bucket):
  env = {**os.environ, **bucket.env}
  return subprocess.Popen([sys.executable, "-m", "imagebert_jax.main", *ARGS], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def committed_steps(bucket) -> list[int]:
  names = bucket.objects("run/pretrain/checkpoints/")
  return sorted(int(m.group(1)) for n in names
                if (m := re.fullmatch(r"run/pretrain/checkpoints/(\d+)/commit_success\.txt", n)))


def kill_after_first_checkpoint(bucket) -> tuple[int, str]:
  """Runs until the bucket holds a complete pretraining checkpoint (the process is stopped with
  SIGSTOP while the bucket is looked at, so what is seen is what is there when it dies), then
  kills it; returns (the newest complete checkpoint's step, the output)."""
  proc = start(bucket)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if not any("Saving checkpoint at step" in x for x in seen):
      continue
    proc.send_signal(signal.SIGSTOP)
    steps = committed_steps(bucket)
    if steps and "run/pretrain/DONE.json" not in bucket.objects("run/pretrain/DONE"):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return steps[-1], "".join(seen)
    proc.send_signal(signal.SIGCONT)
  proc.wait()
  raise AssertionError("the run ended before a pretraining checkpoint was seen complete: "
                       + "".join(seen)[-3000:])


def last_rows(lines) -> dict:
  """{(stage, step): row without timings}, the last row of each step (a resumed run logs again
  the steps after its checkpoint)."""
  rows = {}
  for line in lines:
    if line.strip():
      r = json.loads(line)
      rows[(r["stage"], r["step"])] = {k: v for k, v in r.items() if k not in TIMING}
  return rows


def test_a_flushed_file_is_in_the_bucket_before_it_is_closed(bucket, monkeypatch):
  """metrics.jsonl is appended to and flushed row by row: a run killed before closing it keeps
  the rows it flushed (the object is re-uploaded whole at every flush)."""
  for k, v in bucket.env.items():
    monkeypatch.setenv(k, v)
  from imagebert_jax import paths
  name = "flush/metrics.jsonl"
  f = paths.open(f"gs://{BUCKET}/{name}", "a")
  try:
    f.write('{"step": 1}\n')
    f.flush()
    assert _read(bucket, name) == '{"step": 1}\n'
    f.write('{"step": 2}\n')
    f.flush()
    assert _read(bucket, name) == '{"step": 1}\n{"step": 2}\n'
  finally:
    f.close()
  with paths.open(f"gs://{BUCKET}/{name}", "a") as f:  # appending keeps what is there
    f.write('{"step": 3}\n')
  assert _read(bucket, name) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_demo_in_a_bucket_survives_a_kill_and_matches_local_folders(bucket, demo_smoke_run,
                                                                     monkeypatch, caplog):
  local_config, local_workdir, local_results = demo_smoke_run
  assert not fallbacks()

  # ---- Killed after the first checkpoint; rerun to the end; it resumes from the bucket. -----
  step, _ = kill_after_first_checkpoint(bucket)
  proc = start(bucket)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  assert f"resuming from step {step}" in out, out[-3000:]
  assert "no input-pipeline state saved" not in out

  # ---- What the bucket holds. ------------------------------------------------------------------
  names = set(bucket.objects())
  for name in ("data/imagebert_dataset.json", "data/vocab.txt", "data/dataset_info.json",
               "data/synthetic-train.tfrecord-00000-of-00001", "data/source/regions.ibrf",
               "run/config.json", "run/metrics.jsonl",
               "run/pretrain/checkpoints/12/commit_success.txt",
               "run/pretrain/data_state/12/process_00000/pending_metrics.json",
               "run/zero_shot/scores.npy", "run/zero_shot/itc_scores.npy",
               "run/finetuned/metrics.json", "run/finetuned/image_ids.json",
               *[f"run/{s}/DONE.json" for s in STAGES], *[f"run/{s}/config.json" for s in STAGES]):
    assert name in names, name
  assert any(re.fullmatch(r"run/finetune/best_checkpoint/\d+/commit_success\.txt", n)
             for n in names)
  assert any(n.startswith("run/pretrain/events.out.tfevents") for n in names)
  assert any(n.startswith("run/pretrain/plugins/profile/") and n.endswith(".xplane.pb")
             for n in names)
  assert not any("/chunks/" in n or "rerank_chunks" in n for n in names)  # removed when done
  info = json.loads(_read(bucket, "data/imagebert_dataset.json"))
  assert info["vocab_file"] == "vocab.txt"  # the folder can move: nothing names a local path

  # ---- In this process too: a rerun skips every stage; the results are the local run's. ------
  for k, v in bucket.env.items():
    monkeypatch.setenv(k, v)
  from conftest import smoke_config
  from imagebert_jax import paths
  from imagebert_jax.training import train
  config = smoke_config()
  config.unlock()
  for s in STAGES:
    config.stages[s].data.dir = DATA
  config.lock()
  caplog.set_level("INFO")
  results = train.train_and_evaluate(config, RUN)
  skipped = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
  assert len(skipped) == len(STAGES), skipped
  for s in ("zero_shot", "finetuned"):
    assert results[s]["metrics"] == local_results[s]["metrics"], s
  for s in ("pretrain", "finetune"):
    for key in ("final_step", "eval", "best"):
      assert results[s].get(key) == local_results[s].get(key), (s, key)
  with paths.open(f"{RUN}/metrics.jsonl") as f:
    in_bucket = last_rows(f)
  with open(os.path.join(local_workdir, "metrics.jsonl")) as f:
    local = last_rows(f)
  assert in_bucket == local

  # ---- The model, loaded from the bucket, scores as the local one does. -----------------------
  from imagebert_jax.data import pipeline
  from imagebert_jax.retrieval.inference import TrainedModel
  images = list(pipeline.split_records(DATA, "test"))[:6]
  texts = ["a red circle above a blue square", "two green triangles", "a small yellow star",
           "a circle", "a big red square on the left", "three shapes"]
  remote = TrainedModel.load(RUN, batch_size=8).score_pairs(images, texts)
  here = TrainedModel.load(local_workdir, batch_size=8).score_pairs(images, texts)
  np.testing.assert_array_equal(remote, here)

  assert not fallbacks(), "a bucket URL fell back to a local folder named gs:"


def _read(bucket, name: str) -> str:
  import urllib.parse
  import urllib.request
  url = (f"{bucket.emulator}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
         "?alt=media")
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(url, timeout=30) as r:
    return r.read().decode()
