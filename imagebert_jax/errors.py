"""The errors a user can cause and fix: a config key, a file, a record, a query.

Every one derives from `Error`. Its message is one line that names what to fix (the config key
and its value, the file, the record); the commands print that line alone and exit with code 2.
Those about a value are ValueErrors too, as Python code that calls the package expects.
"""


class Error(Exception):
  """An error the user can fix; the message is one line naming the key, file or record."""
  exit_code = 2


class ConfigError(Error, ValueError):
  """A config that cannot run; the message names the key and the value."""


class CheckpointMismatch(ConfigError):
  """A checkpoint of a different train state than the config builds."""


class RunConfigError(Error, ValueError):
  """A stage folder that cannot describe its model."""


class RegionFileError(Error, ValueError):
  """A region file or one of its records cannot be read."""


class WeightsError(Error, ValueError):
  """A weight file does not match the detector config."""


class InputError(Error, ValueError):
  """A command's input cannot be used: a folder or list of files, ids that collide."""


class SearchError(Error):
  """A search that cannot run: its index, dataset, query or model."""
