"""Surviving interruptions and refusing bad configs: SIGKILL and SIGTERM resumes that repeat an
uninterrupted run bit for bit, damaged checkpoints, non-finite steps, multi-stage starts, and
one-line config errors."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from imagebert_jax import train
from imagebert_jax.validate import ConfigError
from test_train import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
ARGS = ["--config", "configs/demo.py:smoke", "--config.run=pretrain",
        f"--config.stages.pretrain.train.num_steps={STEPS}",
        "--config.stages.pretrain.train.checkpoint_every=6",
        "--config.stages.pretrain.train.log_every=3",
        "--config.stages.pretrain.train.eval_every=0",
        "--config.stages.pretrain.train.keep_checkpoints=2",
        "--config.model.num_layers=1", "--config.model.hidden_size=32",
        "--config.model.mlp_dim=64", "--config.model.dropout_rate=0.1"]
TIMING = ("steps_per_sec", "samples_per_sec")


def start(workdir, extra=()):
  return subprocess.Popen([sys.executable, "-m", "imagebert_jax.main", "--workdir", workdir,
                           *ARGS, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]


def wait_for_step(proc, workdir, step, checkpoint=None, timeout=300):
  """Until `step` is logged (and the checkpoint of step `checkpoint` is complete)."""
  t0 = time.time()
  ckpt = os.path.join(workdir, "pretrain", "checkpoints", str(checkpoint))
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.communicate()[0][-3000:]}")
    steps = logged_steps(workdir)
    if steps and max(steps) >= step and (checkpoint is None or os.path.isdir(ckpt)):
      return
    time.sleep(0.05)
  raise AssertionError("timed out waiting for the run")


def final_params(workdir):
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "pretrain", "checkpoints", str(STEPS), "state"))
  return state["params"], state["opt_state"]


def metric_rows(workdir):
  """The last row written for each step, without timings."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows[(r["step"], "eval/loss" in r)] = {k: v for k, v in r.items() if k not in TIMING}
  return rows


def assert_same_run(a, b):
  pa, oa = final_params(a)
  pb, ob = final_params(b)
  for x, y in zip(*(jax_leaves(t) for t in (pa, pb))):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax_leaves(oa), jax_leaves(ob)):
    np.testing.assert_array_equal(x, y)
  assert metric_rows(a) == metric_rows(b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  return workdir


def test_sigkill_then_rerun_equals_uninterrupted(reference, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference, "synthetic_data"),
                  os.path.join(workdir, "synthetic_data"))
  proc = start(workdir)
  wait_for_step(proc, workdir, 9, checkpoint=6)  # past a checkpoint, before the end
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "pretrain", "checkpoints", str(STEPS)))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert "resuming from step" in out
  assert_same_run(reference, workdir)


def test_sigterm_checkpoints_at_the_next_step_and_resumes(reference, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference, "synthetic_data"),
                  os.path.join(workdir, "synthetic_data"))
  proc = start(workdir)
  wait_for_step(proc, workdir, 12)
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 143, out[-3000:]
  assert "Traceback" not in out
  assert "rerun the same command to resume" in out
  saved = [int(os.path.basename(p)) for p in
           glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "*")) if
           os.path.basename(p).isdigit()]
  assert max(saved) >= 12
  assert not os.path.exists(os.path.join(workdir, "pretrain", train.DONE_FILE))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert_same_run(reference, workdir)


