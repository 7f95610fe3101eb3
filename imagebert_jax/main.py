"""Runs an ImageBERT config: `python -m imagebert_jax.main --config configs/demo.py --workdir DIR`
(also the command `imagebert-train`).

Without --config it runs the synthetic demo (configs/demo.py). Any field can be overridden:
`--config.stages.pretrain.train.num_steps=100`. The work directory may be a bucket URL
(`gs://bucket/runs/x`): that is how the hosts of a TPU VM slice share checkpoints.

Several processes: JAX's own cluster detection starts the runtime (Cloud TPU VMs, SLURM, Open
MPI, ...); --coordinator_address, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) override it (imagebert_jax/distributed.py).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imagebert_jax import allocator, cli, errors


def _demo_config() -> str | None:
  """configs/demo.py of the checkout the package runs from (an editable install, or none);
  None where the package was installed without its checkout (--config is then required)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "configs",
                      "demo.py")
  return path if os.path.isfile(path) else None


_CONFIG = config_flags.DEFINE_config_file("config", _demo_config(), "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/imagebert_demo",
                               "Where checkpoints, metrics and TensorBoard events go: a local "
                               "folder or a bucket URL (gs://...).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Several processes: host:port of process 0 (overrides "
    "JAX_COORDINATOR_ADDRESS and JAX's cluster detection).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Several processes: how many (overrides JAX_NUM_PROCESSES and JAX's "
    "cluster detection; 0: not given).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "Several processes: this one's index (overrides JAX_PROCESS_ID and JAX's "
    "cluster detection; -1: not given).")

_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "imagebert_jax", "jax"),
    "JAX's persistent compilation cache: a folder where compiled steps are kept, so a resumed or "
    "repeated run with the same model and shapes starts without compiling them again "
    "(JAX_COMPILATION_CACHE_DIR, when set, wins; '' turns it off).")


def use_compilation_cache(folder: str) -> str:
  """Points JAX's persistent compilation cache at `folder` unless JAX_COMPILATION_CACHE_DIR is
  set (then that one is used; empty: none). Returns the folder in use ('' for none). Only
  executables that took at least a second to compile are kept (JAX's default)."""
  import jax
  folder = os.environ.get("JAX_COMPILATION_CACHE_DIR", folder)
  if folder:
    jax.config.update("jax_compilation_cache_dir", folder)
  return folder


PROG = "imagebert-train"


def main(argv):
  if len(argv) > 1:
    cli.refuse(PROG, f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    cli.refuse(PROG, "--config is required (e.g. configs/demo.py of the checkout)")
  try:  # ml_collections reports a config file it could not load on first use
    config = _CONFIG.value
    config.keys()
  except OSError as e:
    cli.refuse(PROG, f"--config: {e}")
  # Quiet by default: the libraries' INFO logs only with --verbosity 1 (-v 1).
  cli.quiet_libraries(logging.get_absl_handler(), flags.FLAGS.verbosity)
  import jax
  cache = use_compilation_cache(_CACHE.value)
  from imagebert_jax import distributed
  from imagebert_jax.training import train
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    cli.refuse(PROG, str(e))
  # TensorFlow only reads data here: keep it off the accelerators.
  from imagebert_jax.data.pipeline import hide_gpus_from_tf
  hide_gpus_from_tf()
  logging.info("JAX %s on %s: %d devices, process %d of %d; compilation cache: %s",
               jax.__version__, jax.default_backend(), jax.device_count(),
               jax.process_index(), jax.process_count(), cache or "off")
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM, so supervisors see the run as unfinished
  except errors.Error as e:
    cli.refuse(PROG, str(e))


def command() -> None:
  """The console command `imagebert-train`. It starts again at once with tcmalloc where the
  system has it (imagebert_jax/allocator.py: CPU steps 1.4 times faster; IMAGEBERT_MALLOC=system
  keeps the C library's). absl's --help lists the flags of the program it runs as (the script pip
  wrote); this module's are declared as that program's."""
  allocator.reexec("imagebert_jax.main")
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=cli.absl_parser(PROG))


if __name__ == "__main__":
  command()
