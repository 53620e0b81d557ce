"""What the benchmarks share: timing compiled calls, the peak matmul, random inputs, real runs.

- `time_first`, `time_calls`, `time_call`: wall seconds of calls of a compiled function, each
  waited for (`jax.block_until_ready`). The first call compiles; a `Timing` reports the best
  and the median of the timed calls after it, and the compile time as the first call minus
  the best one (the best call is the one least disturbed by the rest of the machine).
- `matmul_peak`: the best FLOP/s of a large square matmul, the denominator of MFU.
- `random_sources`, `synthetic_rows`: random real tokens (never a special id) for decoding and
  for training.
- `prepare_data`, `train_fresh_run`: a real run of the training loop in a fresh run directory
  beside a vocabulary and datasets made once (shared by every run of a benchmark).
- `print_report`: the report as one JSON object, or as the benchmark's tables.

The benchmarks import it as a sibling (`import common`): `python benchmarks/NAME.py` puts the
benchmarks' folder first on sys.path.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer import workdir as workdir_lib
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.data import vocab
from jaxformer.tokens import EOS_ID
from jaxformer.train import loop

FIRST_REAL_ID = EOS_ID + 1  # random tokens avoid PAD, UNK, BOS and EOS.
PEAK_MATMUL_SIZE = {"cpu": 2048}  # square matmul for the peak; 8192 on accelerators.
ACCELERATOR_MATMUL_SIZE = 8192
PEAK_ROUNDS = 5  # timed rounds of the peak matmul (the best counts).


# --- Timing. ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall seconds of a first (compiling) call and of the timed calls after it."""
  first: float
  times: list[float]
  cpu_seconds: float  # this process's CPU seconds per timed call.

  @property
  def best(self) -> float:
    return min(self.times)

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def compile_seconds(self) -> float:
    return self.first - self.best


