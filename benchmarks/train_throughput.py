"""Training throughput and MFU, decoding speed, and the input pipeline, as tables.

For each model (random parameters; synthetic rows in which every position is a real token):

- FLOPs of one training step, and per target token (forward + backward, attention included;
  the closed form of jaxformer/train/throughput.py);
- the device's peak: the best FLOP/s of a large square matmul in the compute dtype;
- the train step run through the strategy that training uses
  (`jaxformer.train.parallel.make_strategy`: state donated, batch sharded over every device):
  compile time (the first call minus the best step), step time (best and median of the timed
  steps), target tokens/s, MFU = model FLOP/s / (peak x devices), and peak memory (the
  device's allocator statistics where the platform keeps them, else the process's max RSS);
  the timed steps run under `jax.transfer_guard("disallow")` (a host-device copy inside the
  step would raise) and the donated state must really be consumed;
- decoding: sentences/s for greedy search and beam 4, `--decode-batch` sentences (32) of 16
  source tokens, each decoded to `--decode-tokens` (32) new tokens (EOS disabled, so every
  hypothesis runs to the full length).

For the default experiment's real data (jaxformer/data/pipeline.py): batches/s of
`make_train_iterator` alone, packing efficiency (the share of non-pad tokens in the rows), and
the data wait that the training loop (jaxformer.train.loop) logs over a short real run, as a
share of wall time.

Each model runs in a subprocess of its own, so compile times start cold and peak memory is the
model's alone. Timings on a shared machine are noisy: the table reports the best step (and the
median) and the best of the peak matmuls measured before and after that model's steps. On CPU
it adds a "CPU-time MFU": the step's FLOPs per second of this process's CPU time over the same
ratio for the matmul. Other processes on the machine barely move it, and on an idle machine it
is an upper bound of the wall-clock MFU (equal when the step keeps every core as busy as the
matmul does).

  python benchmarks/train_throughput.py                     # default, d256, base, big
  python benchmarks/train_throughput.py --quick             # default and d256, fewer steps
  python benchmarks/train_throughput.py --models base --scan --remat dots --dtype bfloat16
  python benchmarks/train_throughput.py --models base --batch 8 --no-decode --no-pipeline
  python benchmarks/train_throughput.py --models base --scan --layers 12 --steps 1 --no-decode
  python benchmarks/train_throughput.py --json              # one JSON object instead
  python benchmarks/train_throughput.py --models d256 --trace /tmp/trace   # + top ops

Models: 'default' (experiments/default.py: N=2, D=128, batch 64 x 32/32 tokens), 'd256' (the
same with D=256, F=1024, N=3: 3 encoder + 3 decoder layers), 'base' and 'big' (the paper's, from
experiments/wmt14_en_de_*.py, vocabulary 37000, batch 16 x 64/64 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.profiler import ProfileData

from jaxformer import config as config_lib
from jaxformer import decode
from jaxformer import workdir as workdir_lib
from jaxformer.data import pipeline, sources, tokenizer as tokenizer_lib
from jaxformer.data import vocab
from jaxformer.tokens import EOS_ID
from jaxformer.train import loop, parallel, state as state_lib, throughput

SOURCE_LEN = 16          # source tokens of a decoded sentence, EOS included.
ALPHA = 0.6              # length penalty of beam search (the paper's).
NO_EOS = -1              # an eos_id no token has: every hypothesis runs to the full length.
FIRST_REAL_ID = 4        # synthetic tokens avoid PAD, UNK, BOS and EOS.
PEAK_MATMUL_SIZE = {"cpu": 2048}  # square matmul for the peak; 8192 on accelerators.
ACCELERATOR_MATMUL_SIZE = 8192
PEAK_ROUNDS = 5          # timed rounds of the peak matmul (the best counts).
DONATION_WARNING = "donated buffers were not usable"
TRACE_STEPS = 3          # steps recorded by --trace.
TOP_OPS = 15             # ops listed from a trace.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmarked model: an experiment file, model changes, and the batch it trains on."""
  experiment: str
  model: dict
  batch: int
  length: int
  steps: int        # timed steps (--quick takes fewer).
  about: str


