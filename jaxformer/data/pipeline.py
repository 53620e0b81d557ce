"""The grain input pipelines: training batches (shuffled, repeated, packed, sharded by host,
checkpointable) and evaluation batches (every example exactly once).

Training, for process p of P:

  pairs of the train split                      sources.get_split
  -> global shuffle, a new order every epoch    (same seed on every process)
  -> dealt out in blocks of B / P pairs         this process's shard: block p of every P
  -> tokenize, append EOS                       {'inputs': [S], 'targets': [T]}
  -> length policy                              drop or truncate pairs over data.max_len
  -> first-fit packing, or padding              rows of data.max_len tokens
  -> batch                                      [B, data.max_len] per key, B = batch / P

Each batch is a dict of int32 arrays `[B, L]` (L = data.max_len):

  inputs, targets                      token ids; each pair ends with EOS, padding is PAD_ID.
                                       Targets are not shifted: the model puts BOS in front.
  inputs_segment_ids, targets_...      1, 2, ... for the pairs packed into a row, 0 on padding.
  inputs_positions, targets_...        0, 1, ... restarting with every pair, 0 on padding.

Without packing each row holds one pair (segment id 1). The iterator is a grain
`DatasetIterator`: `get_state()` / `set_state()` make a resumed run see exactly the batches it
would have seen. A background thread prepares the next PREFETCH_BATCHES batches while the
devices compute; `get_state()` still describes the position after the last batch handed out by
`next()`, not after the last one prepared.
"""

from __future__ import annotations

import atexit
import logging
import math
import weakref
from typing import Any, Iterator

import grain
import jax
import numpy as np

from jaxformer.data import sources
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.errors import ConfigError, DataError
from jaxformer.tokens import EOS_ID, PAD_ID

