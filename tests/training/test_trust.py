"""Surviving interruptions and refusing bad configs: SIGKILL and SIGTERM resumes that repeat an
uninterrupted run bit for bit, damaged checkpoints, non-finite steps, multi-stage starts, and
one-line config errors."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from imagebert_jax.training import train
from imagebert_jax.config.validate import ConfigError
from conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
# Checkpoints every 5 steps, logs every 3: a checkpoint falls inside a log interval (steps 4-5 at
# 5, step 10 at 10), so the unfinished interval's metrics saved with it are not empty.
ARGS = ["--config", "configs/demo.py:smoke", "--config.run=pretrain",
        f"--config.stages.pretrain.train.num_steps={STEPS}",
        "--config.stages.pretrain.train.checkpoint_every=5",
        "--config.stages.pretrain.train.log_every=3",
        "--config.stages.pretrain.evals.loss.every=0",
        "--config.stages.pretrain.train.keep_checkpoints=2",
        "--config.model.num_layers=1", "--config.model.hidden_size=32",
        "--config.model.mlp_dim=64", "--config.model.dropout_rate=0.1"]
TIMING = ("steps_per_sec", "samples_per_sec", "uptime")


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


def wait_for_step(proc, workdir, step, checkpoint=None):
  """Reads the run's output line by line until this run has logged `step` in metrics.jsonl (and
  the checkpoint of step `checkpoint` is complete); returns the output read so far."""
  ckpt = os.path.join(workdir, "pretrain", "checkpoints", str(checkpoint))
  before = len(logged_steps(workdir))
  seen = []
  for line in proc.stdout:  # a log line comes at least every log interval
    seen.append(line)
    steps = logged_steps(workdir)[before:]
    if steps and max(steps) >= step and (checkpoint is None or os.path.isdir(ckpt)):
      return "".join(seen)
  raise AssertionError(f"the run ended before step {step}: {''.join(seen)[-3000:]}")


def resumed_from(out):
  return int(re.search(r"resuming from step (\d+)", out).group(1))


def final_params(workdir):
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "pretrain", "checkpoints", str(STEPS), "state"))
  return state["params"], state["opt_state"]


def metric_rows(workdir):
  """{(stage, step, keys): row without timings}, checking that a row logged more than once (a
  resumed run logs again what came after its checkpoint) has the same values every time."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = {k: v for k, v in json.loads(line).items() if k not in TIMING}
      key = (r["stage"], r["step"], tuple(sorted(r)))
      assert rows.setdefault(key, r) == r, f"step {r['step']} logged with different values"
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


