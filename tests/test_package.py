"""The installable package: pyproject.toml's dependencies are requirements.txt's, its extras the
extractor's and the tests', the wheel it builds holds the package and declares the console
commands, each command's target exists, and nothing changes sys.path."""

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"imagebert-train": "imagebert_jax.main:command",
            "imagebert-build": "imagebert_jax.data.build:main",
            "imagebert-extract": "imagebert_jax.detector.extract_features:main",
            "imagebert-search": "imagebert_jax.retrieval.search:command",
            "imagebert-bench": "imagebert_jax.bench.model:command"}


def requirements(name):
  with open(os.path.join(ROOT, name)) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_dependencies_are_the_requirements_files():
  project = pyproject()
  extras = project["optional-dependencies"]
  assert project["dependencies"] + extras["extractor"] == requirements("requirements.txt")
  assert extras["test"] == requirements("requirements-test.txt")
  assert extras["extractor"] == ["pillow>=10.0"]


def test_console_commands_point_at_functions():
  """Each target is a module-level function of its module (read, not imported: the commands
  define absl flags of the same names, so one process imports one of them)."""
  import ast
  assert pyproject()["scripts"] == COMMANDS
  for target in COMMANDS.values():
    module, function = target.split(":")
    with open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8") as f:
      tree = ast.parse(f.read())
    assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def test_nothing_changes_sys_path():
  for folder in ("imagebert_jax", "tools", "benchmarks", "configs"):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if name.endswith(".py"):
          with open(os.path.join(base, name), encoding="utf-8") as f:
            assert not re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", f.read()), name


@pytest.mark.subprocess
def test_the_wheel_holds_the_package_and_its_commands(tmp_path):
  """pip builds the package offline (the setuptools already installed) into a wheel with every
  module, no tests, and the console commands."""
  source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside it
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "imagebert_jax", "tests", "tools", "benchmarks"):
    copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
    copy(os.path.join(ROOT, name), source / name,
         **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
  out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(source)], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  wheel, = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  import imagebert_jax
  assert wheel.startswith(f"imagebert_jax-{imagebert_jax.__version__}-py3-none-any")
  with zipfile.ZipFile(tmp_path / wheel) as z:
    names = z.namelist()
    entry_points, = [n for n in names if n.endswith("entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(z.read(entry_points).decode())
  assert dict(parser["console_scripts"]) == COMMANDS
  modules = {n for n in names if n.endswith(".py")}
  for base, _, files in os.walk(os.path.join(ROOT, "imagebert_jax")):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(base, name), ROOT).replace(os.sep, "/")
        assert rel in modules, rel
  assert not [n for n in names if n.startswith(("tests/", "tools/", "benchmarks/"))]


@pytest.mark.subprocess
def test_the_installed_training_command_runs_and_lists_its_flags(tmp_path):
  """`imagebert-train`, as pip installed it beside this Python, starts from any folder (nothing
  relies on the checkout being the current folder) and its --help lists main's flags."""
  script = os.path.join(os.path.dirname(sys.executable), "imagebert-train")
  if not os.path.exists(script):
    pytest.skip("the package is not installed in this environment (pip install -e .)")
  out = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert "Traceback" not in out.stderr, out.stderr[-3000:]  # (absl's --help exits with 1)
  for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes",
               "--process_id"):
    assert f"{flag}:" in out.stdout, flag


@pytest.mark.subprocess
def test_runs_keep_compiled_steps_in_the_persistent_cache(tmp_path):
  """`use_compilation_cache` (the main command's --compilation_cache) points JAX at a folder and
  a compiled function lands there; JAX_COMPILATION_CACHE_DIR, when set, wins over the flag."""
  code = (
      "import sys, jax, jax.numpy as jnp\n"
      "from imagebert_jax.main import use_compilation_cache\n"
      "print(use_compilation_cache(sys.argv[1]))\n"
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
      "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  folder = tmp_path / "cache"
  out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**env, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(folder)
  assert any(folder.iterdir()), "nothing was cached"
  other = tmp_path / "from_env"
  out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env={**env, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(other)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(other) and any(other.iterdir())


def test_commands_are_quiet_by_default():
  """The commands' log filter: the package's own INFO records (progress) and clu's metric lines
  pass, a library's INFO does not, every warning does; with verbosity 1 nothing is filtered."""
  import logging
  from imagebert_jax import cli
  here = os.path.join(ROOT, "imagebert_jax", "training", "train.py")
  lib = os.path.join("/usr", "lib", "python3", "site-packages", "jax", "_src", "xla_bridge.py")
  clu = os.path.join("/venv", "site-packages", "clu", "metric_writers", "logging_writer.py")
  record = lambda path, level: logging.LogRecord("x", level, path, 1, "m", None, None)
  handler = logging.StreamHandler()
  cli.quiet_libraries(handler, verbosity=0)
  assert handler.filter(record(here, logging.INFO))
  assert handler.filter(record(clu, logging.INFO))
  assert not handler.filter(record(lib, logging.INFO))
  assert handler.filter(record(lib, logging.WARNING))
  loud = logging.StreamHandler()
  cli.quiet_libraries(loud, verbosity=1)
  assert loud.filter(record(lib, logging.INFO))


# Every command line of the package, by module, with the program name its errors start with.
COMMAND_MODULES = {"imagebert_jax.main": "imagebert-train",
                   "imagebert_jax.data.build": "imagebert-build",
                   "imagebert_jax.detector.extract_features": "imagebert-extract",
                   "imagebert_jax.retrieval.search": "imagebert-search",
                   "imagebert_jax.bench": "imagebert-bench",
                   "imagebert_jax.bench.detector": "python -m imagebert_jax.bench.detector",
                   "imagebert_jax.bench.data": "python -m imagebert_jax.bench.data",
                   "imagebert_jax.data.realistic": "python -m imagebert_jax.data.realistic"}


@pytest.mark.subprocess
@pytest.mark.parametrize("module", sorted(COMMAND_MODULES))
def test_every_command_refuses_a_bad_flag_in_one_line(module):
  """One convention (imagebert_jax/cli.py): an unknown flag is one line on stderr naming it,
  `<program>: error: ...`, exit status 2; --help lists the flags and exits without an error."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "IMAGEBERT_MALLOC": "system"}
  bad = subprocess.run([sys.executable, "-m", module, "--no_such_flag=1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2, bad.stderr[-2000:]
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1, bad.stderr[-2000:]
  assert lines[0].startswith(f"{COMMAND_MODULES[module]}: error: ") and "no_such_flag" in lines[0]
  help_ = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
  assert help_.returncode in (0, 1) and "--" in help_.stdout, help_.stderr[-2000:]  # absl: 1
