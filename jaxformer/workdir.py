"""A run's workdir: every path in it, and the run config recorded there.

A workdir holds one run; this module is the only one that knows its layout:

```
<workdir>/config.json          the resolved config (`write_run_config`); the configs of
<workdir>/config.<n>.json        earlier runs in this workdir, when a resume changed settings
<workdir>/vocab.model          the SentencePiece vocabulary (trained once, then reused)
<workdir>/checkpoints/<step>/  orbax checkpoints, one directory per saved step, each with
           state/              the whole TrainState (params, optimizer state, step)
           data/               the grain iterator state, one JSON file per process
           checksums/          a checksum of every array and iterator state (JSON),
                                 checked on restore; absent in checkpoints of older code
<workdir>/averaged/<name>/     averaged parameters, e.g. last5_1000-5000 (with checksums/)
<workdir>/damaged/<step>/      checkpoints found damaged on resume, moved aside (never deleted)
<workdir>/superseded/<step>/   checkpoints newer than a `--restore-step`, moved aside
<workdir>/superseded/metrics.<n>.jsonl  records of metrics.jsonl past the step a run restarted
                               from (they are trained, and logged, again)
<workdir>/metrics.jsonl        one JSON object per logged step and per evaluation
<workdir>/tensorboard/         TensorBoard event files
<workdir>/tfds/                the run's datasets, unless data.data_dir names another place
<workdir>/logs/                one log file per pod worker
<workdir>/lock                 flocked by the one trainer of the workdir, and naming it
```

The workdir may be a local directory or a gs:// URL (etils.epath reads and writes both).

A resume must not change what the checkpoints hold: `check_compatible` names every config key
whose change would make them unusable (the model's shape, what its parameters compute, the
vocabulary), and lets every other key change (steps, learning rate, logging, parallelism ...).
A run that starts from another run's parameters (fine-tuning) must keep its model:
`check_can_start_from`; its data may change, as it takes the other run's vocabulary along.

One trainer per workdir: `WorkdirLock` keeps a second one out (see there). The commands that
only read (evaluate, translate, plot, average) take no lock and run beside a trainer: they read
only finished checkpoints, which orbax renames into place once complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxformer import config as config_lib
from jaxformer.errors import CheckpointError, ConfigError, JaxformerError
from jaxformer.log import log


class WorkdirError(JaxformerError):
  """A workdir that cannot be used: a file, not writable, or in use."""


CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.model"
CHECKPOINTS_DIR = "checkpoints"
AVERAGED_DIR = "averaged"
DAMAGED_DIR = "damaged"
SUPERSEDED_DIR = "superseded"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TFDS_DIR = "tfds"
LOGS_DIR = "logs"
LOCK_FILE = "lock"
SUPERSEDED_METRICS = "metrics.{n}.jsonl"  # in SUPERSEDED_DIR, n = 1, 2, ...

# Config keys whose change makes the checkpoints of a workdir unusable, with the reason.
# Any other key (train.steps, logging, evaluation, dropout, learning rate, checkpoint.*,
# parallelism) may change when a run is resumed.
MODEL_SHAPE_KEYS = (
    "model.vocab_size", "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff",
    "model.pos_encoding", "model.share_embeddings", "model.tie_output", "model.attention_bias",
    "model.final_logits_bias", "model.scan_layers",
)
# Same shapes, but the parameters were trained to compute something else.
MODEL_FUNCTION_KEYS = ("model.norm", "model.activation", "model.layer_norm_epsilon",
                       "model.sinusoid_layout")
# The vocabulary in the workdir was trained for this data with these settings.
TOKENIZER_KEYS = ("data.vocab_type", "data.task", "data.tfds_name", "data.direction")
# The size the vocabulary was trained to.
VOCAB_SIZE_KEY = "model.vocab_size"
# Learned positions: one embedding row per position, so max_len is part of the shape.
LEARNED_POSITIONS_KEY = "model.max_len"


# --- Paths. -------------------------------------------------------------------------------------

def absolute_workdir(workdir: str) -> str:
  """A local workdir as an absolute path (orbax refuses relative ones); URLs (gs://) as they are."""
  return workdir if "://" in str(workdir) else os.path.abspath(workdir)


def path(workdir: str, *names: str) -> epath.Path:
  """`<workdir>/<names...>`, local or gs://, e.g. `path(w, CHECKPOINTS_DIR, '1000')`."""
  return epath.Path(workdir).joinpath(*names)


def superseded_metrics_path(workdir: str) -> epath.Path:
  """The first free `<workdir>/superseded/metrics.<n>.jsonl` (n = 1, 2, ...)."""
  n = 1
  while path(workdir, SUPERSEDED_DIR, SUPERSEDED_METRICS.format(n=n)).exists():
    n += 1
  return path(workdir, SUPERSEDED_DIR, SUPERSEDED_METRICS.format(n=n))


def resolve_data_dir(config: Any, workdir: str) -> str:
  """Where the run's tfds datasets live: `data.data_dir`, or `<workdir>/tfds` when it is empty."""
  return config.data.data_dir or os.path.join(workdir, TFDS_DIR)


def check_can_write(workdir: str, name: str = "--workdir") -> None:
  """Raises WorkdirError unless `workdir` is (or can be made) a directory this process can write.

  Called before a run writes anything, so that a workdir that is a file, sits under a file, or
  lies on a read-only file system is one line, not a traceback half way through the set-up.
  URLs (gs://) are checked by their first write. `name` says what the directory is, in errors.
  """
  if "://" in str(workdir):
    return
  where = os.path.abspath(workdir)
  if os.path.exists(where) and not os.path.isdir(where):
    raise WorkdirError(f"{name} {workdir} is a file, not a directory; give a directory "
                       "(it is created when missing)")
  existing = where
  while not os.path.exists(existing):  # The nearest part of the path that exists.
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"{name} {workdir} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    reason = "a read-only file system" if _read_only(existing) else "no write permission"
    raise WorkdirError(f"{name} {workdir} cannot be written ({reason} at {existing}); "
                       "choose a directory you can write")


def check_new_dir(directory: str, flag: str) -> None:
  """Raises WorkdirError unless `directory` (local) is missing or empty: what export and import
  write never replaces a user's files."""
  if "://" in str(directory):
    raise WorkdirError(f"{flag} {directory}: export and import write local directories only; "
                       "copy the result to the bucket afterwards")
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise WorkdirError(f"{flag} {directory} already exists and is not an empty directory; give "
                       "a new one (nothing is overwritten)")
  check_can_write(os.path.dirname(os.path.abspath(directory)), name=f"the parent of {flag}")


@contextlib.contextmanager
def written_whole(directory: str) -> Iterator[str]:
  """Yields a scratch directory beside `directory` that becomes `directory` when the block ends
  without an error, and is removed when it fails: a failed export or import leaves nothing."""
  directory = os.path.abspath(directory)
  scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-",
                             dir=os.path.dirname(directory))
  try:
    yield scratch
    if os.path.isdir(directory):
      os.rmdir(directory)  # check_new_dir allowed it only empty.
    os.replace(scratch, directory)
  finally:
    if os.path.isdir(scratch):
      shutil.rmtree(scratch)


