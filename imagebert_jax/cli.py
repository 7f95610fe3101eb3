"""What the commands share about their output: quiet by default.

A command shows its progress and its answer, every warning and every error; the INFO chatter of
the libraries it runs on (JAX's backend search, TensorFlow Datasets' readers, Orbax's saves, ...)
only with `--verbosity 1` (`-v 1`).
"""

from __future__ import annotations

import logging
import os

_PACKAGE = os.path.dirname(__file__) + os.sep  # a module's __file__ is absolute
# clu logs the training's metric lines and its progress report (steps/s, percent done): kept.
_PROGRESS = (os.sep + "clu" + os.sep,)


class QuietLibraries(logging.Filter):
  """Passes warnings and errors, and records below WARNING only from this package (and clu's
  metric lines)."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname or ""
    return (record.levelno >= logging.WARNING or path.startswith(_PACKAGE)
            or any(p in path for p in _PROGRESS))


def quiet_libraries(handler: logging.Handler, verbosity: int) -> None:
  """Puts QuietLibraries on `handler` unless `verbosity` >= 1."""
  if verbosity < 1 and not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
