"""The one path layer: every file the project reads or writes goes through here.

A path is a string: a local path, or a URL (`gs://bucket/folder`, and whatever else etils.epath
accepts: `s3://`, `az://`, ...). URLs go through etils.epath, which uses TensorFlow's file systems
(tf.io.gfile: the same ones TFDS, tf.data and TensorBoard use) where TensorFlow is installed, and
fsspec (gcsfs for gs://) where it is not; TensorFlow is imported only when a URL is first used,
never by importing this module. Local paths keep plain Python behaviour: relative paths are made
absolute where a folder is remembered (`absolute`), and files are written whole or not at all
(a temporary file, then a rename).

On a bucket there are no folders, renames are copies and a written object appears whole when it
is closed; the functions here say where that changes what they promise.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import shutil
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """Whether `path` names a bucket or another file system by URL (`gs://...`)."""
  return "://" in str(path)


def path(p: PathLike) -> epath.Path:
  """The etils.epath.Path of `p` (what Orbax and TFDS take)."""
  return epath.Path(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute (`~` expanded); a URL as it is, without a trailing slash.

  (Joining a URL onto the current folder would make `gs://b/x` the local folder `./gs:/b/x`.)
  """
  p = str(p)
  if is_url(p):
    scheme, _, rest = p.partition("://")
    return f"{scheme}://{rest.rstrip('/')}"
  return os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(p)))


def join(base: PathLike, *parts: str) -> str:
  if is_url(base):
    return posixpath.join(str(base), *parts)
  return os.path.join(base, *parts)


def dirname(p: PathLike) -> str:
  if is_url(p):
    scheme, _, rest = str(p).rstrip("/").partition("://")
    parent = posixpath.dirname(rest)
    return f"{scheme}://{parent}" if parent else f"{scheme}://{rest}"
  return os.path.dirname(p)


def basename(p: PathLike) -> str:
  return posixpath.basename(str(p).rstrip("/")) if is_url(p) else os.path.basename(p)


def relative_to(p: PathLike, start: PathLike) -> str:
  """`p` relative to the folder `start` ('/'-separated); both local or both URLs."""
  if is_url(p) or is_url(start):
    p, start = str(p), str(start).rstrip("/") + "/"
    if not p.startswith(start):
      raise ValueError(f"{p} is not inside {start}")
    return p[len(start):]
  return os.path.relpath(p, start).replace(os.sep, "/")


# ------------------------------------------------------------------------------------------------
# Questions.
# ------------------------------------------------------------------------------------------------
def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def isdir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return epath.Path(p).is_file()


def getsize(p: PathLike) -> int:
  if not is_url(p):
    return os.path.getsize(p)
  return int(epath.Path(p).stat().length)


def listdir(p: PathLike) -> list[str]:
  """The names in folder `p`, sorted (a bucket 'folder' lists the names under its prefix)."""
  if not is_url(p):
    return sorted(os.listdir(p))
  return sorted(child.name for child in epath.Path(p).iterdir())


def glob(pattern: str) -> list[str]:
  """Paths matching `pattern` (`*`, `?`, `[..]` within a name), sorted."""
  if not is_url(pattern):
    import glob as glob_lib
    return sorted(glob_lib.glob(pattern))
  scheme, _, rest = pattern.partition("://")
  parts = rest.split("/")
  fixed = []
  for part in parts:
    if any(c in part for c in "*?["):
      break
    fixed.append(part)
  if len(fixed) == len(parts):
    return [pattern] if exists(pattern) else []
  base = epath.Path(f"{scheme}://{'/'.join(fixed)}")
  return sorted(str(m) for m in base.glob("/".join(parts[len(fixed):])))


def walk_files(p: PathLike) -> list[str]:
  """Every file under folder `p`, at any depth, sorted (locally, names starting with '.' are
  left out, as the shell's `*` does)."""
  if not is_url(p):
    import glob as glob_lib
    return sorted(f for f in glob_lib.glob(os.path.join(p, "**", "*"), recursive=True)
                  if os.path.isfile(f))
  return sorted(str(f) for f in epath.Path(p).rglob("*") if not f.is_dir())