def check_run_dir(workdir: str) -> None:
  """Raises CheckpointError unless `workdir` is the directory of a run (for the commands that
  read one: evaluate, translate, average, plot)."""
  if path(workdir).is_file():
    raise CheckpointError(f"--workdir {workdir} is a file, not a workdir; give the directory a "
                          "run was trained in")
  if not path(workdir).is_dir():  # The workdir may be on gs://.
    raise CheckpointError(
        f"workdir {workdir} does not exist; train first with `jaxformer train --workdir "
        f"{workdir}` (or ./launch.sh EXPERIMENT --workdir {workdir})")


# Why a write fails when the storage, not the program, is at fault.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted"}
# tensorstore (orbax's array writer) reports OS errors in its message, not as an OSError.
_TENSORSTORE_WRITE = re.compile(r'Failed writing: "([^"]+)".*?os_error_code=\'(\d+)\'')


def storage_problem(error: BaseException, where: str | None = None) -> str | None:
  """'no space left on device writing PATH (12 MB free)' when `error`, or an error it was raised
  from, is a write that the storage refused (full disk, quota, read-only, permissions); None
  for any other error (a bug keeps its traceback). `where` stands for PATH when the error does
  not name the file."""
  seen, default = error, where
  for _ in range(8):  # The error and the errors it was raised from.
    if seen is None:
      return None
    code, where = None, None
    if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
      code, where = seen.errno, seen.filename
    else:
      match = _TENSORSTORE_WRITE.search(str(seen))
      if match and int(match.group(2)) in _STORAGE_ERRNOS:
        code, where = int(match.group(2)), match.group(1)
    if code is not None:
      where = where or default
      return f"{_STORAGE_ERRNOS[code]} writing {where or 'a file'}{_free_space(where)}"
    seen = seen.__cause__ or seen.__context__
  return None


