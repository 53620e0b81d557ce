"""The orbax checkpoints of a run: save, restore, keep, and the damaged-checkpoint fallback.

Everything that reads or writes `<workdir>/checkpoints/<step>/` and `<workdir>/averaged/<name>/`
(paths from jaxformer.workdir) is here, and nothing else: what a checkpoint is used for
(evaluation, translation, averaging, pictures) is jaxformer.inference's. This module knows the
layout of a checkpoint (the `state` item holds the TrainState, `params` among its fields; the
`data` item the grain iterator state of each process; the `checksums` item a checksum of each
array and iterator state), but neither the model nor the tokenizer.

- `Checkpointer` wraps an orbax `CheckpointManager`: it saves the train state and the data
  iterator together, asynchronously, every `checkpoint.every_steps`, keeps the `checkpoint.keep`
  newest (and the best by `checkpoint.keep_best`), and restores both onto the shardings of the
  current run, so a run saved on 8 devices with fsdp resumes on 1 (or the other way round).
  `Checkpointer.restore_or_none` resumes from the newest intact step: a damaged newest
  checkpoint is reported, moved aside to `<workdir>/damaged/`, and the previous one is used.
- Checksums: orbax checks the index of a checkpoint but not the bytes of its array chunks
  (zstd-compressed, where a few flipped bytes still decompress, to wrong numbers). So each save
  also writes two sums modulo 2^32 of every array's bits (`array_checksums`: computed where
  the arrays lie, the same numbers whatever the sharding, device count or strategy) and a
  sha256 of each process's iterator state; `restore` and `restore_params` check what they read
  against them, and a mismatch is damage like a missing file. A checkpoint written before
  checksums existed has none and is restored unverified.
- `checkpoint_dir` resolves a step (the newest, a saved step, 'best': the step `best_step`
  names from the metrics orbax recorded beside each step, or the name of an averaged
  checkpoint) to its directory; `restore_params` reads only the parameters stored there (no
  optimizer state), onto given shardings or into host memory; `saved_param_shapes` their
  shapes alone.
- `averaged_path` and `save_averaged` name and write a checkpoint of averaged parameters;
  `save_params` writes any parameters alone (an imported model's step 0).

Every failure a user can cause raises `CheckpointError` with a one-line message;
`DamagedCheckpointError` when a checkpoint's files cannot be read or do not match their
checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError
from jaxformer.log import absl_warnings_off, log

PyTree = Any

STATE_ITEM = "state"    # the TrainState, saved with orbax's StandardSave.
DATA_ITEM = "data"      # the grain iterator state, one file per process.
INFO_ITEM = "info"      # averaged checkpoints: which steps were averaged (JSON).
CHECKSUMS_ITEM = "checksums"  # the checksum of every array and iterator state saved (JSON).
PARAMS_KEY = "params"   # the field of the TrainState that holds the parameters.
# The layout of the checksums item; a reader refuses a format it does not know.
CHECKSUMS_FORMAT = 1

# Whether a larger or a smaller value of each validation metric is better (checkpoint.keep_best).
BEST_MODE = {"loss": "min", "accuracy": "max", "bleu": "max"}
BEST = "best"  # The step name of the best kept checkpoint (`checkpoint_dir`, `--step best`).

_AVERAGED_NAME = re.compile(r"^last(\d+)_(\d+)-(\d+)$")
_MAX_REASON_CHARS = 200
# Status codes of tensorstore errors when a checkpoint's files are damaged.
_TENSORSTORE_PROBLEMS = {"NOT_FOUND": "missing file", "OUT_OF_RANGE": "truncated file",
                         "DATA_LOSS": "corrupt file"}


def _best_fn(keep_best: str):
  """Orbax's best_fn for `keep_best`: the value of that metric in a step's recorded metrics.

  A step whose metrics lack it (recorded while the run kept the best by another metric) ranks
  worst, instead of stopping orbax's sort with a KeyError."""
  worst = math.inf if BEST_MODE[keep_best] == "min" else -math.inf
  return lambda metrics: float(metrics.get(keep_best, worst))


