"""tcmalloc for the commands (imagebert_jax/allocator.py): the environment that preloads it, and
a real start again with it, read back from the process's own memory map."""

import os
import subprocess
import sys

import pytest

from imagebert_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_tcmalloc_looks_in_the_folders_given(tmp_path):
  assert allocator.find_tcmalloc((str(tmp_path),)) is None
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert allocator.find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
  (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal one first
  assert allocator.find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_preload_environment():
  base = {"PATH": "/bin", "LD_PRELOAD": "/opt/libother.so"}
  env = allocator.preload_environment(base, "/x/libtcmalloc_minimal.so.4", is_loaded=False)
  # Put before what was preloaded already, everything else kept, the caller's dict untouched.
  assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4 /opt/libother.so"
  assert env["PATH"] == "/bin" and base["LD_PRELOAD"] == "/opt/libother.so"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
  # Nothing to do: loaded already, started so already (no loop), opted out, nothing installed.
  lib = "/x/libtcmalloc_minimal.so.4"
  assert allocator.preload_environment(base, lib, is_loaded=True) is None
  assert allocator.preload_environment(env, lib, is_loaded=False) is None
  assert allocator.preload_environment({**base, "IMAGEBERT_MALLOC": "system"}, lib,
                                       is_loaded=False) is None
  assert allocator.without_preload(env)["LD_PRELOAD"] == "/opt/libother.so"
  assert "LD_PRELOAD" not in allocator.without_preload({"LD_PRELOAD": lib})


PROBE = """
import sys
from imagebert_jax import allocator
allocator.reexec("probe")
print(allocator.loaded(), sys.argv[1:])
"""


@pytest.mark.skipif(allocator.find_tcmalloc() is None,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
@pytest.mark.parametrize("opt_out", [False, True])
def test_command_starts_again_with_tcmalloc(tmp_path, opt_out):
  (tmp_path / "probe.py").write_text(PROBE)
  env = allocator.without_preload()
  env.pop("IMAGEBERT_MALLOC_PRELOADED", None)
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
  if opt_out:
    env["IMAGEBERT_MALLOC"] = "system"
  out = subprocess.run([sys.executable, "-m", "probe", "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == f"{not opt_out} ['a', '--b=1']"
