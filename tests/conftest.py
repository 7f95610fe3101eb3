"""Test set-up: 8 simulated CPU devices (set before JAX starts), float32, no network, and one
JAX compilation cache for the session (the tests and the processes they start compile the same
small models again and again; a cached executable is the one the compiler would have produced),
shared by pytest-xdist's workers, which inherit it from the process that starts them, as they
inherit tcmalloc where the system has it.

JAX runs on the CPU unless JAX_PLATFORMS is set already: on a GPU machine, JAX_PLATFORMS=cuda
runs the tests marked `gpu` there (benchmarks/gpu_session.sh does so). Those are skipped when
JAX sees no GPU, and fail instead when IMAGEBERT_EXPECT_GPU=1 says there should be one.
"""

import atexit
import os
import shutil
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
if "JAX_PLATFORMS" not in os.environ:
  os.environ["JAX_PLATFORMS"] = "cpu"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="imagebert_test_jax_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # inherited by the processes tests start
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from imagebert_jax import allocator  # noqa: E402

# pytest-xdist's workers and the commands tests start run with tcmalloc, as the commands do
# (imagebert_jax/allocator.py): set before the workers start, so they inherit it.
allocator.preload_children()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  """A small synthetic dataset built once for the whole session."""
  from imagebert_jax.data import synthetic
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.build(out, {"train": 120, "test": 30}, synthetic.SyntheticSpec(seed=3),
                  max_text_len=16)
  return out


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
  """Tests marked `gpu` need JAX to see a GPU: skipped without one, failed (not an error of
  set-up: a failure of the test) when IMAGEBERT_EXPECT_GPU=1."""
  if item.get_closest_marker("gpu") is None:
    return
  import jax
  if jax.default_backend() != "gpu":
    why = (f"no GPU visible to JAX (backend {jax.default_backend()!r}, "
           f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})")
    if os.environ.get("IMAGEBERT_EXPECT_GPU") == "1":
      pytest.fail(f"{why}, but IMAGEBERT_EXPECT_GPU=1 expects one", pytrace=False)
    pytest.skip(why)


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
  finetune -> zero-shot and fine-tuned evaluation (smoke_config). Tests that only read it share
  it."""
  from imagebert_jax.training import train
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = smoke_config()
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def smoke_config():
  """demo.py:smoke, with a profile of two pretraining steps and retrieval validation on 10 test
  images every 3 fine-tuning steps."""
  config = load_config("demo", "smoke")
  config.unlock()
  config.stages.pretrain.train.update(dict(profile_steps=2, profile_first_step=4))
  config.stages.finetune.evals.val.update(dict(every=3, max_images=10))
  config.lock()
  return config