class _NoUnscoredSaveWarning(logging.Filter):
  """Drops orbax's warning that a save carries no metrics although the best is tracked: a step
  saved where the run did not evaluate has none, on purpose (it must not rank as the best)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`")


class DamagedCheckpointError(CheckpointError):
  """A checkpoint directory that exists but cannot be read (missing or truncated files), or
  whose arrays or iterator state do not match the checksums saved with them."""

  def __init__(self, step: int, directory: str, reason: str):
    self.step, self.directory, self.reason = step, directory, reason
    super().__init__(f"checkpoint at step {step} in {directory} is damaged ({reason})")


# --- Saving and restoring training. -----------------------------------------------------------

def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  reason = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
  return reason if len(reason) <= _MAX_REASON_CHARS else reason[:_MAX_REASON_CHARS] + "..."


def _damage_reason(error: BaseException, ckpt_dir: epath.Path) -> str:
  """'missing file state/d/1f3a...' from a tensorstore error, else the error's first line."""
  chain, seen = [], error
  while seen is not None and len(chain) < 8:  # The error and the errors it was raised from.
    chain.append(str(seen))
    seen = seen.__cause__ or seen.__context__
  text = "\n".join(chain)
  code = re.search(r"\b(" + "|".join(_TENSORSTORE_PROBLEMS) + r")\b", text)
  files = re.findall(r'local file "([^"]+)"', text)
  if code and files:
    where = os.path.relpath(files[-1], str(ckpt_dir))
    return f"{_TENSORSTORE_PROBLEMS[code.group(1)]} {where}"
  return _first_line(error)


def steps_text(steps: Sequence[int]) -> str:
  """'5, 10, 15' (or 'none'), for messages."""
  return ", ".join(str(s) for s in steps) if steps else "none"


def _key_name(entry: Any) -> str:
  """One step of a jax key path as orbax names it: a dict key, a list index or a field name."""
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _flat_leaves(tree: PyTree) -> dict[str, Any]:
  """{'params.encoder.layer_0.kernel': leaf, ...} for every array leaf of a pytree, in order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path): leaf
          for path, leaf in leaves if hasattr(leaf, "shape")}


def flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{'params.encoder.layer_0.kernel': (D, F), ...} for every array leaf of a pytree.

  Works alike for the state (dataclasses, optax's named tuples, including empty ones such as
  the EmptyState of gradient clipping) and for orbax's metadata tree of a saved one (dicts and
  lists, with None where an empty node was)."""
  return {key: tuple(leaf.shape) for key, leaf in _flat_leaves(tree).items()}


def describe_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 3) -> str:
  """A short list of the leaves that differ between two `flat_shapes` results."""
  problems = [f"{k} missing in the checkpoint" for k in wanted if k not in saved]
  problems += [f"{k} not in the model" for k in saved if k not in wanted]
  problems += [f"{k} is {saved[k]} in the checkpoint, {wanted[k]} in the model"
               for k in wanted if k in saved and saved[k] != wanted[k]]
  more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more


def _read_tree_metadata(step_dir: epath.Path, step: int, where: str) -> PyTree:
  """The saved state's tree of ArrayMetadata (shape, dtype), or DamagedCheckpointError."""
  state_dir = step_dir / STATE_ITEM
  if not (state_dir / "_METADATA").exists():
    raise DamagedCheckpointError(step, where, f"missing {STATE_ITEM}/_METADATA")
  try:
    return ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable files.
    raise DamagedCheckpointError(step, where, _damage_reason(e, step_dir)) from e


def _check_data_files(step_dir: epath.Path, step: int, where: str) -> None:
  """The iterator state of this process exists (grain writes process_<i>-of-<n>.json)."""
  index, count = jax.process_index(), jax.process_count()
  expected = step_dir / DATA_ITEM / f"process_{index}-of-{count}.json"
  if expected.exists():
    return
  others = sorted(p.name for p in (step_dir / DATA_ITEM).glob("process_*-of-*.json"))
  saved_counts = {int(name.rsplit("-of-", 1)[1].split(".")[0]) for name in others}
  if saved_counts and count not in saved_counts:
    raise CheckpointError(
        f"the checkpoint at step {step} in {where} holds the data iterator of "
        f"{'/'.join(str(c) for c in sorted(saved_counts))} processes, this run has {count}; "
        "resume with the same number of processes (the device count may change)")
  raise DamagedCheckpointError(step, where, f"missing {DATA_ITEM}/{expected.name}")


def _check_has_shardings(abstract_state: PyTree) -> None:
  missing = [jax.tree_util.keystr(path) for path, leaf
             in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
             if getattr(leaf, "sharding", None) is None]
  if missing:
    raise ValueError(f"abstract_state leaves need a .sharding to restore onto; missing at "
                     f"{', '.join(missing[:3])}; build them as jax.ShapeDtypeStruct(shape, dtype, "
                     "sharding=...) (e.g. jax.eval_shape + the strategy's shardings)")


