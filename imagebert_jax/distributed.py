"""Starting JAX's multi-process runtime: JAX's own cluster detection, with explicit settings as
the override.

`initialize()` calls `jax.distributed.initialize()`:

- with the coordinator, the process count and this process's id when they are given (main's
  flags `--coordinator_address`, `--num_processes`, `--process_id`, or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; flags win);
- with no arguments when JAX's own cluster detection recognises where it runs (in JAX 0.10.2:
  Cloud TPU VMs on GCE and on GKE, SLURM, Open MPI's mpirun (ORTE, which sets
  OMPI_MCA_orte_hnp_uri), Kubernetes with the `kubernetes` package installed); it then finds the
  coordinator, the processes and this one's id itself, and any of them given explicitly replaces
  what it found;
- not at all otherwise: one process, nothing to start.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def given(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def settings(coordinator_address: str = "", num_processes: int = 0,
             process_id: int = -1) -> Settings:
  """The explicit settings: the arguments where given (non-empty, > 0, >= 0), else the
  environment variables of ENV."""
  def env(name, convert):
    value = os.environ.get(ENV[name], "").strip()
    if not value:
      return None
    try:
      return convert(value)
    except ValueError:
      raise ValueError(f"{ENV[name]}={value!r} is not a number") from None
  return Settings(
      coordinator_address=coordinator_address or env("coordinator_address", str),
      num_processes=num_processes if num_processes > 0 else env("num_processes", int),
      process_id=process_id if process_id >= 0 else env("process_id", int))


def detected_cluster() -> str | None:
  """The cluster environment JAX's own detection finds here (the one a no-argument
  `jax.distributed.initialize()` would use), by its class name; None when there is none."""
  try:
    from jax._src import clusters
    kinds = clusters.ClusterEnv._cluster_types  # noqa: SLF001 - JAX's detection, as it runs it
  except (ImportError, AttributeError):
    return "unknown"  # cannot ask: let jax.distributed.initialize() decide
  for kind in kinds:
    if not getattr(kind, "opt_in_only_method", False) and kind.is_env_present():
      return kind.__name__
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> bool:
  """Starts the multi-process runtime when this run has several processes (see the module's
  docstring); True when it started it."""
  explicit = settings(coordinator_address, num_processes, process_id)
  given = explicit.given()
  if len(given) == 3:
    how = "explicit settings"
  else:
    cluster = detected_cluster()
    if cluster is None:
      if given:
        missing = [ENV[k] for k in ENV if k not in given]
        raise ValueError(f"{', '.join(f'{ENV[k]}={v}' for k, v in given.items())} given, but "
                         f"not {', '.join(missing)}, and JAX detects no cluster to find them "
                         "from: give all three (or the flags --coordinator_address, "
                         "--num_processes, --process_id)")
      return False
    how = f"JAX's cluster detection ({cluster})" + (
        f" with {', '.join(sorted(given))} given" if given else "")
  try:
    jax.distributed.initialize(**given)
  except ValueError as e:
    if len(given) < 3 and "should be defined" in str(e):
      return False  # an unknown detection found nothing either: one process
    raise
  logging.info("Distributed runtime from %s: process %d of %d", how, jax.process_index(),
               jax.process_count())
  return True