MODELS = {
    "default": ModelSpec("default", {}, 64, 32, 10, "experiments/default.py"),
    "d256": ModelSpec("default", dict(d_model=256, num_layers=3, num_heads=4, d_ff=1024),
                      64, 32, 10, "default with D=256, F=1024, 3+3 layers"),
    "base": ModelSpec("wmt14_en_de_base", {}, 16, 64, 5, "the paper's base model"),
    "big": ModelSpec("wmt14_en_de_big", {}, 16, 64, 3, "the paper's big model"),
}
QUICK_MODELS = ("default", "d256")


# --- Settings and configs. --------------------------------------------------------------------

def make_config(name: str, settings: dict):
  """The run config of model `name` with the benchmark's overrides (dtype, scan, remat, batch)."""
  spec = MODELS[name]
  config = config_lib.load_experiment(spec.experiment)
  config.model.update(spec.model)
  config.model.dtype = settings["dtype"]
  config.model.scan_layers = settings["scan"]
  config.model.remat = settings["remat"]
  if settings["layers"]:
    config.model.num_layers = settings["layers"]
  config.train.batch_size = settings["batch"] or spec.batch
  config.data.max_len = spec.length
  config.parallel.strategy = settings["strategy"]
  config_lib.validate(config)
  return config


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


# --- Measurements (run in the child process). ---------------------------------------------------

def matmul_peak(dtype: str) -> tuple[float, float]:
  """The best FLOP/s of a square matmul in `dtype` on the first device, over PEAK_ROUNDS: by
  wall time, and per second of this process's CPU time (see CPU-time MFU in the docstring)."""
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


