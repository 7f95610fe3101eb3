"""The real training entry point on the demo config, shrunk: records -> tf.data -> mesh -> step ->
Orbax checkpoints -> TensorBoard and metrics.jsonl; and resuming from the latest checkpoint."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from conftest import load_config, smoke_config
from imagebert_jax.training import metrics as metrics_lib
from imagebert_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def smoke_run(demo_smoke_run):
  return demo_smoke_run


@pytest.mark.slow
def test_demo_writes_metrics_checkpoints_and_events(smoke_run):
  config, workdir, results = smoke_run
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r and r["stage"] == "pretrain"]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  for key in ("mlm_loss", "moc_loss", "mrfr_loss", "itm_loss", "mlm_accuracy", "moc_accuracy",
              "itm_accuracy", "grad_norm", "learning_rate", "steps_per_sec"):
    assert all(isinstance(r[key], float) for r in train_rows), key
  assert [r["stage"] for r in rows if "retrieval/rsum" in r] == ["zero_shot", "finetuned"]
  eval_rows = [r for r in rows if "eval/loss" in r and r["stage"] == "pretrain"]
  assert eval_rows and eval_rows[-1]["step"] == 12
  ckpts = sorted(int(os.path.basename(p)) for p in
                 glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "*"))
                 if os.path.basename(p).isdigit())
  assert ckpts == [6, 12]
  assert glob.glob(os.path.join(workdir, "pretrain", "events.out.tfevents.*"))
  assert results["pretrain"]["final_step"] == 12
  assert results["finetune"]["final_step"] == 6
  # The evaluations wrote their files; the fine-tuned one scored the fine-tuned checkpoint.
  for name in ("zero_shot", "finetuned"):
    out = os.path.join(workdir, name)
    scores = np.load(os.path.join(out, "scores.npy"))
    assert scores.shape == (50, 250) and np.isfinite(scores).all()
    with open(os.path.join(out, "metrics.json")) as f:
      m = json.load(f)
    assert set(m) >= {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}
    assert m["nonfinite_scores"] == 0
  assert not np.allclose(np.load(os.path.join(workdir, "zero_shot", "scores.npy")),
                         np.load(os.path.join(workdir, "finetuned", "scores.npy")))
  # A profile of two steps, where TensorBoard's profile plugin looks.
  assert glob.glob(os.path.join(workdir, "pretrain", "plugins", "profile", "*", "*.xplane.pb"))


def test_finetuning_validates_and_the_evaluation_scores_the_best(smoke_run):
  config, workdir, results = smoke_run
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  val = [r for r in rows if r["stage"] == "finetune" and "val/rsum" in r]
  assert [r["step"] for r in val] == [3, 6]
  for r in val:
    recalls = [r[f"{d}_R@{k}"] for d in ("val/i2t", "val/t2i") for k in (1, 5, 10)]
    assert all(0.0 <= x <= 100.0 for x in recalls)
    assert r["val/rsum"] == pytest.approx(sum(recalls))
    assert r["val/nonfinite_scores"] == 0.0
  rsums = [r["val/rsum"] for r in val]
  best_step = val[rsums.index(max(rsums))]["step"]  # the earliest of equal ones
  assert results["finetune"]["best"] == {"step": best_step, "val/rsum": max(rsums)}
  best_dir = os.path.join(workdir, "finetune", "best_checkpoint")
  assert sorted(os.listdir(best_dir)) == [str(best_step)]
  # The evaluation after fine-tuning restored that checkpoint (init.select='best', the default).
  assert results["finetuned"]["checkpoint"] == best_dir
  assert results["finetuned"]["checkpoint_step"] == best_step
  # init.select='last': the rolling checkpoint of the last step.
  last = config.stages.finetuned.copy_and_resolve_references()
  last.init.select = "last"
  assert train.init_source(last, workdir) == os.path.join(workdir, "finetune", "checkpoints")
  assert ckpt_step(train.init_source(last, workdir)) == 6


def ckpt_step(path):
  from imagebert_jax.training import checkpoint
  return checkpoint.step_of(path)


def test_rerun_resumes_from_latest_checkpoint(smoke_run):
  config, workdir, _ = smoke_run
  # A finished stage is not run again: it adds no rows.
  rows_before = len(metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  again = train.train_and_evaluate(config, workdir)
  assert again["pretrain"]["final_step"] == 12
  assert rows_before == len(metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  # Interrupted after the step-6 checkpoint: the rerun continues from step 6.
  shutil.rmtree(os.path.join(workdir, "pretrain", "checkpoints", "12"))
  os.remove(os.path.join(workdir, "pretrain", train.DONE_FILE))
  config = smoke_config()
  config.unlock()
  config.run = "pretrain"
  train.train_and_evaluate(config, workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[rows_before:]
  assert [r["step"] for r in rows if "loss" in r] == [8, 12]


def test_unknown_stage_and_kind_are_refused(tmp_path):
  config = load_config("demo", "smoke")
  config.unlock()
  config.run = "pretrain,nosuchstage"
  with pytest.raises(ValueError, match="nosuchstage"):
    train.train_and_evaluate(config, str(tmp_path))
  config.run = "pretrain"
  config.stages.pretrain.kind = "pretrian"
  with pytest.raises(ValueError, match=r"config.stages.pretrain.kind='pretrian'"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_demo_learns_on_realistic_scenes(tmp_path):
  """A shortened demo on the realistic generator (2048-d detector-like features, 16 regions):
  the masked losses fall, accuracies beat chance by a wide margin, and the contrastive loss,
  which teaches matching, falls well below its chance level (ln of the batch size)."""
  config = load_config("demo")
  config.unlock()
  data = config.stages.pretrain.data
  # The curated train split (the demo pretrains on its web set; this test checks the objectives).
  data.update(dict(train_split="train", eval_split="val"))
  data.synthetic.update(dict(train_images=300, val_images=20, eval_images=0, web_images=0,
                             web=False))
  config.stages.pretrain.train.update(dict(batch_size=32, num_steps=200, log_every=50,
                                           checkpoint_every=200,
                                           itm_chance_steps=0))
  config.stages.pretrain.optim.warmup_steps = 30
  config.run = "pretrain"
  result = train.train_and_evaluate(config, str(tmp_path))["pretrain"]
  first, last, chance = result["train_first"], result["train_last"], result["chance"]
  # Noisy detector labels and features make the region objectives slow (the paper's too).
  for key, factor in (("mlm_loss", 0.85), ("mrfr_loss", 0.95), ("moc_loss", 0.99)):
    assert last[key] < factor * first[key], key
  assert result["eval"]["eval/mlm_accuracy"] > 5 * chance["mlm_accuracy"]
  assert result["eval"]["eval/moc_accuracy"] > 2 * chance["moc_accuracy"]
  assert first["itc_loss"] > 0.95 * np.log(32)  # starts at chance
  assert last["itc_loss"] < 0.87 * np.log(32), last