def _free_space(where: str | None) -> str:
  """' (12.3 MB free)' on the file system of `where`, or '' when it cannot be told."""
  directory = where
  while directory and not os.path.isdir(directory):
    directory = os.path.dirname(directory)
  if not directory:
    return ""
  free = shutil.disk_usage(directory).free
  for unit in ("B", "kB", "MB", "GB"):
    if free < 1000 or unit == "GB":
      return f" ({free:.4g} {unit} free)"
    free /= 1000
  return ""


def _read_only(directory: str) -> bool:
  return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)


# --- The run's config. ------------------------------------------------------------------------

def _normalize(value: Any) -> Any:
  """Lists (as JSON gives them back) compare equal to the schema's tuples."""
  return tuple(value) if isinstance(value, list) else value


def _breaking_keys(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The keys among `saved`/`new` (flattened configs) whose difference breaks a checkpoint."""
  keys = [k for k in MODEL_SHAPE_KEYS + MODEL_FUNCTION_KEYS + TOKENIZER_KEYS
          if saved.get(k) != new.get(k)]
  learned = "learned" in (saved.get("model.pos_encoding"), new.get("model.pos_encoding"))
  if learned and saved.get(LEARNED_POSITIONS_KEY) != new.get(LEARNED_POSITIONS_KEY):
    keys.append(LEARNED_POSITIONS_KEY)
  return keys


def check_compatible(saved_config: ml_collections.ConfigDict,
                     new_config: ml_collections.ConfigDict) -> list[str]:
  """Checks that a run with `new_config` can resume from checkpoints made with `saved_config`.

  Raises CheckpointError naming every key that breaks the checkpoints (the model's shape, what
  its parameters compute, or the vocabulary). Returns the other keys that differ (harmless:
  train.steps, logging, evaluation, dropout, learning rate, checkpoint.*, parallelism ...).
  """
  saved = {k: _normalize(v) for k, v in config_lib.flatten(saved_config).items()}
  new = {k: _normalize(v) for k, v in config_lib.flatten(new_config).items()}
  breaking = _breaking_keys(saved, new)
  if breaking:
    changes = ", ".join(f"{k} ({saved.get(k)!r} -> {new.get(k)!r})" for k in breaking)
    raise CheckpointError(
        f"the config changes what the checkpoints in this workdir hold: {changes}; "
        "put these values back, or use a new --workdir to train a different model")
  return sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))


def check_can_start_from(source_config: ml_collections.ConfigDict,
                         new_config: ml_collections.ConfigDict) -> None:
  """Checks that a run with `new_config` can start from the parameters of a run made with
  `source_config` (fine-tuning, `train.init_from`).

  Raises CheckpointError naming every key of the model's shape (model.vocab_size included) or
  of what its parameters compute that differs. The data and tokenizer keys may differ: the
  source's vocabulary is copied into the new run and used. So may every other key (dropout,
  learning rate, schedule, steps ...).
  """
  saved = {k: _normalize(v) for k, v in config_lib.flatten(source_config).items()}
  new = {k: _normalize(v) for k, v in config_lib.flatten(new_config).items()}
  breaking = [k for k in _breaking_keys(saved, new) if k not in TOKENIZER_KEYS]
  if breaking:
    changes = ", ".join(f"{k} ({saved.get(k)!r} in the source, {new.get(k)!r} here)"
                        for k in breaking)
    raise CheckpointError(
        f"the model differs from the source's: {changes}; fine-tuning keeps the source's "
        "model, so set these keys as its config.json has them")


def read_run_config(workdir: str) -> ml_collections.FrozenConfigDict | None:
  """The config recorded in `<workdir>/config.json`, or None when there is none."""
  config_path = path(workdir, CONFIG_FILE)
  if not config_path.exists():
    return None
  try:
    return config_lib.from_json(config_path.read_text(), where=str(config_path))
  except ConfigError as e:  # A hand edit gave a key a wrong type or value: the message names it.
    raise CheckpointError(f"{e}; correct the file (it records the run's settings) or use a new "
                          "--workdir") from None
  except (OSError, ValueError) as e:  # Not readable, not UTF-8 or not JSON.
    raise CheckpointError(f"{config_path} is not a valid config file ({e}); restore it from a "
                          "backup or use a new --workdir") from None


def has_checkpoints(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a finished step (a directory named by its number)."""
  directory = path(workdir, CHECKPOINTS_DIR)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _check_vocabulary(workdir: str, saved: ml_collections.ConfigDict,
                      new: ml_collections.ConfigDict) -> list[str]:
  """The keys that differ between two configs of a workdir without checkpoints; CheckpointError
  when its vocab.model was trained for other data or another size than `new` asks for."""
  saved_flat = {k: _normalize(v) for k, v in config_lib.flatten(saved).items()}
  new_flat = {k: _normalize(v) for k, v in config_lib.flatten(new).items()}
  if path(workdir, VOCAB_FILE).exists():
    breaking = [k for k in TOKENIZER_KEYS + (VOCAB_SIZE_KEY,)
                if saved_flat.get(k) != new_flat.get(k)]
    if breaking:
      changes = ", ".join(f"{k} ({saved_flat.get(k)!r} -> {new_flat.get(k)!r})" for k in breaking)
      raise CheckpointError(
          f"{path(workdir, VOCAB_FILE)} was trained for other data: {changes}; put these values "
          f"back, or move {VOCAB_FILE} out of the workdir to train a new vocabulary")
  return sorted(k for k in set(saved_flat) | set(new_flat) if saved_flat.get(k) != new_flat.get(k))


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Records `config` as `<workdir>/config.json` at the start of a run (written by process 0).

  A new workdir gets the file. A workdir that has one and checkpoints keeps going only when the
  two configs are compatible (`check_compatible`, else CheckpointError and the file is left
  alone); a workdir without checkpoints (its run stopped before the first save) is taken as new,
  except that a vocab.model there must fit (same data and size). When the configs differ and
  the run may go on, the old file is kept as `config.<n>.json` (n = 1, 2, ...) and the new config
  becomes `config.json`, so evaluation uses the settings of the latest run. Returns the keys
  that changed.
  """
  saved = read_run_config(workdir)
  if saved is None:
    changed = []
  elif has_checkpoints(workdir):
    changed = check_compatible(saved, config)
  else:  # A run that stopped before its first checkpoint: only its vocabulary may stay.
    changed = _check_vocabulary(workdir, saved, config)
  if jax.process_index() != 0 or (saved is not None and not changed):
    return changed
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  config_path = directory / CONFIG_FILE
  if saved is not None:
    n = 1
    while (directory / f"config.{n}.json").exists():
      n += 1
    config_path.rename(directory / f"config.{n}.json")
  tmp_path = directory / f"{CONFIG_FILE}.tmp"
  tmp_path.write_text(config_lib.to_json(config) + "\n")
  tmp_path.replace(config_path)  # Atomic on a local disk: config.json is never half written.
  return changed


# --- One trainer per workdir. -------------------------------------------------------------------

class WorkdirBusyError(WorkdirError):
  """Another trainer holds the workdir's lock."""


