"""Test set-up: 8 simulated CPU devices (set before JAX starts), float32, no network."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """A small synthetic dataset built once for the whole session."""
  from imagebert_jax.data import synthetic
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.build(out, {"train": 120, "test": 30}, synthetic.SyntheticSpec(seed=3),
                  max_text_len=16)
  return out



def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg)."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def demo_smoke_run(tmp_path_factory):
  """(config, workdir, results) of the demo's smoke config run once for the session: pretrain ->
  finetune -> zero-shot and fine-tuned evaluation. Tests that only read it share it."""
  from imagebert_jax import train
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = load_config("demo", "smoke")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results