def peak_memory() -> tuple[int, str]:
  """(bytes, what): the device allocator's peak where it has one, else the process's max RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak"
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024, "process max RSS"
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def time_steps(step: Callable[[], Any], steps: int) -> tuple[list[float], float]:
  """Wall seconds of each of `steps` calls of `step` (each waited for), and the process CPU
  seconds per call over all of them."""
  times = []
  start_cpu = time.process_time()
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return times, (time.process_time() - start_cpu) / steps


def measure_training(name: str, settings: dict) -> dict:
  """Compile time, step times, tokens/s, MFU and peak memory of model `name`'s train step."""
  config = make_config(name, settings)
  spec = MODELS[name]
  steps = settings["steps"] or (3 if settings["quick"] else spec.steps)
  peaks = [matmul_peak(config.model.dtype)]

  strategy = parallel.make_strategy(config)
  state = strategy.init_state(jax.random.key(0))
  batch = strategy.shard_batch(synthetic_rows(config, strategy.host_batch_size))
  old_leaf = jax.tree.leaves(state)[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    start = time.perf_counter()
    state, metrics = strategy.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - start
  donation_warnings = [str(w.message) for w in caught if DONATION_WARNING in str(w.message)]
  donated = old_leaf.is_deleted()  # The step consumed (reused) the old state's buffers.

  def one_step():
    nonlocal state
    state, step_metrics = strategy.train_step(state, batch)
    return state, step_metrics

  one_step()  # A second untimed step: some runtimes finish setting up on it.
  with jax.transfer_guard("disallow"):  # Any host<->device copy inside the step raises.
    times, cpu_seconds = time_steps(one_step, steps)
  peaks.append(matmul_peak(config.model.dtype))
  memory, memory_kind = peak_memory()
  if settings["trace"]:
    trace = trace_steps(one_step, os.path.join(settings["trace"], name))
  else:
    trace = None

  step_flops = throughput.train_step_flops(config)
  target_tokens = config.train.batch_size * config.data.max_len
  best, median = min(times), statistics.median(times)
  peak = settings["peak_flops"] or max(wall for wall, _ in peaks)
  cpu_peak = max(cpu for _, cpu in peaks)
  devices = jax.device_count()
  result = dict(
      model=name, about=spec.about, dtype=config.model.dtype, scan=config.model.scan_layers,
      remat=config.model.remat, layers=config.model.num_layers,
      strategy=config.parallel.strategy, devices=devices,
      batch=config.train.batch_size, length=config.data.max_len,
      parameters=state_lib.count_parameters_by_module(config)["total"],
      step_flops=step_flops, flops_per_token=step_flops / target_tokens,
      compile_seconds=first - best, step_seconds=best, median_step_seconds=median,
      step_times=times, tokens_per_second=target_tokens / best,
      peak_flops=peak, peak_flops_measured=[wall for wall, _ in peaks],
      mfu=step_flops / best / (peak * devices),
      median_mfu=step_flops / median / (peak * devices),
      cpu_seconds_per_step=cpu_seconds, cpu_peak_flops=cpu_peak,
      cpu_time_mfu=step_flops / cpu_seconds / cpu_peak,
      peak_memory_bytes=memory, peak_memory_kind=memory_kind,
      donated=bool(donated), donation_warnings=donation_warnings,
      loss=float(metrics["loss"]), device=device_info())
  if trace is not None:
    result["trace"] = trace
  if settings["decode"]:
    result["decode"] = measure_decoding(config, strategy.inference_params(state), settings)
  return result


def measure_decoding(config, params, settings: dict) -> list[dict]:
  """Sentences/s of greedy search and beam 4 over `settings['decode_batch']` sentences."""
  model = state_lib.make_model(config)
  batch, new_tokens = settings["decode_batch"], settings["decode_tokens"]
  rng = np.random.default_rng(0)
  inputs = rng.integers(FIRST_REAL_ID, config.model.vocab_size, (batch, SOURCE_LEN),
                        dtype=np.int32)
  inputs[:, -1] = EOS_ID
  rows = []
  for beam_size in (1, config.decode.beam_size):
    def run():
      return decode.decode_batch(model, params, inputs, beam_size=beam_size, alpha=ALPHA,
                                 max_extra_len=new_tokens - SOURCE_LEN, eos_id=NO_EOS)
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    first = time.perf_counter() - start
    times, _ = time_steps(run, settings["decode_repeats"])
    lengths = np.asarray(result.lengths[:, 0])
    assert (lengths == new_tokens).all(), lengths  # Every sentence decoded in full.
    seconds = statistics.median(times)
    rows.append(dict(search="greedy" if beam_size == 1 else f"beam {beam_size}", batch=batch,
                     new_tokens=new_tokens, seconds=seconds, best_seconds=min(times),
                     compile_seconds=first - seconds, sentences_per_second=batch / seconds,
                     tokens_per_second=batch * new_tokens / seconds))
  return rows


def measure_pipeline(settings: dict) -> dict:
  """The default experiment's input pipeline: its own speed and packing, and the data wait that
  the training loop (jaxformer.train.loop) logs over a short real run."""
  config = make_config("default", settings)
  workdir = settings["workdir"]
  tokenizer = vocab.load_or_train(config, workdir)
  data_dir = workdir_lib.resolve_data_dir(config, workdir)
  batches = 10 if settings["quick"] else 40

  # 1. The iterator alone, consumed as fast as it produces.
  iterator = pipeline.make_train_iterator(config, tokenizer, data_dir)
  start = time.perf_counter()
  next(iterator)
  startup = time.perf_counter() - start
  real = {"inputs": 0, "targets": 0}
  slots = 0
  start = time.perf_counter()
  for _ in range(batches):
    rows = next(iterator)
    for key in real:
      real[key] += int(np.count_nonzero(rows[key]))
    slots += rows["targets"].size
  alone = (time.perf_counter() - start) / batches
  iterator.close()

  # 2. The training loop itself, two logging windows of `batches` steps, in a fresh run
  #    directory beside the data (its vocabulary copied in); the second window is steady.
  run_dir = tempfile.mkdtemp(prefix="loop-", dir=workdir)
  shutil.copy(os.path.join(workdir, workdir_lib.VOCAB_FILE), run_dir)
  config.data.data_dir = data_dir
  config.train.steps = 2 * batches
  config.train.log_every_steps = batches
  config.train.eval_every_steps = config.checkpoint.every_steps = 10 * batches
  config.train.peak_flops = 1.0  # MFU is measured above, not here: skip the loop's matmul.
  loop.train_and_evaluate(ml_collections.FrozenConfigDict(config), run_dir)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  steady = [m for m in logged if m["split"] == "train"][-1]
  return dict(batch=config.train.batch_size, length=config.data.max_len,
              batches_timed=batches, startup_seconds=startup,
              seconds_per_batch=alone, batches_per_second=1 / alone,
              packing_efficiency=(real["inputs"] + real["targets"]) / (2 * slots),
              inputs_efficiency=real["inputs"] / slots,
              targets_efficiency=real["targets"] / slots,
              loop_step_seconds=steady["step_time"],
              loop_tokens_per_second=steady["tokens_per_second"],
              loop_packing_efficiency=steady.get("packing_efficiency", float("nan")),
              data_wait_fraction=steady["data_wait_fraction"], run_dir=run_dir)


# --- Profiles. --------------------------------------------------------------------------------

# Events that contain other events (whole executions, waits) or mark points, not ops.
CONTAINER_EVENT = re.compile(r"ThunkExecutor|Await|PjitFunction|block_until_ready|Execute|"
                             r"^\$|XLA Ops|Steps|TraceContext|ThreadpoolListener|^end: |"
                             r"^Wait for")


def trace_steps(step: Callable[[], Any], log_dir: str) -> dict:
  """Records TRACE_STEPS steps with jax.profiler and summarises the time per op (per step)."""
  with jax.profiler.trace(log_dir):
    for _ in range(TRACE_STEPS):
      jax.block_until_ready(step())
  return summarize_trace(log_dir, TRACE_STEPS)


def summarize_trace(log_dir: str, steps: int) -> dict:
  """The ops of a jax.profiler trace by time per step, and by kind (name sans number).

  Device planes ('/device:...') when the trace has them (GPU, TPU); else the host's XLA
  compute threads (CPU). Two accounts of each op:
  - busy: its events' durations, summed over threads (what the op costs);
  - wall: each instant of the trace split evenly between the ops running at that instant, so
    the ops' wall times add up to the time the step spent running any op (what the step waits
    for; XLA:CPU runs independent ops concurrently, which the busy account counts twice).
  """
  path = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:
    planes = [p for p in data.planes if p.name.startswith("/host:")]
  events = []  # (start ns, end ns, op name)
  for plane in planes:
    for line in plane.lines:
      if line.name == "python" or "PjRtCpuClient" in line.name:
        continue
      events += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                 if not CONTAINER_EVENT.search(e.name)]
  busy: dict[str, float] = {}
  for start, end, name in events:
    busy[name] = busy.get(name, 0.0) + (end - start) / 1e6 / steps
  wall = wall_time_by_op(events, steps)
  kind = lambda op: re.sub(r"\.\d+$", "", op)  # noqa: E731
  busy_by_kind: dict[str, float] = {}
  wall_by_kind: dict[str, float] = {}
  for op in busy:
    busy_by_kind[kind(op)] = busy_by_kind.get(kind(op), 0.0) + busy[op]
    wall_by_kind[kind(op)] = wall_by_kind.get(kind(op), 0.0) + wall.get(op, 0.0)
  busy_total, wall_total = sum(busy.values()), sum(wall.values())
  top_kinds = [dict(name=k, ms_per_step=v, share=v / busy_total,
                    wall_ms_per_step=wall_by_kind[k], wall_share=wall_by_kind[k] / wall_total)
               for k, v in sorted(busy_by_kind.items(), key=lambda kv: -kv[1])[:TOP_OPS]]
  top_ops = [dict(name=k, ms_per_step=v, share=v / busy_total, wall_ms_per_step=wall[k])
             for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:TOP_OPS]]
  return dict(path=path, busy_ms_per_step=busy_total, wall_ms_per_step=wall_total,
              top_ops=top_ops, top_kinds=top_kinds)


