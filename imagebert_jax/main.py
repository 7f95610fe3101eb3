"""Runs an ImageBERT config: `python -m imagebert_jax.main --config configs/demo.py --workdir DIR`.

Without --config it runs the synthetic demo (configs/demo.py). Any field can be overridden:
`--config.stages.pretrain.train.num_steps=100`.
"""

import logging as logging_lib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/imagebert_demo",
                               "Where checkpoints, metrics and TensorBoard events go.")


class _QuietLibraries(logging_lib.Filter):
  """Drops the per-save INFO chatter of Orbax (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  from imagebert_jax import distributed, train
  distributed.initialize()
  # TensorFlow only reads data here: keep it off the accelerators.
  from imagebert_jax.data.pipeline import hide_gpus_from_tf
  hide_gpus_from_tf()
  logging.info("JAX %s on %s: %d devices, process %d of %d", jax.__version__,
               jax.default_backend(), jax.device_count(), jax.process_index(),
               jax.process_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM, so supervisors see the run as unfinished
  except train.ConfigError as e:
    logging.error("%s", e)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