# --- Checksums. -------------------------------------------------------------------------------
#
# Orbax protects the index of a checkpoint (crc32c) but not the bytes of an array chunk: a
# chunk is zstd-compressed without a checksum, and a few changed bytes in it usually still
# decompress, to wrong numbers. So every save also writes the `checksums` item: two 32-bit
# sums per array (below) and a sha256 of each process's iterator state, which restore checks.

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}  # item size -> same-size unsigned int
# The weight of word i is 2 * i * 0x9E3779B1 + 1 (mod 2^32): odd, so any one changed word
# changes the weighted sum (an odd number times a nonzero difference is nonzero mod 2^32); and
# neighbouring words get weights far apart (0x9E3779B1, a prime near 2^32 / golden ratio, is
# Knuth's multiplicative hash), so that changes in two words rarely cancel out.
_WEIGHT_STEP = np.uint32(2 * 0x9E3779B1 % 2**32)


def _words(x: jax.Array) -> jax.Array:
  """The bits of each element of `x` as one uint32 word, same shape (a typed PRNG key as its
  uint32 key data, [..., 2] for threefry; a bool as one byte)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize not in _UNSIGNED:
    raise TypeError(f"checksums cover dtypes of 1, 2 or 4 bytes, not {x.dtype}")
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the words of `x` and the sum of each word times the weight of its
  row-major position, both modulo 2^32.

  Integer sums modulo 2^32 do not depend on the order of the additions, so the numbers are the
  same however `x` is sharded and over how many devices or hosts: each device sums its part
  and the partial sums are added (an all-reduce of two numbers, no gather). The position comes from
  iotas times strides, which XLA computes shard by shard; reshaping `x` to 1-D instead could
  move the data between devices."""
  words = _words(x)
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    axis_index = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    index += axis_index * np.uint32(stride % 2**32)
    stride *= words.shape[axis]
  weight = index * _WEIGHT_STEP + np.uint32(1)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * weight, dtype=jnp.uint32)])


# One program per shape, dtype and sharding: the layers of a model share a few. (One program
# for the whole state would take longer to compile, and to run on a CPU.)
_device_checksum = jax.jit(_array_checksum)


def _host_checksum(x: np.ndarray) -> list[int]:
  """`_array_checksum` of an array in host memory, by NumPy: the same two numbers."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  if x.dtype.itemsize not in _UNSIGNED:
    raise TypeError(f"checksums cover dtypes of 1, 2 or 4 bytes, not {x.dtype}")
  # Flattening in row-major order gives each word the position the iotas compute.
  words = np.ascontiguousarray(x).reshape(-1).view(f"u{x.dtype.itemsize}").astype(np.uint32)
  weight = np.arange(words.size, dtype=np.uint32) * _WEIGHT_STEP + np.uint32(1)
  return [int(np.sum(words, dtype=np.uint32)), int(np.sum(words * weight, dtype=np.uint32))]


def array_checksums(tree: PyTree) -> dict[str, list[int]]:
  """{flat key: [sum, weighted sum]} of every array leaf of `tree` (keys as `flat_shapes`).

  jax.Arrays are summed where they lie (see `_array_checksum`; every process of a multi-host
  run must call this, as the sums of a global array are collectives), NumPy arrays on the host.
  The numbers depend only on each array's shape, dtype size and bits."""
  sums = {}
  for key, leaf in _flat_leaves(tree).items():
    if isinstance(leaf, jax.Array):
      # Each fetched before the next starts (the sums are replicated: every process has them).
      # Many independent programs with collectives in flight at once can deadlock XLA:CPU's
      # simulated devices, each waiting in another program's all-reduce.
      sums[key] = [int(v) for v in np.asarray(_device_checksum(leaf))]
    else:
      sums[key] = _host_checksum(leaf)
  return sums