def wall_time_by_op(events: list[tuple[int, int, str]], steps: int) -> dict[str, float]:
  """Ms per step of wall time of each op: every instant shared evenly by the ops running then."""
  edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(events)]
                 + [(end, -1, i) for i, (_, end, _) in enumerate(events)])
  wall: dict[str, float] = {}
  running: set[int] = set()
  last = edges[0][0] if edges else 0
  for time_ns, change, i in edges:
    for j in running:
      name = events[j][2]
      wall[name] = wall.get(name, 0.0) + (time_ns - last) / len(running) / 1e6 / steps
    last = time_ns
    if change > 0:
      running.add(i)
    else:
      running.discard(i)
  return wall


# --- The parent: one subprocess per model, then the tables. ----------------------------------

def run_child(task: str, settings: dict) -> dict:
  """Runs `task` (a model name or 'pipeline') in a fresh Python process; returns its result."""
  command = [sys.executable, os.path.abspath(__file__), "--child", task,
             "--settings", json.dumps(settings)]
  done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
  if done.returncode:
    return dict(model=task, error=f"exit status {done.returncode} (see stderr above)")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run_task(task: str, settings: dict) -> dict:
  if task == "pipeline":
    return measure_pipeline(settings)
  return measure_training(task, settings)


def device_info() -> dict:
  device = jax.devices()[0]
  return dict(platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              jax_version=jax.__version__)


