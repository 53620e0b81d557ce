"""`log()`: the one way jaxformer tells the user something, one line on stderr.

Only process 0 speaks by default, so a pod of many hosts prints each line once; a line that
concerns every process (e.g. what it found in its checkpoint) passes `all_processes=True` and is
prefixed with the process index when there are several. stdout is kept for results
(translations, JSON metrics, paths) so that they can be piped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable

import jax


def _process_index_and_count() -> tuple[int, int]:
  """(index, count) of this process; (0, 1) before the processes of a pod are joined.

  Asking jax.process_index() first would start jax's backend, after which this process could
  no longer join a pod (jax.distributed.initialize must come before any backend work).
  """
  if not jax.distributed.is_initialized():
    return 0, 1
  return jax.process_index(), jax.process_count()


def log(message: str, *, all_processes: bool = False) -> None:
  """Prints `message` on stderr: from process 0 only, or from every process (prefixed)."""
  index, count = _process_index_and_count()
  if not all_processes and index != 0:
    return
  prefix = f"[process {index}] " if all_processes and count > 1 else ""
  to_stderr(lambda: print(prefix + message, file=sys.stderr, flush=True))


def to_stderr(write: Callable[[], Any]) -> None:
  """Runs `write`, something that writes to stderr (a log line, a progress bar's update).

  When the reader of stderr is gone (`jaxformer train ... | head`, an ssh session that
  dropped: BrokenPipeError, or EIO from a terminal that vanished), that is no reason to stop a
  run: stderr is pointed at /dev/null, for every writer of this process (logging, tqdm, the C++
  libraries), and the run goes on. What it reports is also in metrics.jsonl (and, on a pod, in
  each worker's log file).
  """
  try:
    write()
  except OSError:
    drop_stderr()


def drop_stderr() -> None:
  """Sends everything written to stderr from now on to /dev/null (see `to_stderr`)."""
  try:
    fd = sys.stderr.fileno()
  except (OSError, ValueError):  # Not a file (a test's capture): replace the object only.
    sys.stderr = open(os.devnull, "w")
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, fd)  # What Python's buffer still holds goes there too.
  os.close(devnull)


class _FirstLineOnly(logging.Filter):
  """Drops the traceback and all but the first line of a library's log record."""

  def filter(self, record: logging.LogRecord) -> bool:
    record.msg = (record.getMessage().strip().splitlines() or [""])[0]
    record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
    return True


class _NoUnretrievedTaskErrors(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' records (with their tracebacks)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not message.startswith(("Task exception was never retrieved",
                                   "Future exception was never retrieved"))


def one_line_library_errors() -> None:
  """Quiets what libraries log about a failure that jaxformer reports itself, once, with what
  to do (the failure reaches it as an exception too):

  - orbax logs a failed background save with its whole traceback through absl: one line each;
  - reading a damaged checkpoint, orbax leaves its other reads' failures in asyncio tasks that
    nobody awaits, which asyncio logs at exit as 'Task exception was never retrieved' with a
    traceback: dropped.
  """
  for name, kind in (("absl", _FirstLineOnly), ("asyncio", _NoUnretrievedTaskErrors)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())


@contextlib.contextmanager
def absl_warnings_off():
  """Silences the absl warnings of what is normal while a library sets itself up (tfds: a
  builder config made at run time; orbax: a read-only manager), so that a command's error
  stays its one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