def iterator_state_digest(state: Any) -> str:
  """The sha256 (hex) of a grain iterator state as canonical JSON (sorted keys, no spaces).

  A DatasetIterator's state is a dict, a DataLoader iterator's the JSON of one as bytes."""
  if isinstance(state, bytes):
    state = json.loads(state)
  text = json.dumps(state, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _processes_where(flag: bool) -> list[int]:
  """The indices of the processes whose `flag` is true, the same list on every process (a
  collective: every process calls it)."""
  flags = multihost_utils.process_allgather(np.array([flag], np.uint8))
  return [int(i) for i in np.flatnonzero(np.asarray(flags).reshape(-1))]


def _data_digests(data_iterator: Any) -> dict[str, str]:
  """{'0': sha256, ...}: the iterator state digest of every process, on every process (only the
  primary process writes the checksums item, so it needs them all)."""
  own = np.frombuffer(bytes.fromhex(iterator_state_digest(data_iterator.get_state())), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(own)).reshape(-1, own.size)
  return {str(i): row.tobytes().hex() for i, row in enumerate(every)}


def _checksums(arrays: PyTree, data: dict[str, str]) -> dict[str, Any]:
  """The content of the checksums item: arrays by flat key, iterator states by process."""
  return {"format": CHECKSUMS_FORMAT, "arrays": array_checksums(arrays), "data": data}


def _read_checksums(ckpt_dir: epath.Path, label: int | str, where: str) -> dict | None:
  """The checksums saved in `ckpt_dir`, or None for a checkpoint written before they were."""
  directory = ckpt_dir / CHECKSUMS_ITEM
  if not directory.exists():
    return None  # Older code wrote no checksums: such a checkpoint restores unverified.
  try:
    checksums = ocp.JsonCheckpointHandler().restore(directory)
    version, _, _ = checksums["format"], dict(checksums["arrays"]), dict(checksums["data"])
  except Exception as e:  # A missing or mangled file: orbax and json raise many types.
    raise DamagedCheckpointError(label, where, f"unreadable {CHECKSUMS_ITEM}: "
                                                f"{_damage_reason(e, ckpt_dir)}") from e
  if version != CHECKSUMS_FORMAT:
    raise CheckpointError(f"the checkpoint {label} in {where} has checksums of format "
                          f"{version}, this jaxformer reads format {CHECKSUMS_FORMAT}; use "
                          "the jaxformer version that wrote it")
  return checksums


def _mismatch(names: list[str]) -> str:
  more = f", and {len(names) - 1} more" if len(names) > 1 else ""
  return f"{names[0]} does not match its checksum{more}"


def _verify_arrays(tree: PyTree, checksums: dict, label: int | str, where: str) -> None:
  """DamagedCheckpointError naming the first leaf of `tree` (restored from the checkpoint
  `label`) whose checksum is not the one saved (the same outcome on every process)."""
  saved = checksums["arrays"]
  bad = [key for key, sums in array_checksums(tree).items() if saved.get(key) != sums]
  if bad:
    raise DamagedCheckpointError(label, where, _mismatch(bad))


def _verify_data_state(step_dir: epath.Path, checksums: dict, step: int, where: str) -> None:
  """DamagedCheckpointError on every process when the iterator state file of any process does
  not match its digest.

  The digest is checked on the content of the file grain will read (parsed, then canonical
  JSON), before grain reads it: a state damaged but still valid JSON would otherwise resume
  the data at a wrong position. It does not depend on how grain formats the file, nor on the
  restored iterator's get_state() giving back exactly what was set."""
  index, count = jax.process_index(), jax.process_count()
  path = step_dir / DATA_ITEM / f"process_{index}-of-{count}.json"
  try:
    intact = iterator_state_digest(json.loads(path.read_text())) == checksums["data"].get(
        str(index))
  except ValueError:  # Not JSON (or not UTF-8) any more.
    intact = False
  bad = _processes_where(not intact)  # Every process falls back, or none does.
  if bad:
    raise DamagedCheckpointError(step, where, _mismatch(
        [f"{DATA_ITEM}/process_{i}-of-{count}.json" for i in bad]))


class Checkpointer:
  """Saves and restores the train state and the data iterator of a run, together, by step.

  A thin layer over `orbax.checkpoint.CheckpointManager` in `<workdir>/checkpoints`:

  - saves are asynchronous: `save` copies the arrays off the devices and returns; the files
    are written in the background and a step directory appears only once complete (orbax
    writes `<step>.orbax-checkpoint-tmp` and renames it). Call `wait()` before exiting.
  - a step is saved when `step % every_steps == 0`, or when orbax reached a multi-host
    preemption sync point, or with `force=True` (at the end of training, on preemption).
  - the `keep` newest steps are kept; with `keep_best` (a key of BEST_MODE: 'loss', 'accuracy'
    or 'bleu'; config.validate checks the value) the best step by that validation metric
    (passed to `save` as `metrics`) is kept as well.
  - every process calls every method (orbax synchronizes the processes); each saves the
    arrays it holds and its own iterator state.
  - each step holds the checksums of its arrays and iterator states (`checksums/`), checked
    by `restore`: damage orbax does not notice is reported as such (DamagedCheckpointError).

  Use it as a context manager, or call `close()`.
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int, keep_best: str = "",
               async_save: bool = True):
    workdir = workdir_lib.absolute_workdir(workdir)
    self.workdir = workdir
    self.directory = _checkpoints_dir(workdir)
    self.keep_best = keep_best
    preserve = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = _best_fn(keep_best)
      absl_logger = logging.getLogger("absl")
      if not any(isinstance(f, _NoUnscoredSaveWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_NoUnscoredSaveWarning())
      preserve.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=BEST_MODE[keep_best] == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve),
        best_fn=best_fn,  # Makes orbax record the metrics of each step beside it.
        best_mode=BEST_MODE.get(keep_best, "max"),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=(STATE_ITEM, DATA_ITEM, CHECKSUMS_ITEM),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                       CHECKSUMS_ITEM: ocp.JsonCheckpointHandler()},
        options=options,
    )

  @classmethod
  def from_config(cls, workdir: str, config: ml_collections.ConfigDict,
                  async_save: bool = True) -> "Checkpointer":
    """A Checkpointer with the run's `checkpoint.*` settings."""
    c = config.checkpoint
    return cls(workdir, every_steps=c.every_steps, keep=c.keep, keep_best=c.keep_best,
               async_save=async_save)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # Steps.

  def all_steps(self) -> list[int]:
    """The finished (complete, renamed) steps on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def unfinished_saves(self) -> list[str]:
    """Directories left by saves that never finished (the process died while writing)."""
    return sorted(str(p.get()) for p in ocp.utils.tmp_checkpoints(self.directory))

  # Saving.

  def save(self, step: int, state: PyTree, data_iterator: Any,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Saves `state` and the iterator's position at `step` if this step is due (or `force`).

    Call it after every train step with the state reached after `step` updates; it returns
    at once when nothing is due. `metrics` (validation metrics of this step) are recorded when
    `keep_best` is set. Returns whether a save started; a step already on disk is not saved
    again (returns False). The arrays are copied before this returns, so `state` may be
    donated to the next train step; the files are written in the background.

    Beside them goes the checksum of every array and of each process's iterator state (the
    `checksums` item, in the same orbax step: it appears with the step, never without it),
    computed on the devices where the arrays lie; `restore` checks them.

    Under `pmap`, save the unreplicated state (one copy, e.g. `jax.tree.map(lambda x: x[0],
    state)`) so the checkpoint does not depend on the device count.
    """
    step = int(step)
    # Decided here, not by orbax's save, so that the checksums are computed only when due.
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    tracked = None
    if self.keep_best and metrics is not None and self.keep_best in metrics:
      tracked = {self.keep_best: float(metrics[self.keep_best])}
    checksums = _checksums(state, _data_digests(data_iterator))
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
            CHECKSUMS_ITEM: ocp.args.JsonSave(checksums),
        }),
        metrics=tracked,
        force=True,
    )

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would save now: every `every_steps`, or at a
    multi-host preemption sync point, unless the step is on disk already.

    Call it at every step on every process (it takes part in the hosts' agreement on
    preemption); it lets the caller prepare the state to save (e.g. copy it to the host) only
    when a save is due, then `save(..., force=True)`.
    """
    step = int(step)
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then releases orbax's threads."""
    self._manager.close()

  # Restoring.

  def restore(self, step: int, abstract_state: PyTree, data_iterator: Any) -> PyTree:
    """The train state saved at `step`, and the iterator set to continue after it.

    `abstract_state` has the structure of the state (e.g. the TrainState dataclass) with a
    `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` per leaf; each array is read straight
    onto that sharding, whatever devices and strategy saved it. `data_iterator` (a fresh grain
    iterator of the same pipeline) is set to the saved position: its next batch is the one the
    saved run would have taken next.

    Every array read and this process's iterator state are checked against the checksums
    saved with them (a checkpoint written before checksums existed is restored unverified).

    Raises CheckpointError when `step` does not exist (listing the steps that do) or does not
    match the model's shapes, DamagedCheckpointError when its files cannot be read or what
    they hold does not match its checksums (on every process alike).
    """
    _check_has_shardings(abstract_state)
    step = int(step)
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; available "
                            f"steps: {steps_text(steps)}")
    step_dir = epath.Path(self.directory) / str(step)
    saved = flat_shapes(_read_tree_metadata(step_dir, step, self.directory))
    wanted = flat_shapes(abstract_state)
    if saved != wanted:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not fit this model: "
          f"{describe_mismatch(saved, wanted)}; use the config it was trained with")
    _check_data_files(step_dir, step, self.directory)
    checksums = _read_checksums(step_dir, step, self.directory)
    if checksums is not None:  # Before grain sets the iterator to a damaged position.
      _verify_data_state(step_dir, checksums, step, self.directory)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator),
      }))
    except Exception as e:  # A file that vanished or was cut short: see _read_tree_metadata.
      raise DamagedCheckpointError(step, self.directory, _damage_reason(e, step_dir)) from e
    if checksums is not None:
      _verify_arrays(restored[STATE_ITEM], checksums, step, self.directory)
    return restored[STATE_ITEM]

  def restore_or_none(self, abstract_state: PyTree, data_iterator: Any,
                      restore_step: int | None = None) -> tuple[PyTree, int] | None:
    """Resumes a run: (state, step) from the newest intact checkpoint, or None when none exist.

    A newest checkpoint that is damaged (missing or truncated files, arrays or iterator state
    that do not match their checksums) is reported on stderr,
    as `checkpoint at step N in DIR is damaged (...); falling back to step M (...)`, moved to
    `<workdir>/damaged/N` (kept, not deleted, and out of the way of the step being saved
    again) and the next older one is tried. Directories of saves that never finished are
    reported and left to orbax, which replaces them when that step is saved again.

    With `restore_step`, restores exactly that step (CheckpointError listing the available
    steps when it does not exist or is damaged); the newer steps are moved to
    `<workdir>/superseded/` (kept, and out of the way of this run's saves of those steps).
    Raises CheckpointError when every checkpoint is damaged (they are all moved aside, so
    running again starts from scratch).
    """
    for unfinished in self.unfinished_saves():
      log(f"ignoring {unfinished}: a save that never finished (the run stopped while "
          "writing it)", all_processes=True)
    steps = self.all_steps()
    if restore_step is not None:
      try:
        restored = self.restore(restore_step, abstract_state, data_iterator)
      except DamagedCheckpointError as e:
        raise CheckpointError(f"{e}; available steps: {steps_text(steps)}; choose another "
                              "with --restore-step") from None
      newer = [s for s in steps if s > int(restore_step)]
      if newer:  # This run saves those steps again; the old ones must not stand in the way.
        moved = [self._move_aside(s, workdir_lib.SUPERSEDED_DIR) for s in newer]
        log(f"restoring step {restore_step}: the newer checkpoints ({steps_text(newer)}) "
            f"are kept in {os.path.dirname(moved[0])}, out of this run's way", all_processes=True)
      return restored, int(restore_step)
    while steps:
      step = steps.pop()
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except DamagedCheckpointError as e:
        kept = f"the damaged one is kept in {self._move_aside(step)}"
        if not steps:
          raise CheckpointError(f"{e}, and no older checkpoint is left ({kept}); run again to "
                                "train from the start") from None
        log(f"{e}; falling back to step {steps[-1]} ({kept})", all_processes=True)
    return None

  def _move_aside(self, step: int, folder: str = workdir_lib.DAMAGED_DIR) -> str:
    """Moves a step out of the manager's directory to `<workdir>/<folder>/<step>`; returns
    where (process 0 moves).

    Orbax would otherwise count it among the steps to keep, and a later save of that step
    would find it in the way (and be skipped)."""
    target_root = workdir_lib.path(self.workdir, folder)
    target = target_root / str(step)
    n = 1
    while target.exists():
      target = target_root / f"{step}.{n}"
      n += 1
    if jax.process_index() == 0:
      target_root.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxformer_checkpoint_moved_{step}")
    self._manager.reload()
    return str(target)


