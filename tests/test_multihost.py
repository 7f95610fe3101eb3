"""Two processes on this machine (CPU collectives), 4 simulated devices each, against one process
with 8: the same losses, the same evaluation scores, and checkpoints that restore across the two
topologies."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import TINY

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(num_processes: int, workdir: str, mode: str) -> list[dict]:
  devices = 8 // num_processes
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, WORKER, str(p), str(num_processes), str(port),
                             str(devices), workdir, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
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


def test_two_processes_match_one(trained):
  (_, (single,)), (_, pair) = trained
  assert single["devices"] == 8 and [r["processes"] for r in pair] == [2, 2]
  for r in pair:
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(r["params_checksum"], single["params_checksum"], rtol=1e-6)
    assert r["scores_shape"] == single["scores_shape"]
    np.testing.assert_allclose(r["scores_checksum"], single["scores_checksum"], rtol=1e-5)
    np.testing.assert_allclose(r["itc_checksum"], single["itc_checksum"], rtol=1e-5)
    np.testing.assert_allclose(r["rerank_checksum"], single["rerank_checksum"], rtol=1e-5)
    assert r["pairs_scored"] == single["pairs_scored"] > 0


def test_checkpoints_restore_across_topologies(trained, tmp_path):
  (one, (single,)), (two, pair) = trained
  # Written by two processes, read by one.
  (restored,) = run(1, str(tmp_path / "a"), "restore:" + os.path.join(two, "ckpt"))
  assert restored["step"] == 3
  np.testing.assert_allclose(restored["params_checksum"], pair[0]["params_checksum"], rtol=1e-12)
  # Written by one process, read by two.
  for r in run(2, str(tmp_path / "b"), "restore:" + os.path.join(one, "ckpt")):
    assert r["step"] == 3
    np.testing.assert_allclose(r["params_checksum"], single["params_checksum"], rtol=1e-12)
    assert r["shard_shape"] == [TINY.hidden_size // 2, TINY.mlp_dim]  # fsdp 2 halves embed

