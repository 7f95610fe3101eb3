"""tcmalloc for the commands, where the system has it.

XLA's CPU runtime allocates the buffers of every step afresh. With glibc's malloc the large ones
(above its mapping threshold, at most 32 MiB) are mapped from the kernel and unmapped again at
every step, and each page is faulted in and zeroed anew: on the demo's pretraining step (2-core
CPU) about a fifth of the process's time went to the kernel. tcmalloc keeps freed memory for the
next step: the same step 1.4 times faster (BENCHMARKS.md, "The memory allocator"). No tuning of
glibc's (MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_) changed it.

An allocator must be loaded before the process starts, so `reexec` starts the command again,
at once, with tcmalloc in LD_PRELOAD (the process keeps its id, arguments and environment).
Nothing happens where tcmalloc is not installed (Debian and Ubuntu: `apt-get install
libtcmalloc-minimal4`), where it is loaded already, or with IMAGEBERT_MALLOC=system.
"""

from __future__ import annotations

import os
import sys

OPT_OUT = "IMAGEBERT_MALLOC"  # 'system': keep the C library's allocator
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
           "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")
# tcmalloc reports every allocation above 1 GiB on stderr by default; a run's data loading makes
# such allocations on purpose.
_QUIET = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
# Set on the process started again, so that a preload the loader ignored cannot loop.
_STARTED = "IMAGEBERT_MALLOC_PRELOADED"


def find_tcmalloc(folders: tuple[str, ...] = FOLDERS) -> str | None:
  """The path of an installed tcmalloc, or None."""
  for folder in folders:
    for name in LIBRARIES:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def loaded() -> bool:
  """Whether tcmalloc is mapped into this process."""
  try:
    with open("/proc/self/maps") as f:
      return "tcmalloc" in f.read()
  except OSError:
    return False


def preload_environment(environ: dict[str, str] | None = None, library: str | None = None,
                        is_loaded: bool | None = None) -> dict[str, str] | None:
  """The environment (a copy of `environ`, default os.environ) that starts a process with
  tcmalloc, or None for nothing to do: opted out, started so already, not Linux, tcmalloc loaded
  here already (`is_loaded`, default `loaded()`) or not installed (`library`, default
  `find_tcmalloc()`)."""
  environ = dict(os.environ if environ is None else environ)
  if (environ.get(OPT_OUT, "").lower() == "system" or environ.get(_STARTED)
      or not sys.platform.startswith("linux") or (loaded() if is_loaded is None else is_loaded)):
    return None
  library = library or find_tcmalloc()
  if library is None:
    return None
  preload = environ.get("LD_PRELOAD", "")
  environ["LD_PRELOAD"] = f"{library} {preload}".strip()
  environ.setdefault(*_QUIET)
  environ[_STARTED] = "1"
  return environ


def preload_children() -> bool:
  """Puts tcmalloc in the environment of the processes this one starts from now on (the test
  session's workers and the commands tests run); this process keeps its allocator. Returns
  whether it did."""
  environ = preload_environment(is_loaded=False)
  if environ is None:
    return False
  os.environ.update({k: environ[k] for k in ("LD_PRELOAD", _QUIET[0], _STARTED)})
  return True


def without_preload(environ: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of the environment without what `preload_children` added: for programs that bring
  their own allocator (a browser)."""
  environ = dict(os.environ if environ is None else environ)
  kept = [p for p in environ.get("LD_PRELOAD", "").split() if "tcmalloc" not in p]
  environ.pop("LD_PRELOAD", None)
  if kept:
    environ["LD_PRELOAD"] = " ".join(kept)
  return environ


def reexec(module: str) -> None:
  """Starts `python -m module <this process's arguments>` in this process's place with tcmalloc
  preloaded; returns (and the command goes on as it is) when there is nothing to do."""
  environ = preload_environment()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], environ)