# ------------------------------------------------------------------------------------------------
# Reading and writing.
# ------------------------------------------------------------------------------------------------
def open(p: PathLike, mode: str = "r", encoding: str | None = None,  # noqa: A001
         errors: str | None = None):
  """A file object ('r', 'w', 'a', with 'b' for bytes; text is UTF-8 unless told). On a bucket
  a file being written is uploaded when it is flushed or closed; append re-writes the object."""
  binary = "b" in mode
  if not binary and encoding is None:
    encoding = "utf-8"
  if not is_url(p):
    import builtins
    return builtins.open(p, mode, encoding=encoding, errors=errors)
  if "r" in mode and not isfile(p):  # TensorFlow would say so only at the first read
    raise FileNotFoundError(errno.ENOENT, "No such file", str(p))
  raw = _Raw(epath.Path(p).open(mode.replace("t", "") + ("" if binary else "b")),
             reading="r" in mode)
  buffered = io.BufferedReader(raw) if "r" in mode else _Writer(raw)
  if binary:
    return buffered
  return io.TextIOWrapper(buffered, encoding=encoding, errors=errors)


class _Writer(io.BufferedWriter):
  """io.BufferedWriter whose flush() reaches the file system: io's own passes the buffer to the
  raw stream but never flushes that, so on a bucket nothing would be uploaded before close()
  (a run killed meanwhile would lose every metrics row it had written)."""

  def flush(self) -> None:
    super().flush()
    self.raw.flush()


class _Raw(io.RawIOBase):
  """A raw stream (what io's buffers and text layer take) over what etils.epath opens: a file
  object, or, with TensorFlow's file systems, a context manager that gives one."""

  def __init__(self, handle, reading: bool):
    if hasattr(handle, "read") or hasattr(handle, "write"):
      self._f, self._context = handle, None
    else:
      self._f, self._context = handle.__enter__(), handle
    self._reading = reading

  def readable(self) -> bool:
    return self._reading

  def writable(self) -> bool:
    return not self._reading

  def seekable(self) -> bool:
    return self._reading

  def readinto(self, buffer) -> int:
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset: int, whence: int = 0) -> int:
    self._f.seek(offset, whence)
    return self._f.tell()

  def tell(self) -> int:
    return self._f.tell()

  def write(self, data) -> int:
    self._f.write(bytes(data))
    return len(data)

  def flush(self) -> None:
    if not self.closed and not self._reading:
      self._f.flush()

  def close(self) -> None:
    if not self.closed:
      try:
        if self._context is not None:
          self._context.__exit__(None, None, None)
        else:
          self._f.close()
      finally:
        super().close()


def read_bytes(p: PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_bytes().decode("utf-8")


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes a whole file: locally through a temporary file and a rename, so a reader (or a run
  killed meanwhile) sees the old file or the new one, never half of one; on a bucket one
  object upload, which is whole by itself."""
  if is_url(p):
    epath.Path(p).write_bytes(data)
    return
  tmp = f"{p}.tmp-{os.getpid()}"
  with io.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, value: Any, indent: int | None = 1) -> None:
  """`value` as JSON, ending in a newline, whole or not at all (see write_bytes)."""
  write_text(p, json.dumps(value, indent=indent) + "\n")


def sha256(p: PathLike) -> str:
  """The SHA-256 of a file's bytes, in hex."""
  return hashlib.sha256(read_bytes(p)).hexdigest()


def save_npy(p: PathLike, array) -> None:
  """np.save to any path, whole or not at all (see write_bytes)."""
  import numpy as np
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_bytes(p, buffer.getvalue())


def load_npy(p: PathLike):
  import numpy as np
  if not is_url(p):
    return np.load(p)
  return np.load(io.BytesIO(read_bytes(p)), allow_pickle=False)


# ------------------------------------------------------------------------------------------------
# Folders.
# ------------------------------------------------------------------------------------------------
def makedirs(p: PathLike) -> None:
  """Makes folder `p` and its parents (on a bucket: a folder marker; objects need none)."""
  if is_url(p):
    epath.Path(p).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(p, exist_ok=True)


def remove(p: PathLike) -> None:
  """Removes a file; nothing when it is not there."""
  try:
    epath.Path(p).unlink()
  except FileNotFoundError:
    pass


def rmtree(p: PathLike) -> None:
  """Removes a folder and everything in it; nothing when it is not there."""
  if not is_url(p):
    shutil.rmtree(p, ignore_errors=True)
    return
  if exists(p):
    epath.Path(p).rmtree()


def replace(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder to `dst`, replacing a file there. Atomic locally; on a bucket a copy
  of every object then a delete."""
  if not is_url(src) and not is_url(dst):
    os.replace(src, dst)
  else:
    epath.Path(src).replace(dst)


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies one file (between a local path and a bucket, either way)."""
  if not is_url(src) and not is_url(dst):
    shutil.copyfile(src, dst)
  else:
    epath.Path(src).copy(dst, overwrite=True)