def time_first(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Wall seconds of one call of `fn` (waited for), and its result."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def time_calls(fn: Callable[[], Any], calls: int) -> tuple[list[float], float]:
  """Wall seconds of each of `calls` calls of `fn` (each waited for), and the process CPU
  seconds per call over all of them."""
  times = []
  start_cpu = time.process_time()
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times, (time.process_time() - start_cpu) / calls


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[Timing, Any]:
  """The first call of `fn` and `repeats` timed calls after it; the first call's result."""
  first, result = time_first(fn)
  times, cpu_seconds = time_calls(fn, repeats)
  return Timing(first, times, cpu_seconds), result


def matmul_peak(dtype: str) -> tuple[float, float]:
  """The best FLOP/s of a square matmul in `dtype` on the first device, over PEAK_ROUNDS: by
  wall time, and per second of this process's CPU time (train_throughput's CPU-time MFU).

  Not jaxformer.train.throughput.measure_peak_flops, which times all its calls together: on a
  shared machine the benchmark takes the best round, counts CPU time as well, and uses the
  large matmul an accelerator needs to reach its peak.
  """
  platform = jax.devices()[0].platform
  size = PEAK_MATMUL_SIZE.get(platform, ACCELERATOR_MATMUL_SIZE)
  calls = 1 if platform == "cpu" else 10  # several calls per round amortise the launch.
  x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best_wall, best_cpu = float("inf"), float("inf")
  for _ in range(PEAK_ROUNDS):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
      y = matmul(x)
    y.block_until_ready()
    best_wall = min(best_wall, (time.perf_counter() - start) / calls)
    best_cpu = min(best_cpu, (time.process_time() - start_cpu) / calls)
  flop = 2 * size ** 3
  return flop / best_wall, flop / best_cpu


# --- Random inputs. -----------------------------------------------------------------------------

def random_sources(batch: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  """[batch, length] random real tokens, EOS last: sentences to decode."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(FIRST_REAL_ID, vocab_size, size=(batch, length), dtype=np.int32)
  ids[:, -1] = EOS_ID
  return ids


def synthetic_rows(config, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`rows` training rows of data.max_len random real tokens each (one pair per row, no pad)."""
  length = config.data.max_len
  rng = np.random.default_rng(seed)
  positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
  ones = np.ones((rows, length), np.int32)
  return {"inputs": rng.integers(FIRST_REAL_ID, config.model.vocab_size, (rows, length),
                                 dtype=np.int32),
          "targets": rng.integers(FIRST_REAL_ID, config.model.vocab_size, (rows, length),
                                  dtype=np.int32),
          "inputs_positions": positions, "targets_positions": positions.copy(),
          "inputs_segment_ids": ones, "targets_segment_ids": ones.copy()}


def packed_rows(config, rows: int, lengths: tuple[int, int], seed: int = 0
                ) -> dict[str, np.ndarray]:
  """`rows` training rows of data.max_len tokens, each packed with random pairs whose sides
  are `lengths` (min, max) tokens long, EOS last, until the next pair does not fit; the rest
  is padding. Segment ids number the pairs from 1, positions restart at 0 in each."""
  length = config.data.max_len
  rng = np.random.default_rng(seed)
  out = {key: np.zeros((rows, length), np.int32) for key in
         ("inputs", "targets", "inputs_positions", "targets_positions", "inputs_segment_ids",
          "targets_segment_ids")}
  for row in range(rows):
    used = {"inputs": 0, "targets": 0}
    for segment in itertools.count(1):
      sizes = {side: int(rng.integers(lengths[0], lengths[1] + 1)) for side in used}
      if any(used[side] + sizes[side] > length for side in used):
        break
      for side, size in sizes.items():
        span = slice(used[side], used[side] + size)
        out[side][row, span] = rng.integers(FIRST_REAL_ID, config.model.vocab_size, size)
        out[side][row, span.stop - 1] = EOS_ID
        out[f"{side}_positions"][row, span] = np.arange(size)
        out[f"{side}_segment_ids"][row, span] = segment
        used[side] += size
  return out


# --- Real runs of the training loop. ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run of the training loop."""
  run_dir: str
  seconds: float  # wall seconds of the training loop itself.
  validation: dict[str, Any]  # the last validation metrics it returned.
  train_metrics: list[dict[str, Any]]  # the train lines of its metrics.jsonl, in order.


def prepare_data(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """The vocabulary and datasets of `config` in `workdir`, made there the first time only;
  points `config.data.data_dir` at them so that every run reads the same data."""
  tokenizer = vocab.load_or_train(config, workdir)
  config.data.data_dir = workdir_lib.resolve_data_dir(config, workdir)
  return tokenizer


def train_fresh_run(config, workdir: str, prefix: str) -> Run:
  """Trains `config` with the training loop itself in a new run directory under `workdir`,
  whose vocabulary (made by `prepare_data`) it copies in. Sets `train.peak_flops`: MFU is not
  what these runs measure, and a configured peak skips the loop's own matmul."""
  config.train.peak_flops = 1.0
  run_dir = tempfile.mkdtemp(prefix=prefix, dir=workdir)
  shutil.copy(os.path.join(workdir, workdir_lib.VOCAB_FILE), run_dir)
  start = time.perf_counter()
  validation = loop.train_and_evaluate(ml_collections.FrozenConfigDict(config), run_dir).metrics
  seconds = time.perf_counter() - start
  with open(os.path.join(run_dir, workdir_lib.METRICS_FILE)) as f:
    train_metrics = [m for m in map(json.loads, f) if m["split"] == "train"]
  return Run(run_dir, seconds, validation, train_metrics)


def print_report(report: dict, as_json: bool, print_tables: Callable[[dict], None]) -> None:
  """The report as one JSON object on stdout, or as `print_tables` prints it."""
  if as_json:
    print(json.dumps(report, indent=2))
  else:
    print_tables(report)