# How long a trainer that finds the workdir locked waits for the holder to write its name (it
# does so right after taking the lock), and the longest message shared with the other processes.
_HOLDER_WAIT_S = 2.0
_MESSAGE_BYTES = 2048
# The outcome process 0 shares: the lock is held, or which error every process raises.
_HELD, _BUSY, _UNUSABLE, _FAILED = range(4)


def lock_path(workdir: str) -> str:
  """The file `WorkdirLock` locks: `<workdir>/lock` for a local workdir; for a URL (gs://),
  which cannot be locked, a file in this machine's temporary directory named by its hash."""
  if "://" not in str(workdir):
    return os.path.join(absolute_workdir(workdir), LOCK_FILE)
  digest = hashlib.sha256(str(workdir).rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f"jaxformer-{digest}.lock")


class WorkdirLock:
  """Keeps a second trainer out of a workdir: an OS file lock (flock) that process 0 holds for
  the whole run, on `<workdir>/lock`, which also names the holder (host, pid, start time).

  The kernel releases a flock when its process dies, so a crash or a kill -9 never leaves a
  stale lock, and nothing needs cleaning up: the file stays, and a new trainer takes it. Only
  process 0 of a pod locks; `acquire` shares the outcome, so every process of a pod that finds
  the workdir busy raises the same WorkdirBusyError (and none waits in a collective).

  A gs:// workdir cannot be flocked: the lock is a local file keyed by the workdir's URL
  (`lock_path`), which keeps out a second trainer started on the same machine only.

  `acquire()` once, before the run's first write to the workdir; `release()` at the end (it is
  a no-op when nothing is held). Also a context manager.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = lock_path(workdir)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock (process 0); raises WorkdirBusyError naming the holder when another
    trainer has it, WorkdirError when the lock file cannot be created (on every process)."""
    error = None
    if jax.process_index() == 0:
      try:
        self._fd = _lock(self.path, self.workdir)
      except Exception as e:  # Shared below: the other processes must not wait for process 0.
        error = e
    _share_outcome(error)

  def release(self) -> None:
    """Lets another trainer have the workdir (closing the file releases its flock). The file is
    emptied first, so that a run that wrote nothing else (a refused config) leaves the workdir
    as it found it, and a name in the file is that of a running trainer, or of a killed one."""
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:  # The lock is released all the same.
        pass
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _open_lock_file(lock_file: str, workdir: str) -> int:
  """The lock file, opened for reading and writing (created with its directory, never
  truncated: another trainer may hold it and have written its name there)."""
  directory = os.path.dirname(lock_file)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory; give a directory (a "
                       "run's, or a new one)")
  try:
    os.makedirs(directory, exist_ok=True)
    return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    raise WorkdirError(f"cannot create the lock file {lock_file} ({e.strerror or e}); --workdir "
                       "must be a directory this user can write to") from None