def pending_metrics(workdir, step):
  with open(os.path.join(workdir, "pretrain", "data_state", str(step), "process_00000",
                         "pending_metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  return workdir, out


def copy_data(reference, workdir):
  shutil.copytree(os.path.join(reference, "synthetic_data"),
                  os.path.join(workdir, "synthetic_data"))


@pytest.mark.subprocess
def test_console_shows_losses_and_progress(reference):
  _, out = reference
  assert re.search(r"\[24\] collection=pretrain .*itm_loss=[0-9.]+.*mlm_loss=[0-9.]+", out)
  assert re.search(r"[0-9.]+ steps/s, 100.0% \(24/24\)", out)


@pytest.mark.slow
@pytest.mark.subprocess
def test_killed_twice_then_rerun_equals_uninterrupted(reference, tmp_path):
  reference, _ = reference
  workdir = str(tmp_path)
  copy_data(reference, workdir)
  # First kill: soon after the step-5 checkpoint, which saved the metrics of steps 4 and 5
  # (the step-10 one, with step 10's, may have been written too when the kill came late).
  proc = start(workdir)
  wait_for_step(proc, workdir, 6, checkpoint=5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(pending_metrics(workdir, 5)) == 2
  # Second kill, later in the resumed run: after the step-10 checkpoint.
  proc = start(workdir)
  out = wait_for_step(proc, workdir, 12, checkpoint=10)
  first_resume = resumed_from(out)
  assert first_resume in (5, 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(pending_metrics(workdir, 10)) == 1
  assert not os.path.exists(os.path.join(workdir, "pretrain", "checkpoints", str(STEPS)))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert first_resume < resumed_from(out) < STEPS
  assert_same_run(reference, workdir)
  # Resumed runs logged again what came after their checkpoints, with the same values.
  assert len(logged_steps(workdir)) > len(logged_steps(reference))


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_checkpoints_at_the_next_step_and_resumes(reference, tmp_path):
  reference, _ = reference
  workdir = str(tmp_path)
  copy_data(reference, workdir)
  proc = start(workdir)
  wait_for_step(proc, workdir, 12)
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 143, out[-3000:]
  assert "Traceback" not in out
  assert "rerun the same command to resume" in out
  # The signal came after step `sent` (12 or later: that step was logged before it was sent);
  # the run stopped at that step or the next one, and checkpointed there.
  sent = int(re.search(r"Termination signal after step (\d+)", out).group(1))
  stopped = int(re.search(r"stopped at step (\d+) on a termination signal", out).group(1))
  assert 12 <= sent <= stopped <= sent + 1
  saved = [int(os.path.basename(p)) for p in
           glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "*")) if
           os.path.basename(p).isdigit()]
  assert max(saved) == stopped
  assert not os.path.exists(os.path.join(workdir, "pretrain", train.DONE_FILE))
  code, out = finish(start(workdir))
  assert code == 0, out[-3000:]
  assert f"resuming from step {stopped}" in out
  assert_same_run(reference, workdir)


@pytest.mark.slow
@pytest.mark.subprocess
def test_damaged_newest_checkpoint_is_skipped(reference, tmp_path):
  reference, _ = reference
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
  assert "resuming from step 20" in out
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
                                           checkpoint_every=2, **train_kw))
  config.stages.pretrain.evals.loss.every = 0
  return config


def _assert_checkpoints_finite(workdir):
  """Every checkpoint written holds finite parameters."""
  for path in glob.glob(str(workdir / "pretrain" / "checkpoints" / "*" / "state")):
    params = ocp.PyTreeCheckpointer().restore(path)["params"]
    assert all(np.isfinite(x).all() for x in jax_leaves(params))


@pytest.mark.slow
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


