"""Two processes on this machine (CPU collectives), 4 simulated devices each, against one process
with 8: the same losses, parameters and evaluation scores element by element, and checkpoints
that restore across the two topologies bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import TINY, free_port

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def run(num_processes: int, workdir: str, mode: str) -> list[dict]:
  devices = 8 // num_processes
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
         and not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}

  def settings(p):  # process 1 is given a wrong id here; its argument overrides it
    if num_processes == 1:
      return {}
    return {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(0 if p == 1 else p)}

  procs = [subprocess.Popen([sys.executable, WORKER, str(p), str(num_processes), str(port),
                             str(devices), workdir, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**env, **settings(p)})
           for p in range(num_processes)]
  results = []
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert lines, out[-3000:]
    results.append(json.loads(lines[-1][len("RESULT "):]))
  return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  one = str(tmp_path_factory.mktemp("one_process"))
  two = str(tmp_path_factory.mktemp("two_processes"))
  return (one, run(1, one, "train")), (two, run(2, two, "train"))


def params(workdir, process):
  with np.load(os.path.join(workdir, f"params_{process}.npz")) as z:
    return {k: z[k] for k in z.files}


def test_two_processes_match_one(trained):
  (one, (single,)), (two, pair) = trained
  assert single["devices"] == 8 and [r["processes"] for r in pair] == [2, 2]
  # Each process fed its own half of every batch; together, the batch of the single process.
  assert single["rows"] == list(range(16))
  assert pair[0]["rows"] == list(range(8)) and pair[1]["rows"] == list(range(8, 16))
  want = params(one, 0)
  for p, r in enumerate(pair):
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
    got = params(two, p)
    assert got.keys() == want.keys()
    # Element by element. The reduction order differs between the topologies: on CPU the two
    # runs differed by at most 1e-8 after three steps.
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Scores: every pair, the embeddings' and the re-ranked (NaN where the cross-encoder did not
    # score a pair: the same pairs in both runs).
    for name in ("scores", "itc", "rerank"):
      np.testing.assert_allclose(np.load(os.path.join(two, f"{name}_{p}.npy")),
                                 np.load(os.path.join(one, f"{name}_0.npy")), rtol=1e-6,
                                 atol=1e-7, err_msg=name)
    assert r["pairs_scored"] == single["pairs_scored"] > 0
  # The two processes hold the very same whole parameters and scores.
  for k in want:
    np.testing.assert_array_equal(params(two, 0)[k], params(two, 1)[k])
  for name in ("scores", "itc", "rerank"):
    np.testing.assert_array_equal(np.load(os.path.join(two, f"{name}_0.npy")),
                                  np.load(os.path.join(two, f"{name}_1.npy")))


def test_checkpoints_restore_across_topologies(trained, tmp_path):
  (one, _), (two, _) = trained
  # Written by two processes, read by one: the same parameters, bit for bit.
  (restored,) = run(1, str(tmp_path / "a"), "restore:" + os.path.join(two, "ckpt"))
  assert restored["step"] == 3
  written = params(two, 0)
  for k, v in params(str(tmp_path / "a"), 0).items():
    np.testing.assert_array_equal(v, written[k], err_msg=k)
  # Written by one process, read by two.
  written = params(one, 0)
  for p, r in enumerate(run(2, str(tmp_path / "b"), "restore:" + os.path.join(one, "ckpt"))):
    assert r["step"] == 3
    for k, v in params(str(tmp_path / "b"), p).items():
      np.testing.assert_array_equal(v, written[k], err_msg=k)
    assert r["shard_shape"] == [TINY.hidden_size // 2, TINY.mlp_dim]  # fsdp 2 halves embed