# --- The steps of a workdir, and their parameters. --------------------------------------------

def _checkpoints_dir(workdir: str) -> str:
  return str(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR))


def saved_steps(workdir: str) -> list[int]:
  """The finished steps in `<workdir>/checkpoints`, oldest first (none when it is missing)."""
  return sorted(ocp.utils.checkpoint_steps(_checkpoints_dir(workdir)))


def available(workdir: str) -> str:
  """'available steps: 20, 30, 40; averaged: last2_30-40', for messages."""
  text = f"available steps: {steps_text(saved_steps(workdir))}"
  averaged = averaged_checkpoints(workdir)
  if averaged:
    text += f"; averaged: {', '.join(averaged)}"
  return text


def averaged_checkpoints(workdir: str) -> list[str]:
  """Names of the averaged checkpoints in `<workdir>/averaged`, e.g. ['last5_1000-5000']."""
  root = workdir_lib.path(workdir, workdir_lib.AVERAGED_DIR)
  if not root.is_dir():
    return []
  return sorted((p.name for p in root.iterdir() if _AVERAGED_NAME.match(p.name)),
                key=lambda n: tuple(int(g) for g in _AVERAGED_NAME.match(n).groups()))


def _read_only_manager(workdir: str, keep_best: str) -> ocp.CheckpointManager:
  """An orbax manager of `<workdir>/checkpoints` that writes nothing (no saves, no deletions, no
  directories, no root metadata) and ranks the steps as the run's Checkpointer did."""
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0, save_root_metadata=False,
      enable_async_checkpointing=False, best_fn=_best_fn(keep_best),
      best_mode=BEST_MODE[keep_best])
  with absl_warnings_off():  # It warns that it is read-only.
    return ocp.CheckpointManager(_checkpoints_dir(workdir), options=options)


