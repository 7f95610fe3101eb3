"""Multi-process start-up (imagebert_jax.distributed): JAX's own cluster detection decides, explicit
settings override it, one process starts nothing. jax.distributed.initialize is replaced by a
recorder here (a real start is tests/test_multihost.py's: two processes through these settings,
one of them overriding a wrong environment variable by argument)."""

import os

import jax
import pytest

from imagebert_jax import distributed

LAUNCHER_VARIABLES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_")


@pytest.fixture
def calls(monkeypatch):
  """A clean environment (no launcher's variables) and the recorded initialize calls."""
  for name in list(os.environ):
    if name.startswith(LAUNCHER_VARIABLES):
      monkeypatch.delenv(name)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def test_one_process_starts_nothing(calls):
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False
  assert calls == []


def test_explicit_settings_from_the_environment_and_flags_over_them(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert distributed.initialize() is True
  assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}
  # Flags (main's --coordinator_address, --num_processes, --process_id) win over the variables.
  distributed.initialize("host9:99", 8, 7)
  assert calls[-1] == {"coordinator_address": "host9:99", "num_processes": 8, "process_id": 7}
  distributed.initialize(process_id=3)
  assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 3}


def test_partial_settings_without_a_cluster_are_refused(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
    distributed.initialize()
  assert calls == []


@pytest.mark.parametrize("launcher, variables", [
    ("SlurmCluster", {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]",
                      "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}),
    ("OmpiCluster", {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911",
                     "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                     "OMPI_COMM_WORLD_LOCAL_RANK": "0"}),
])
def test_a_cluster_jax_detects_is_left_to_jax(calls, monkeypatch, launcher, variables):
  for k, v in variables.items():
    monkeypatch.setenv(k, v)
  assert distributed.detected_cluster() == launcher
  assert distributed.initialize() is True
  assert calls[-1] == {}  # no arguments: JAX finds the coordinator, the count and the id
  # What is given explicitly still goes in, and JAX detects the rest.
  distributed.initialize(coordinator_address="host0:5555")
  assert calls[-1] == {"coordinator_address": "host0:5555"}


def test_the_readme_claims_what_this_jax_detects():
  """The launchers the README and distributed.py name are JAX's own detected environments in
  the version installed (opt-in methods such as mpi4py are not detected by default)."""
  from jax._src import clusters
  detected = {c.__name__ for c in clusters.ClusterEnv._cluster_types
              if not getattr(c, "opt_in_only_method", False)}
  # BaseTpuCluster is the two TPU kinds' base class: registered, never present itself.
  assert detected == {"BaseTpuCluster", "GceTpuCluster", "GkeTpuCluster", "SlurmCluster",
                      "OmpiCluster", "K8sCluster"}, (
      f"JAX {jax.__version__} detects {sorted(detected)}: update docs/several_hosts.md "
      "and imagebert_jax/distributed.py")
  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "docs", "several_hosts.md"), encoding="utf-8").read()
  for words in ("Cloud TPU VM", "SLURM", "Open MPI", "Kubernetes", f"JAX {jax.__version__}"):
    assert words in readme, words
