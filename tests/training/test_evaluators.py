"""Evaluators by name: when they run, which stages take which, how a bad one is refused, and a
training stage running them through its loop (the steps in metrics.jsonl)."""

import json
import os

import pytest

from conftest import load_config
from imagebert_jax.config import defaults
from imagebert_jax.config.validate import ConfigError
from imagebert_jax.training import evaluators, train


@pytest.mark.parametrize("every,expected", [
    (3, [3, 6, 9, 10]),   # every 3 steps, and the last
    (5, [5, 10]),         # the last step is a multiple: once
    (0, [10]),            # the last step only
    (-1, []),             # never
    (20, [10]),           # longer than the stage: the last step
])
def test_itstime(every, expected):
  assert [s for s in range(1, 11) if evaluators.itstime(every, s, 10)] == expected


def test_every_type_has_defaults_and_stage_kinds():
  assert set(evaluators.TYPES) == set(defaults.EVALUATOR_DEFAULTS) == set(
      defaults.EVALUATOR_KINDS)
  for name, make in defaults.EVALUATOR_DEFAULTS.items():
    assert make().type == name


def _tiny(tmp_path, num_steps=4):
  config = load_config("demo", "smoke")
  config.unlock()
  config.run = "pretrain"
  config.model.update(dict(num_layers=1, hidden_size=32, mlp_dim=64))
  config.stages.pretrain.train.update(dict(num_steps=num_steps, log_every=2,
                                           checkpoint_every=num_steps))
  return config


@pytest.mark.parametrize("change,message", [
    (lambda c: c.stages.pretrain.evals.update(dict(val=defaults.validation_eval())),
     r"config.stages.pretrain.evals.val.type='validation': a pretrain stage takes evaluators of "
     r"type \['loss'\]"),
    (lambda c: c.stages.pretrain.evals.loss.update(dict(type="accuracy")),
     r"config.stages.pretrain.evals.loss.type='accuracy'"),
    (lambda c: c.stages.pretrain.evals.loss.update(dict(bathces=3)),
     r"config.stages.pretrain.evals.loss: unknown key"),
    (lambda c: c.stages.pretrain.evals.loss.update(dict(every=-2)),
     r"config.stages.pretrain.evals.loss.every=-2: want N > 0"),
    (lambda c: c.stages.pretrain.evals.loss.update(dict(batches=0)),
     r"config.stages.pretrain.evals.loss.batches=0: want a positive number"),
    (lambda c: c.stages.finetune.evals.update(dict(val2=defaults.validation_eval())),
     r"config.stages.finetune.evals: \['val', 'val2'\] are all of type 'validation'"),
    (lambda c: c.stages.pretrain.evals.update(dict(again=defaults.loss_eval())),
     r"config.stages.pretrain.evals: \['again', 'loss'\] are all of type 'loss'"),
    (lambda c: c.stages.zero_shot.evals.retrieval.update(dict(rerank_k=-3)),
     r"config.stages.zero_shot.evals.retrieval.rerank_k=-3"),
])
def test_bad_evaluators_are_refused_in_one_line(tmp_path, change, message):
  config = load_config("demo", "smoke")
  config.unlock()
  change(config)
  with pytest.raises(ConfigError, match=message) as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(info.value)


def test_an_evaluation_stage_needs_an_evaluator(tmp_path):
  config = load_config("demo", "smoke")
  config.unlock()
  del config.stages.zero_shot.evals["retrieval"]
  with pytest.raises(ConfigError, match=r"config.stages.zero_shot.evals is empty"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("every,steps", [(2, [2, 4, 5]), (-1, [])])
def test_a_training_stage_runs_its_evaluator_when_due(tmp_path, every, steps):
  """The loss evaluator, under a name of the config's choosing, every 2 steps of 5 (2, 4 and the
  last); with -1 never."""
  config = _tiny(tmp_path, num_steps=5)
  del config.stages.pretrain.evals["loss"]
  config.stages.pretrain.evals.heldout = defaults.loss_eval(every=every, batches=1)
  summary = train.train_and_evaluate(config, str(tmp_path))["pretrain"]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "eval/loss" in r] == steps
  assert (summary["eval"].get("eval/loss", 0) > 0) == bool(steps)
