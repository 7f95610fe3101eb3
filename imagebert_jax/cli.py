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
  metric lines); not a library's log of one of this package's errors (a Beam worker's, say),
  which the command prints as its one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname or ""
    if record.exc_info and not path.startswith(_PACKAGE):
      from imagebert_jax.errors import Error
      if isinstance(record.exc_info[1], Error):
        return False  # a user's error that a library logs on its way up: the command prints it
    return (record.levelno >= logging.WARNING or path.startswith(_PACKAGE)
            or any(p in path for p in _PROGRESS))


def quiet_libraries(handler: logging.Handler, verbosity: int) -> None:
  """Puts QuietLibraries on `handler` unless `verbosity` >= 1."""
  if verbosity < 1 and not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())


# ------------------------------------------------------------------------------------------------
# Command lines: every command parses absl flags defined on a FlagValues of its own (so it can
# be parsed more than once in a process, as the tests do), `--name=value` or `--name value`;
# `--help` prints them; a bad or missing flag is one line naming it, exit status 2, like every
# other error a user can fix (imagebert_jax.errors). `imagebert-train` is the exception that
# proves it: ml_collections' --config needs absl's global flags, parsed by absl's app.
# ------------------------------------------------------------------------------------------------
def new_flags(*, verbosity: bool = True):
  """A FlagValues for one command, with `--verbosity` / `-v` (1: the libraries' INFO logs too)."""
  from absl import flags
  fv = flags.FlagValues()
  if verbosity:
    flags.DEFINE_integer("verbosity", 0, "1: the libraries' INFO logs too (default: progress, "
                         "the answer, warnings and errors).", short_name="v", flag_values=fv)
  return fv


def parse_flags(fv, argv: list[str], *, prog: str, usage: str = "[flags]",
                about: str = "") -> list[str]:
  """Parses `argv` (argv[0] is the program) on `fv`; returns the positional arguments after
  the program. `--help` / `-h` prints the usage, `about` and the flags, and exits 0; a bad,
  unknown or missing flag is one line on stderr (`<prog>: error: ...`), exit status 2."""
  from absl import flags
  argv = list(argv)
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
    print(f"usage: {prog} {usage}\n" + (f"\n{about}\n" if about else "")
          + f"\nflags:\n{fv.get_help(include_special_flags=False)}")
    raise SystemExit(0)
  try:
    return fv(argv)[1:]
  except flags.Error as e:
    refuse(prog, str(e))


def absl_parser(prog: str):
  """A `flags_parser` for absl's app.run, for the commands whose flags are absl's global ones
  (ml_collections' --config needs them): a bad flag is one line, exit status 2; --help is
  absl's."""
  def parse(argv: list[str]) -> list[str]:
    from absl import flags
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      refuse(prog, str(e))
  return parse


def refuse(prog: str, message: str) -> None:
  """What a command refuses (a flag combination, an imagebert_jax.errors.Error): one line on
  stderr, `<prog>: error: <message>` (a message of several lines joined into one), exit
  status 2."""
  import sys
  print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
  raise SystemExit(2)