def test_damaged_newest_checkpoint_is_skipped(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "pretrain", train.DONE_FILE))
  newest = os.path.join(workdir, "pretrain", "checkpoints", str(STEPS), "state")
  for path in glob.glob(os.path.join(newest, "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 1000:
      with open(path, "r+b") as f:
        f.truncate(100)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    before = f.readlines()
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert f"Checkpoint at step {STEPS}" in out and "using the one before it" in out
  assert "resuming from step 18" in out
  assert glob.glob(os.path.join(workdir, "pretrain", "damaged_checkpoints", f"{STEPS}-*"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.readlines()[:len(before)] == before
  assert_same_run(reference, workdir)


# ---- Non-finite steps ------------------------------------------------------------------------
def _tiny_pretrain(num_steps, **train_kw):
  config = load_config("demo", "smoke")
  config.unlock()
  config.run = "pretrain"
  config.model.update(dict(num_layers=1, hidden_size=32, mlp_dim=64))
  config.stages.pretrain.train.update(dict(num_steps=num_steps, log_every=2,
                                           checkpoint_every=2, eval_every=0, **train_kw))
  return config


def _assert_checkpoints_finite(workdir):
  """Every checkpoint written holds finite parameters."""
  for path in glob.glob(str(workdir / "pretrain" / "checkpoints" / "*" / "state")):
    params = ocp.PyTreeCheckpointer().restore(path)["params"]
    assert all(np.isfinite(x).all() for x in jax_leaves(params))


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
  config = _tiny_pretrain(40, max_nonfinite_in_a_row=3)
  config.stages.pretrain.optim.update(dict(learning_rate=1e30, warmup_steps=0))
  with pytest.raises(FloatingPointError, match=r"3 updates in a row had a non-finite loss"):
    train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert rows and rows[-1]["skipped_updates"] > 0  # a mean over the log interval
  _assert_checkpoints_finite(tmp_path)


def test_nonfinite_stops_at_once_without_skipping(tmp_path):
  config = _tiny_pretrain(40, skip_nonfinite=False)
  config.stages.pretrain.optim.update(dict(learning_rate=1e30, warmup_steps=0))
  with pytest.raises(FloatingPointError, match="skip_nonfinite=False"):
    train.train_and_evaluate(config, str(tmp_path))
  _assert_checkpoints_finite(tmp_path)


# ---- Stages ------------------------------------------------------------------------------------
def test_a_stage_starts_from_the_previous_stage_and_reruns_skip_it(tmp_path):
  config = _tiny_pretrain(4)
  config.stages.second = load_config("demo", "smoke").stages.pretrain
  config.stages.second.update(dict(init=dict(from_stage="pretrain", checkpoint="", bert="")))
  config.stages.second.train.update(dict(num_steps=2, log_every=1, checkpoint_every=2,
                                         eval_every=0))
  config.stages.second.optim.update(dict(learning_rate=1e-30, warmup_steps=0,
                                         weight_decay=0.0))
  config.run = "pretrain,second"
  train.train_and_evaluate(config, str(tmp_path))
  load = lambda stage, step: ocp.PyTreeCheckpointer().restore(
      str(tmp_path / stage / "checkpoints" / str(step) / "state"))["params"]
  for a, b in zip(jax_leaves(load("pretrain", 4)), jax_leaves(load("second", 2))):
    np.testing.assert_allclose(a, b, atol=1e-12)
  stamp = os.path.getmtime(tmp_path / "second" / train.DONE_FILE)
  train.train_and_evaluate(config, str(tmp_path))
  assert os.path.getmtime(tmp_path / "second" / train.DONE_FILE) == stamp


# ---- Config errors -----------------------------------------------------------------------------
def _errors():
  def base():
    c = load_config("demo", "smoke")
    c.unlock()
    return c

  cases = []
  c = base(); c.stages.pretrain.train.batch_sizee = 3  # noqa: E702
  cases.append((c, r"config.stages.pretrain.train: unknown keys \['batch_sizee'\]"))
  c = base(); c.model.num_heads = 5  # noqa: E702
  cases.append((c, r"config.model.num_heads=5 does not divide config.model.hidden_size=128"))
  c = base(); c.model.max_regions = 8  # noqa: E702
  c.stages.pretrain.data.synthetic.enabled = False
  cases.append((c, r"config.stages.pretrain.data.dir is empty"))
  c = base(); c.text.vocab_file = "/no/such/vocab.txt"  # noqa: E702
  cases.append((c, r"config.text.vocab_file='/no/such/vocab.txt': no such file"))
  c = base(); c.mesh.shape = (3, 1, 1)  # noqa: E702
  cases.append((c, r"config.mesh.shape=\(3, 1, 1\) needs 3 devices, but 8 are available"))
  c = base(); c.stages.pretrain.train.batch_size = 12  # noqa: E702
  cases.append((c, r"config.stages.pretrain.train.batch_size=12: each micro-batch of 12 must "
                   r"split evenly over the 8 data-parallel devices"))
  c = base(); c.stages.finetune.init.update(dict(from_stage="", checkpoint="/no/ckpt"))  # noqa
  cases.append((c, r"config.stages.finetune.init.checkpoint='/no/ckpt': no checkpoint there"))
  c = base(); c.stages.zero_shot.init.from_stage = "later"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.init.from_stage='later': that stage neither runs"))
  c = base(); c.stages.zero_shot.eval.protocol = "coco2k"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.eval.protocol='coco2k'"))
  c = base(); c.stages.zero_shot.eval.protocol = "full,coco2k"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.eval.protocol='full,coco2k': want full, coco1k or "
                   r"first1k, or several of them separated by commas"))
  return cases


@pytest.mark.parametrize("case", range(len(_errors())))
def test_config_errors_name_key_and_value(case, tmp_path):
  config, pattern = _errors()[case]
  with pytest.raises(ConfigError, match=pattern):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was built or written


def test_dataset_regions_beyond_the_model_are_refused(synthetic_dir, tmp_path):
  config = load_config("demo", "smoke")
  config.unlock()
  config.stages.pretrain.data.synthetic.enabled = False
  config.stages.pretrain.data.dir = synthetic_dir
  config.stages.pretrain.data.train_split = "train"
  config.model.max_regions = 8
  config.run = "pretrain"
  with pytest.raises(ConfigError, match=r"config.model.max_regions=8 is smaller than the 16 "
                                        r"regions per image"):
    train.train_and_evaluate(config, str(tmp_path))


def test_main_prints_one_line_for_a_config_error(tmp_path):
  out = subprocess.run([sys.executable, "-m", "imagebert_jax.main", "--workdir", str(tmp_path),
                        "--config", "configs/demo.py:smoke", "--config.model.num_heads=5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert "config.model.num_heads=5 does not divide" in out.stderr


def test_a_checkpoint_of_another_train_state_is_an_error_not_damage(tmp_path):
  config = _tiny_pretrain(4)
  train.train_and_evaluate(config, str(tmp_path))
  os.remove(tmp_path / "pretrain" / train.DONE_FILE)
  config.stages.pretrain.train.num_steps = 6
  config.stages.pretrain.optim.grad_clip_norm = 0.0  # one optimizer state fewer
  with pytest.raises(ConfigError, match=r"checkpoints/4: the checkpoint holds a different train "
                                        r"state than this config builds \(/opt_state"):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.path.isdir(tmp_path / "pretrain" / "checkpoints" / "4")  # not set aside
