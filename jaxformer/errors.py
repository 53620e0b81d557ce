"""User-facing errors.

Every failure a user can cause (a bad config key, a missing file, a damaged checkpoint, text
that does not fit the model) raises a subclass of `JaxformerError` whose message says what was
wrong and what to do. The CLI prints it as one line, `error: <message>`, and exits with status 2
(EXIT_USER_ERROR).
Programming errors (bugs) may raise anything and keep their tracebacks.
"""


# The exit statuses of `jaxformer` (and of ./launch.sh, which passes them on); anything else is
# a crash. README, "When things go wrong".
EXIT_FINISHED = 0    # the command did its work; training reached train.steps.
EXIT_USER_ERROR = 2  # one `error:` line; nothing was written (a diverged run keeps its last good
                     # checkpoint; a full disk names it).
EXIT_STOPPED = 75    # stopped by a signal with a checkpoint at the stop step: run the same
                     # command to resume (75 is sysexits' EX_TEMPFAIL: try again later).


class JaxformerError(Exception):
  """Base class of every error a user can fix by changing their input."""


class ConfigError(JaxformerError):
  """An unknown, mistyped or impossible configuration value."""


class DataError(JaxformerError):
  """Input data that is missing, misaligned or not valid UTF-8."""


class CheckpointError(JaxformerError):
  """A missing, damaged or incompatible checkpoint."""


class InputError(JaxformerError):
  """Text or arguments given to a command that cannot be used as they are."""


class StorageError(JaxformerError):
  """A write the storage refused: a full disk, a quota, a read-only file system, permissions."""