def best_step(workdir: str) -> int:
  """The best step that `checkpoint.keep_best` of the run in `workdir` kept.

  The metric and whether larger is better come from the run's config.json; the value of each
  step from the metrics orbax recorded beside it (only a step evaluated when it was saved has
  any). Of the saved steps that have it, the best (on a tie, the newest). Nothing in the
  workdir is written. CheckpointError, saying what to do instead, when the run kept no best
  step: no config.json, `checkpoint.keep_best` unset, or no saved step with that metric.
  """
  config = workdir_lib.read_run_config(workdir)
  instead = f"choose a step with --step N ({available(workdir)})"
  if config is None:
    raise CheckpointError(f"--step {BEST}: {workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)}"
                          f" is missing, so which metric ranks the steps is unknown; {instead}")
  keep_best = config.checkpoint.keep_best
  if not keep_best:
    raise CheckpointError(
        f"--step {BEST}: the run in {workdir} kept no best checkpoint (checkpoint.keep_best "
        f"is not set; train with --config.checkpoint.keep_best=loss, accuracy or bleu to keep "
        f"one); {instead}")
  manager = _read_only_manager(workdir, keep_best)
  try:
    step = manager.best_step()
    recorded = manager.metrics(step) if step is not None else None
  finally:
    manager.close()
  if step is None or keep_best not in (recorded or {}):
    raise CheckpointError(
        f"--step {BEST}: no saved step of the run in {workdir} has a validation {keep_best} "
        f"(checkpoint.keep_best={keep_best!r} ranks only the steps saved where the run "
        f"evaluated: make train.eval_every_steps a multiple of checkpoint.every_steps so that "
        f"each is saved); {instead}")
  return int(step)