def test_a_skipped_step_leaves_parameters_and_optimizer_state_unchanged():
  """A NaN loss, and a finite loss whose gradient is NaN: neither changes the parameters or the
  optimizer state (Adam's moments and count); a clean step then changes both."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from helpers import CLS, MASK, PAD, RANDOM_RANGE, SEP, TINY, random_batch
  from imagebert_jax import parallel
  from imagebert_jax.config import defaults as config_defaults
  from imagebert_jax.training import optim
  from imagebert_jax.training import state as state_lib
  from imagebert_jax.objectives.pretraining import PretrainObjective, pretrain_loss
  obj = PretrainObjective(pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                          random_token_range=RANDOM_RANGE)

  def loss_fn(model, batch, key, step=None):
    """The pretraining loss plus a term chosen by batch['poison']: 0 nothing, 1 NaN, 2 zero
    with a NaN gradient (d sqrt(0 * w) / dw = 0 * inf). lax.switch differentiates only the
    branch taken."""
    loss, metrics = pretrain_loss(model, batch, key, obj=obj)
    w = model.itm.bias[...]
    extra = jax.lax.switch(batch["poison"][0], [lambda w: jnp.zeros(()),
                                                lambda w: jnp.nan * jnp.sum(w),
                                                lambda w: jnp.sum(jnp.sqrt(0.0 * w))], w)
    return loss + extra, dict(metrics, loss=loss + extra)

  rules = parallel.rules_from_config(config_defaults.DEFAULT_RULES)
  mesh = parallel.make_mesh((-1, 1, 1))
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=0, end_lr_fraction=0.0, weight_decay=0.01, b1=0.9,
      b2=0.999, eps=1e-6, grad_clip_norm=1.0)), 10)
  spec = state_lib.state_spec(TINY, tx, mesh, rules)
  state = state_lib.create_state(spec, TINY, tx)
  step = state_lib.make_train_step(spec, loss_fn, tx, seed=0, schedule=schedule)
  host = random_batch(np.random.default_rng(0), 8)
  batch = lambda poison: parallel.global_batch(dict(host, poison=np.full(8, poison, np.int32)),
                                               mesh, rules)
  start = jax.device_get(state)  # the step donates the state
  for i, poison in enumerate((2, 1)):
    state, metrics = step(state, batch(poison))
    assert np.isfinite(float(metrics["loss"])) == (poison == 2)
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped_updates"]) == i + 1
    now = jax.device_get(state)
    assert int(now.step) == i + 1 and int(now.skipped_in_a_row) == i + 1
    for old, new in ((start.params, now.params), (start.opt_state, now.opt_state)):
      for x, y in zip(jax_leaves(old), jax_leaves(new)):
        np.testing.assert_array_equal(x, y)
  # A clean step changes both (so the comparisons above could fail).
  state, metrics = step(state, batch(0))
  assert float(metrics["skipped_updates"]) == 2 and float(metrics["nonfinite_in_a_row"]) == 0
  updated = jax.device_get(state)
  for old, new in ((start.params, updated.params), (start.opt_state, updated.opt_state)):
    assert any(not np.array_equal(x, y) for x, y in zip(jax_leaves(old), jax_leaves(new)))


@pytest.mark.slow
def test_nan_parameters_are_never_checkpointed_and_their_scores_rank_last(tmp_path, caplog):
  from imagebert_jax import parallel
  from imagebert_jax.training import state as state_lib
  from imagebert_jax.data.tokenizer import special_ids
  config = _tiny_pretrain(2)
  # A checkpoint of NaN parameters of the model this config builds, in this project's layout.
  _, vocab = train.prepare_data(config, config.stages.pretrain.data, str(tmp_path))
  model_cfg = train.model_config(config, special_ids(vocab).vocab_size)
  mesh = parallel.make_mesh((-1, 1, 1))
  _, shapes, _ = state_lib.params_spec(model_cfg, mesh, parallel.rules_from_config(
      config.mesh.rules))
  nan = tmp_path / "nan_checkpoint"
  ocp.PyTreeCheckpointer().save(str(nan / "state"), {"params": _nan_tree(shapes)})
  # Training from it: every step is skipped, and the save at step 2 refuses them.
  config.unlock()
  config.stages.nan = config.stages.pretrain.copy_and_resolve_references()
  config.stages.nan.init.checkpoint = str(nan)
  config.stages.nan.train.max_nonfinite_in_a_row = 10
  config.run = "nan"
  with pytest.raises(FloatingPointError, match=r"\[nan\] step 2: the parameters are not finite; "
                                               r"not checkpointing them"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not glob.glob(str(tmp_path / "nan" / "checkpoints" / "*" / "state"))
  # Scoring with them: every score is NaN, counted, and every pair is a miss.
  config.stages.scores = load_config("demo", "smoke").stages.zero_shot
  config.stages.scores.data = config.stages.pretrain.data.copy_and_resolve_references()
  config.stages.scores.init.update(dict(from_stage="", checkpoint=str(nan)))
  config.stages.scores.evals.retrieval.update(dict(progress=False, max_images=12))  # > R@10's 10
  config.run = "scores"
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(config, str(tmp_path))["scores"]
  pairs = result["images"] * result["captions"]
  with open(tmp_path / "scores" / "metrics.json") as f:
    saved = json.load(f)
  assert saved["nonfinite_scores"] == pairs == 12 * 60
  assert saved["rsum"] == 0.0
  assert f"{pairs:,} of {pairs:,} scores are not finite" in caplog.text


def _nan_tree(tree):
  if isinstance(tree, dict):
    return {k: _nan_tree(v) for k, v in tree.items()}
  return np.full(tree.shape, np.nan, tree.dtype)


# ---- Stages ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_stage_starts_from_the_previous_stage_and_reruns_skip_it(tmp_path):
  config = _tiny_pretrain(4)
  config.stages.second = load_config("demo", "smoke").stages.pretrain
  config.stages.second.update(dict(init=dict(from_stage="pretrain", checkpoint="", bert="")))
  config.stages.second.train.update(dict(num_steps=2, log_every=1, checkpoint_every=2))
  config.stages.second.evals.loss.every = 0
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
  c = base(); c.stages.zero_shot.evals.retrieval.protocol = "coco2k"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.evals.retrieval.protocol='coco2k'"))
  c = base(); c.stages.zero_shot.evals.retrieval.protocol = "full,coco2k"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.evals.retrieval.protocol='full,coco2k': want full, coco1k, "
                   r"first1k or <folds>x<images> \(e.g. 5x100\), or several of them separated "
                   r"by commas"))
  c = base(); c.stages.zero_shot.evals.retrieval.protocol = "0x100"  # noqa: E702
  cases.append((c, r"config.stages.zero_shot.evals.retrieval.protocol='0x100': want full"))
  c = base(); c.stages.finetune.init.from_stage = ""  # noqa: E702
  cases.append((c, r"config.stages.finetune.init: no starting weights; init.checkpoint, "
                   r"init.from_stage and init.bert are all empty. Set init.from_scratch=True"))
  c = base(); c.stages.finetune.init.from_scratch = True  # noqa: E702
  cases.append((c, r"config.stages.finetune.init.from_scratch=True but "
                   r"init.from_stage='pretrain' is set"))
  c = base(); c.stages.finetuned.init.select = "newest"  # noqa: E702
  cases.append((c, r"config.stages.finetuned.init.select='newest': want 'best' or 'last'"))
  c = base(); c.stages.finetune.evals.val.max_images = -1  # noqa: E702
  cases.append((c, r"config.stages.finetune.evals.val.max_images=-1"))
  c = base(); c.stages.pretrain.train.profile_steps = -2  # noqa: E702
  cases.append((c, r"config.stages.pretrain.train.profile_steps=-2"))
  # A retrieval config whose `pretrained` was not given, refused before its data is looked at.
  c = load_config("flickr30k_retrieval")
  c.unlock()
  cases.append((c, r"config.stages.zero_shot.init: no starting weights \(config.pretrained is "
                   r"empty: give the pretraining checkpoints with --config.pretrained=<folder>\)"))
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


@pytest.mark.subprocess
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


def test_best_checkpoint_keeps_the_highest_and_survives_reopening(tmp_path):
  from imagebert_jax.training import checkpoint
  params = lambda k: {"w": np.full((3,), float(k), np.float32)}
  best = checkpoint.BestCheckpoint(str(tmp_path / "best"), "rsum")
  assert best.best() == (None, None)
  assert best.consider(2, params(2), 10.0)
  assert not best.consider(4, params(4), 9.0)
  assert best.consider(6, params(6), 12.0)
  assert not best.consider(8, params(8), 12.0)  # a tie keeps the earlier step
  best.close()
  # Reopened (a resumed run): it knows its best, and a step validated again with the same value
  # (an exact resume) rewrites nothing.
  again = checkpoint.BestCheckpoint(str(tmp_path / "best"), "rsum")
  assert again.best() == (6, 12.0)
  assert not again.consider(6, params(6), 12.0)
  assert again.consider(10, params(10), 12.5)
  again.close()
  assert sorted(os.listdir(tmp_path / "best")) == ["10"]
  assert checkpoint.step_of(str(tmp_path / "best")) == 10
  saved = ocp.PyTreeCheckpointer().restore(checkpoint.state_dir(str(tmp_path / "best")))
  np.testing.assert_array_equal(saved["params"]["w"], params(10)["w"])
