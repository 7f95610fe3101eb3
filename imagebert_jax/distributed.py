"""Starting JAX's distributed runtime when a run spans several processes."""

from __future__ import annotations

import os

import jax
from absl import logging

# Set by cluster launchers, or by hand for GPU hosts (see the README).
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> None:
  """Calls jax.distributed.initialize() when several processes take part; else nothing.

  On Cloud TPU VMs with several hosts, and under SLURM or Open MPI, JAX finds the coordinator by
  itself. Elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  env = {k: os.environ.get(k) for k in _ENV}
  if all(env.values()):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif _on_multihost_tpu() or "SLURM_NTASKS" in os.environ and int(
      os.environ["SLURM_NTASKS"]) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("Distributed runtime: process %d of %d", jax.process_index(),
               jax.process_count())


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1