def checkpoint_dir(workdir: str, step: int | str | None) -> tuple[epath.Path, int | str]:
  """The directory of a step (newest when None) or of an averaged checkpoint, and its label.

  `step` is a saved step (int, or its digits as a string), None for the newest, 'best' for
  `best_step`, or the name of an averaged checkpoint (e.g. 'last5_1000-5000', also accepted
  as 'averaged/last5_1000-5000'); the label is that int (the step 'best' names) or name.
  CheckpointError, listing what exists, when there is none.
  """
  steps = saved_steps(workdir)
  if isinstance(step, str) and step.isdigit():
    step = int(step)
  if step is None or step == BEST:
    if not steps:
      averaged = averaged_checkpoints(workdir)
      hint = (f"; averaged checkpoints: {', '.join(averaged)}" if averaged
              else "; train first (jaxformer train --workdir ...)")
      raise CheckpointError(f"no checkpoints in {_checkpoints_dir(workdir)}{hint}")
    step = steps[-1] if step is None else best_step(workdir)
  if isinstance(step, str):
    name = step.removeprefix(workdir_lib.AVERAGED_DIR + "/").rstrip("/")
    path = workdir_lib.path(workdir, workdir_lib.AVERAGED_DIR, name)
    if not _AVERAGED_NAME.match(name) or not path.is_dir():
      raise CheckpointError(f"no averaged checkpoint {step!r} in {workdir}; {available(workdir)}")
    return path, name
  if step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} in {workdir}; {available(workdir)}")
  return workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR, str(step)), int(step)