def cpu_mfu(result: dict, device: dict) -> str:
  """The CPU-time MFU as text, on CPU only (elsewhere the host's CPU time means nothing)."""
  return f"{result['cpu_time_mfu']:.1%}" if device["platform"] == "cpu" else "-"


def gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def print_tables(report: dict) -> None:
  d = report["device"] or dict(device_count="?", device_kind="?", platform="?",
                               cpu_count=os.cpu_count(), jax_version="?")
  print(f"Device: {d['device_count']} x {d['device_kind']} ({d['platform']}), "
        f"{d['cpu_count']} CPU cores, jax {d['jax_version']}; {report['date']}")
  print("Train step (best of the timed steps; MFU = model FLOP/s / (best matmul peak x devices))")
  header = (f"{'model':<8} {'N':>2} {'params':>7} {'dtype':<8} {'scan':<5} {'remat':<5} "
            f"{'batch':>8} "
            f"{'GFLOP/step':>10} {'MFLOP/tok':>9} {'compile s':>9} {'step s':>8} "
            f"{'median s':>8} {'tokens/s':>9} {'peak GFLOP/s':>12} {'MFU':>6} {'med MFU':>7} "
            f"{'CPU MFU':>7} {'memory':>10}")
  print(header)
  print("-" * len(header))
  for r in report["train"]:
    if "error" in r:
      print(f"{r['model']:<8} failed: {r['error']}")
      continue
    print(f"{r['model']:<8} {r['layers']:>2} {r['parameters'] / 1e6:>6.1f}M {r['dtype']:<8} "
          f"{'on' if r['scan'] else 'off':<5} {r['remat']:<5} "
          f"{str(r['batch']) + 'x' + str(r['length']):>8} {r['step_flops'] / 1e9:>10.1f} "
          f"{r['flops_per_token'] / 1e6:>9.1f} {r['compile_seconds']:>9.1f} "
          f"{r['step_seconds']:>8.3f} {r['median_step_seconds']:>8.3f} "
          f"{r['tokens_per_second']:>9.0f} {r['peak_flops'] / 1e9:>12.1f} {r['mfu']:>6.1%} "
          f"{r['median_mfu']:>7.1%} {cpu_mfu(r, d):>7} {gib(r['peak_memory_bytes']):>10}")
  notes = []
  for r in report["train"]:
    if "error" in r:
      continue
    if r["donation_warnings"] or not r["donated"]:
      notes.append(f"{r['model']}: the state was not donated ({r['donation_warnings']})")
  kinds = {r["peak_memory_kind"] for r in report["train"] if "peak_memory_kind" in r}
  print(f"memory: {', '.join(sorted(kinds))}; tokens/s counts target tokens; "
        "state donated and no host-device copy in any step" if not notes else "; ".join(notes))

  decode_rows = [(r["model"], row) for r in report["train"] for row in r.get("decode", [])]
  if decode_rows:
    print()
    print("Decoding (random parameters, EOS disabled; median of the timed runs)")
    header = (f"{'model':<8} {'search':<7} {'batch':>5} {'new tokens':>10} {'seconds':>8} "
              f"{'sentences/s':>11} {'tokens/s':>9} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for model, row in decode_rows:
      print(f"{model:<8} {row['search']:<7} {row['batch']:>5} {row['new_tokens']:>10} "
            f"{row['seconds']:>8.3f} {row['sentences_per_second']:>11.1f} "
            f"{row['tokens_per_second']:>9.0f} {row['compile_seconds']:>9.1f}")

  p = report.get("pipeline")
  if p:
    print()
    if "error" in p:
      print(f"Input pipeline failed: {p['error']}")
    else:
      print(f"Input pipeline (default experiment, batch {p['batch']} x {p['length']}, "
            f"{p['batches_timed']} batches)")
      print(f"  make_train_iterator alone: {p['batches_per_second']:.1f} batches/s "
            f"({p['seconds_per_batch'] * 1e3:.1f} ms/batch; first batch after "
            f"{p['startup_seconds']:.1f} s)")
      print(f"  packing efficiency (non-pad share): {p['packing_efficiency']:.1%} "
            f"(inputs {p['inputs_efficiency']:.1%}, targets {p['targets_efficiency']:.1%})")
      default = next((r for r in report["train"] if r.get("model") == "default"
                      and "step_seconds" in r), None)
      versus = (f" (the benchmark's step on a batch already on the device: "
                f"{default['median_step_seconds'] * 1e3:.1f} ms median)" if default else "")
      print(f"  training loop (jaxformer.train.loop, steady window): "
            f"{p['loop_step_seconds'] * 1e3:.1f} ms/step{versus}; data wait "
            f"{p['data_wait_fraction']:.1%} of wall time; logged packing efficiency "
            f"{p['loop_packing_efficiency']:.1%}")

  for r in report["train"]:
    if "trace" in r:
      print()
      t = r["trace"]
      print(f"Top ops of {r['model']}: busy = summed over compute threads "
            f"({t['busy_ms_per_step']:.0f} ms per step), wall = each instant split between the "
            f"ops running then ({t['wall_ms_per_step']:.0f} ms per step); {t['path']}")
      print(f"  {'busy ms':>9} {'share':>6} {'wall ms':>9} {'share':>6}  op kind")
      for row in t["top_kinds"]:
        print(f"  {row['ms_per_step']:9.1f} {row['share']:6.1%} {row['wall_ms_per_step']:9.1f} "
              f"{row['wall_share']:6.1%}  {row['name']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=None,
                      help=f"comma-separated, from {', '.join(MODELS)} (default: all; "
                           f"--quick: {', '.join(QUICK_MODELS)})")
  parser.add_argument("--quick", action="store_true",
                      help="the small models, 3 timed steps, 10 pipeline batches")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="model.dtype, the compute dtype (parameters stay float32)")
  parser.add_argument("--scan", action="store_true", help="model.scan_layers=True")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                      help="model.remat")
  parser.add_argument("--layers", type=int, default=0,
                      help="model.num_layers for every model (default: the model's own), e.g. "
                           "to see that --scan compiles in the same time at any depth")
  parser.add_argument("--batch", type=int, default=0,
                      help="rows per step for every model (default: the model's own)")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (default per model)")
  parser.add_argument("--strategy", default="mesh", choices=("mesh", "pmap"))
  parser.add_argument("--peak-flops", type=float, default=0.0,
                      help="peak FLOP/s per device for MFU (default: measure a matmul)")
  parser.add_argument("--no-decode", dest="decode", action="store_false")
  parser.add_argument("--decode-batch", type=int, default=32)
  parser.add_argument("--decode-tokens", type=int, default=32, help="new tokens per sentence")
  parser.add_argument("--decode-repeats", type=int, default=3)
  parser.add_argument("--no-pipeline", dest="pipeline", action="store_false")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "jaxformer_benchmark"),
                      help="where the default experiment's vocabulary and data are made")
  parser.add_argument("--trace", default="",
                      help="directory: record a jax.profiler trace of each model's steps and "
                           "list its top ops")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--settings", default="", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(run_task(args.child, json.loads(args.settings))))
    return 0
  models = args.models.split(",") if args.models else list(
      QUICK_MODELS if args.quick else MODELS)
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
  if args.decode_tokens <= SOURCE_LEN:
    raise SystemExit(f"--decode-tokens must exceed the {SOURCE_LEN} source tokens")
  settings = dict(dtype=args.dtype, scan=args.scan, remat=args.remat, layers=args.layers,
                  batch=args.batch,
                  steps=args.steps, strategy=args.strategy, peak_flops=args.peak_flops,
                  quick=args.quick, decode=args.decode, decode_batch=args.decode_batch,
                  decode_tokens=args.decode_tokens,
                  decode_repeats=1 if args.quick else args.decode_repeats,
                  workdir=args.workdir, trace=args.trace)
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  # The parent never touches a device (on a GPU it would hold memory the children need).
  report = dict(date=time.strftime("%Y-%m-%d %H:%M"), settings=settings, train=[])
  for name in models:
    log(f"train_throughput: {name} ...")
    report["train"].append(run_child(name, settings))
  report["device"] = next((r.pop("device") for r in report["train"] if "device" in r), None)
  for r in report["train"]:
    r.pop("device", None)
  if args.pipeline:
    log("train_throughput: input pipeline ...")
    report["pipeline"] = run_child("pipeline", settings)
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    print_tables(report)
  return 0


if __name__ == "__main__":
  with contextlib.suppress(BrokenPipeError):
    sys.exit(main())