FEATURES = ("inputs", "targets")  # source and target token ids, in that order.
READ_THREADS = 4          # threads that read and tokenize pairs ahead of the packer.
READ_BUFFER = 64          # pairs read ahead (grain scans this buffer per element: keep small).
PREFETCH_BATCHES = 2      # finished training batches prepared ahead by a background thread.

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is outside 0..{count - 1}")
  return index, count


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows each process loads: the global batch split evenly over the processes."""
  if global_batch_size % process_count:
    raise ConfigError(f"train.batch_size={global_batch_size} does not divide by the "
                      f"{process_count} processes; make it a multiple of {process_count}")
  return global_batch_size // process_count


# --- Per-pair steps. -------------------------------------------------------------------------

def tokenize(tokenizer: Tokenizer, pair: dict[str, str]) -> dict[str, np.ndarray]:
  """{'source', 'target'} text -> {'inputs': [S], 'targets': [T]} int32 ids, each ending in EOS."""
  inputs, targets = tokenizer.encode(pair["source"]), tokenizer.encode_target(pair["target"])
  return {feature: np.asarray(ids + [EOS_ID], np.int32)
          for feature, ids in zip(FEATURES, (inputs, targets))}


def truncate(ids: np.ndarray, max_len: int) -> np.ndarray:
  """The first max_len - 1 ids and EOS, so a truncated sequence still ends like any other."""
  if len(ids) <= max_len:
    return ids
  return np.concatenate([ids[:max_len - 1], np.asarray([EOS_ID], ids.dtype)])


class LengthPolicy:
  """Drops ('drop') or truncates ('truncate') pairs whose source or target is over max_len.

  Counts them and says so, never silently: the count once when the first pass over the data is
  complete (`report`), and, for data whose pass may take hours, a warning at the first
  over-long pair. Runs in the iterator's own order (an IterDataset step, or a MapDataset read
  without threads), so the count of a pass is exact.

  Args:
    max_len: the longest sequence kept as it is, EOS included.
    policy: 'drop' or 'truncate'.
    what: names the data in messages, e.g. "train split on process 0 of 2".
    warn_first: also warn at the first over-long pair.
  """

  def __init__(self, max_len: int, policy: str, what: str, warn_first: bool = True):
    self.max_len = max_len
    self.policy = policy
    self.what = what
    self.warn_first = warn_first
    self.count = 0        # over-long pairs of the first pass.
    self.total = 0        # pairs of the first pass.
    self.first_epoch = None  # the epoch of the first pair seen (> 0 in a resumed run).
    self.reported = False

  def over_long(self, example: dict[str, Any]) -> bool:
    return any(len(example[f]) > self.max_len for f in FEATURES)

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    """Counts `example`; truncates it under 'truncate', marks it `keep=False` under 'drop'."""
    epoch = example.get("epoch", 0)
    if self.first_epoch is None:
      self.first_epoch = epoch
    if epoch != self.first_epoch and not self.reported:
      self.report()
    too_long = self.over_long(example)
    if not self.reported:
      self.total += 1
      self.count += too_long
      if too_long and self.count == 1 and self.warn_first:
        log.warning("%s: a pair is longer than data.max_len=%d tokens (source %d, target %d, "
                    "EOS included); pairs like it are %s (data.length_policy=%r)", self.what,
                    self.max_len, len(example["inputs"]), len(example["targets"]),
                    "dropped" if self.policy == "drop" else "truncated", self.policy)
    if too_long and self.policy == "truncate":
      example = {**example, **{f: truncate(example[f], self.max_len) for f in FEATURES}}
    return {**example, "keep": not (too_long and self.policy == "drop")}

  def report(self) -> None:
    """Logs the count of over-long pairs of the first pass (once). DataError if every pair was
    dropped (training would wait forever for a batch)."""
    if self.reported:
      return
    self.reported = True
    if self.policy == "drop" and self.total and self.count == self.total:
      raise DataError(f"{self.what}: all {self.total} pairs are longer than data.max_len="
                      f"{self.max_len} tokens and were dropped; raise data.max_len or set "
                      "data.length_policy=truncate")
    if self.count:
      log.warning("%s: %d of %d pairs read were longer than data.max_len=%d and were %s", self.what,
                  self.count, self.total, self.max_len,
                  "dropped" if self.policy == "drop" else "truncated")


def pad_row(example: dict[str, Any], max_len: int) -> Batch:
  """One pair per row: ids padded with PAD_ID to max_len, segment id 1, positions 0..len-1."""
  row = {}
  for f in FEATURES:
    ids = example[f]
    n = len(ids)
    row[f] = np.full(max_len, PAD_ID, np.int32)
    row[f][:n] = ids
    row[f"{f}_segment_ids"] = (np.arange(max_len) < n).astype(np.int32)
    row[f"{f}_positions"] = np.where(np.arange(max_len) < n, np.arange(max_len), 0
                                     ).astype(np.int32)
  return row


def only_features(example: dict[str, Any]) -> dict[str, np.ndarray]:
  return {f: example[f] for f in FEATURES}


# --- Training. -------------------------------------------------------------------------------

def train_shard(source, seed: int, process_index: int, process_count: int,
                block_size: int = 1) -> grain.MapDataset:
  """This process's endless share of the pairs: {'source', 'target', 'epoch'}.

  All processes shuffle the split the same way (a new order every epoch) and deal that order
  out in blocks of `block_size` pairs, in turn: process p takes block p of every
  `process_count` consecutive blocks. Two processes, blocks of 2:

      global order   a b | c d | e f | g h | ...
      process 0      a b           e f
      process 1            c d           g h

  The shards are disjoint and together hold every pair exactly once per epoch.

  Why blocks: the training pipeline deals blocks of one batch (B / P rows), so process p's k-th
  batch is rows [p * B / P, (p + 1) * B / P) of the k-th batch a single process would read
  (without packing, when no pair is dropped), and the strategies put process p's rows at
  exactly those rows of the global batch (see jaxformer/train/parallel.py). A run on P
  processes then trains on the same global batches, row for row, as a run on one: the same
  dropout masks meet the same pairs, and the parameters agree to rounding. (Dealing single
  pairs, every P-th, would give the same pairs in another row order.) With packing each
  process packs its own pairs, so the rows differ, but each pair is still used once per epoch.
  """
  num_pairs = len(source)
  order = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  pairs_per_round = block_size * process_count  # one block for each process.

  def position(i: int) -> int:
    """Where the i-th pair of this shard is in the global order."""
    return ((i // block_size) * pairs_per_round + process_index * block_size
            + i % block_size)

  return grain.MapDataset.range(len(order) // process_count).map(
      lambda i: {**order[position(i)], "epoch": position(i) // num_pairs})


def make_train_iterator(config, tokenizer: Tokenizer, data_dir: str, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """The endless iterator of this process's training batches (see the module docstring).

  Returns:
    a grain DatasetIterator of dicts of int32 `[train.batch_size // process_count,
    data.max_len]` arrays; `get_state()` / `set_state()` save and restore its position.
  """
  index, count = _processes(process_index, process_count)
  batch_size = per_host_batch_size(config.train.batch_size, count)
  max_len = config.data.max_len
  source = sources.get_split(config, "train", data_dir)
  policy = LengthPolicy(max_len, config.data.length_policy,
                        f"train split on process {index} of {count}")

  ds = train_shard(source, sources.shuffle_seed(config), index, count,
                   block_size=batch_size)
  ds = ds.map(lambda pair: {**tokenize(tokenizer, pair), "epoch": pair["epoch"]})
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                            prefetch_buffer_size=READ_BUFFER))
  ds = ds.map(policy).filter(lambda example: example["keep"]).map(only_features)
  ds = to_rows(ds, max_len, packing=config.data.packing, num_packing_bins=batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  # Batches are made in a background thread, so the loop's next() returns at once instead of
  # running the whole pipeline (the measured wait: benchmarks/RESULTS.md).
  return PrefetchIterator(iter(ds), PREFETCH_BATCHES)


def to_rows(ds: grain.IterDataset, max_len: int, *, packing: bool, num_packing_bins: int
            ) -> grain.IterDataset:
  """Pairs {'inputs', 'targets'} (each at most max_len ids) -> rows of max_len tokens.

  Packing is grain's first-fit packing: each pair goes into the first of `num_packing_bins`
  rows with room for both its sides; when a pair fits in none, the rows are emitted and a new
  set begins. A pair never crosses a row boundary. Without packing, one pair per row.
  """
  if not packing:
    return ds.map(lambda example: pad_row(example, max_len))
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={f: max_len for f in FEATURES}, num_packing_bins=num_packing_bins,
      shuffle_bins=False)


class PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
  """grain's thread prefetcher: a background thread keeps `buffer_size` batches ready.

  With each batch it keeps the parent's state after that batch, and `get_state()` returns the
  state of the last batch `next()` handed out, so a checkpoint never skips the batches still
  waiting in the buffer. Two additions: the iterator is closed by an atexit hook (a grain
  iterator alive at exit would otherwise close itself while Python tears its modules down, and
  print an error), and closing it twice is harmless.
  """

  def __init__(self, parent: grain.DatasetIterator, buffer_size: int):
    self._closed_once = False  # Set first: grain's __del__ calls close() even if init fails.
    super().__init__(parent, buffer_size)
    _OPEN_ITERATORS.add(self)

  def close(self) -> None:
    if not self._closed_once:  # grain's close() is not idempotent; __del__ calls it again.
      self._closed_once = True
      super().close()


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # PrefetchIterators not yet collected.


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_OPEN_ITERATORS):
    iterator.close()


# --- Evaluation. -----------------------------------------------------------------------------

def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields for a split: enough for the largest shard."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) / batch_size))


def filler_row(max_len: int) -> Batch:
  """An all-PAD row (segment ids 0) for the empty places of the last batches."""
  row = pad_row({f: np.zeros(0, np.int32) for f in FEATURES}, max_len)
  row["example_ids"] = np.int32(-1)
  return row


def make_eval_batches(config, tokenizer: Tokenizer, data_dir: str, split: str, *,
                      batch_size: int, process_index: int | None = None,
                      process_count: int | None = None, max_examples: int | None = None
                      ) -> Iterator[Batch]:
  """This process's batches of one split: each example of the split exactly once overall.

  Process p takes examples p, p + P, p + 2P, ... Every process yields the same number of
  batches (so collective operations in multi-host evaluation line up); places left over in the
  last batches are filler rows, all PAD with `example_ids` -1. Over-long examples are truncated
  (and counted), never dropped, so metrics cover the whole split. With `max_examples`, only the
  first that many examples of the split are taken (the batch count, the same on every process,
  is that of a split of that size).

  Yields:
    dicts of int32 arrays: the six `[batch_size, data.max_len]` arrays of the training batches
    (one pair per row, never packed) and `example_ids` `[batch_size]`, the index of the row's
    example in the split (see `eval_references`), -1 for filler rows.
  """
  index, count = _processes(process_index, process_count)
  max_len = config.data.max_len
  source = sources.get_split(config, split, data_dir)
  policy = LengthPolicy(max_len, "truncate", f"{split} split on process {index} of {count}",
                        warn_first=False)

  def example(i: int) -> Batch:
    row = pad_row(policy(tokenize(tokenizer, source[i])), max_len)
    row["example_ids"] = np.int32(i)
    return row

  num_examples = len(source) if max_examples is None else min(max_examples, len(source))
  ds = grain.MapDataset.range(index, num_examples, count).map(example)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))  # policy counts in order.
  ds = ds.batch(batch_size, batch_fn=lambda rows: _stack(rows, batch_size, max_len))
  batches = iter(ds)
  try:
    for _ in range(num_eval_batches(num_examples, batch_size, count)):
      yield next(batches, None) or _stack([], batch_size, max_len)
  finally:  # Also when the caller stops early: the count then covers what it read.
    policy.report()


def _stack(rows: list[Batch], batch_size: int, max_len: int) -> Batch:
  """Stacks rows into a batch, filling it up to batch_size with filler rows."""
  rows = list(rows) + [filler_row(max_len)] * (batch_size - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def eval_references(config, data_dir: str, split: str, max_examples: int | None = None
                    ) -> list[tuple[str, str]]:
  """(source text, target text) of every example of a split (of the first `max_examples`),
  indexed by `example_ids`."""
  source = sources.get_split(config, split, data_dir)
  count = len(source) if max_examples is None else min(max_examples, len(source))
  return [(pair["source"], pair["target"]) for pair in (source[i] for i in range(count))]