def saved_param_shapes(ckpt_dir: epath.Path, label: int | str, where: str
                       ) -> dict[str, tuple[int, ...]]:
  """{'encoder.layers_0...kernel': (D, F), ...}: the shape of every parameter saved in
  `ckpt_dir`, read from its metadata (no array is read), keyed as `flat_shapes` of the params.

  To compare with a model before `restore_params` reads it onto that model's shardings.
  CheckpointError when it holds no parameters, DamagedCheckpointError when its metadata cannot
  be read (`label` and `where` as in `restore_params`)."""
  tree = _read_tree_metadata(ckpt_dir, label, where)
  if PARAMS_KEY not in tree:
    raise CheckpointError(f"the checkpoint {label} in {where} holds no {PARAMS_KEY!r}")
  return flat_shapes(tree[PARAMS_KEY])


def restore_params(ckpt_dir: epath.Path, label: int | str, where: str,
                   sharding: Any = None) -> PyTree:
  """Reads only `params` of the state in `ckpt_dir` (no optimizer state).

  The arrays land on `sharding`: one `jax.sharding.Sharding` for every leaf, or a pytree of
  them shaped like the params, whatever devices and strategy saved them; with None they are
  read into host memory as NumPy arrays. `label` (the step or the averaged checkpoint's name)
  and `where` (the workdir) name the checkpoint in errors: CheckpointError when it holds no
  parameters, DamagedCheckpointError when its files cannot be read or the parameters read do
  not match the checksums saved with them (unverified when the checkpoint has none: written
  by older code).
  """
  tree = _read_tree_metadata(ckpt_dir, label, where)
  checksums = _read_checksums(ckpt_dir, label, where)
  if PARAMS_KEY not in tree:
    raise CheckpointError(f"the checkpoint {label} in {where} holds no {PARAMS_KEY!r}")
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[PARAMS_KEY])
  if sharding is None:
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
  else:
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, shapes)
    shapes = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes, sharding)
    restore_args = ocp.checkpoint_utils.construct_restore_args(shapes)
  try:
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        ckpt_dir / STATE_ITEM,
        args=ocp.args.PyTreeRestore(item={PARAMS_KEY: shapes},
                                    restore_args={PARAMS_KEY: restore_args},
                                    partial_restore=True))
  except Exception as e:  # Unreadable files: see _read_tree_metadata.
    raise DamagedCheckpointError(label, where, _damage_reason(e, ckpt_dir)) from e
  if checksums is not None:
    _verify_arrays({PARAMS_KEY: restored[PARAMS_KEY]}, checksums, label, where)
  return restored[PARAMS_KEY]


# --- Averaged parameters. ---------------------------------------------------------------------

def averaged_path(workdir: str, steps: Sequence[int]) -> epath.Path:
  """Where the average of `steps` (oldest first) goes: `<workdir>/averaged/last<K>_<first>-<last>`
  (e.g. `last5_1000-5000`: the 5 newest steps, 1000 to 5000), the name `checkpoint_dir` takes."""
  name = f"last{len(steps)}_{steps[0]}-{steps[-1]}"
  return workdir_lib.path(workdir, workdir_lib.AVERAGED_DIR, name)


def save_averaged(out: epath.Path, params: PyTree, steps: Sequence[int], source: str) -> None:
  """Writes `params` to `out` with the layout of a training checkpoint's parameters (read by
  `restore_params`), plus `info/` naming the averaged `steps` and their `source` directory,
  and `checksums/` (checked by `restore_params` as a training checkpoint's are).
  Written atomically by orbax (a half-written average never appears)."""
  save_params(out, params, {"averaged_steps": list(steps), "source": source})


def save_params(out: epath.Path, params: PyTree, info: dict[str, Any]) -> None:
  """Writes parameters alone (no optimizer state, no data position) to `out`, with the layout
  of a training checkpoint's parameters (read by `restore_params`), `info/` (JSON saying where
  they come from) and `checksums/`: an averaged checkpoint, or the step 0 of an imported
  model, which translate, evaluate, export and fine-tuning (--init-from) read. Atomic."""
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(out, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.PyTreeSave({PARAMS_KEY: params}),
      INFO_ITEM: ocp.args.JsonSave(info),
      CHECKSUMS_ITEM: ocp.args.JsonSave(_checksums({PARAMS_KEY: params}, data={})),
  }))