def _lock(lock_file: str, workdir: str) -> int | None:
  """Takes the flock on `lock_file` and writes the holder into it; returns the open file (None
  where the file system has no locks: the run goes on, unprotected, with a warning)."""
  fd = _open_lock_file(lock_file, workdir)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(f"{workdir} is in use by another trainer ({holder}); wait for it "
                             "to finish, stop it, or use another --workdir") from None
    os.close(fd)
    log(f"jaxformer: warning: cannot lock {lock_file} ({e.strerror or e}); nothing keeps a "
        "second trainer out of this workdir")
    return None
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
  except OSError:  # A full disk, say: do not keep holding a lock nobody can release.
    os.close(fd)
    raise
  return fd


def _read_holder(fd: int) -> str:
  """'pid 1234 on host h, started 2026-12-01 14:20:03', from the lock file of another trainer.

  The holder writes its name right after it takes the lock, over the name of the trainer
  before it: until then the file is empty or names a process of this host that is gone, so
  wait a little for the new name."""
  deadline = time.monotonic() + _HOLDER_WAIT_S
  while True:
    try:
      holder = json.loads(os.pread(fd, _MESSAGE_BYTES, 0).decode("utf-8", "replace"))
      text = f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
      if holder["host"] != socket.gethostname() or _is_running(int(holder["pid"])):
        return text
    except (ValueError, KeyError, TypeError):
      text = "which did not say who it is"
    if time.monotonic() > deadline:
      return text
    time.sleep(0.05)


def _is_running(pid: int) -> bool:
  """Whether a process `pid` exists on this host."""
  try:
    os.kill(pid, 0)  # Signal 0 only asks whether the process exists.
  except ProcessLookupError:
    return False
  except PermissionError:  # It exists, and belongs to another user.
    return True
  return True


def _share_outcome(error: Exception | None) -> None:
  """Raises process 0's `error` (None: it holds the lock) on every process of the run."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  if error is not None:
    problem = None if isinstance(error, WorkdirError) else storage_problem(error)
    kind = (_BUSY if isinstance(error, WorkdirBusyError) else
            _UNUSABLE if isinstance(error, WorkdirError) or problem else _FAILED)
    text = (problem or str(error)).encode()[:_MESSAGE_BYTES - 1]
    message[0], message[1:1 + len(text)] = kind, np.frombuffer(text, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(message))
  kind = int(shared[0])
  if error is not None:
    raise error
  if kind == _HELD:
    return
  text = bytes(shared[1:]).rstrip(b"\0").decode("utf-8", "replace")
  if kind == _FAILED:
    raise RuntimeError(f"process 0 failed to lock the workdir: {text}")
  raise (WorkdirBusyError if kind == _BUSY else WorkdirError)(text)
