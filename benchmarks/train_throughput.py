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
  hypothesis runs to the full length), timed by benchmarks/decode_throughput.py's
  `time_decoding`;
- with `--trace`, the top ops of a jax.profiler trace of the steps (benchmarks/trace_summary.py).

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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

from jaxformer import config as config_lib
from jaxformer import decode
from jaxformer.data import pipeline
from jaxformer.train import jax_internals, parallel, state as state_lib, throughput

import common
import decode_throughput
import trace_summary

DONATION_WARNING = "donated buffers were not usable"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmarked model: an experiment file, model changes, and the batch it trains on."""
  experiment: str
  model: dict
  batch: int
  length: int
  steps: int        # timed steps (--quick takes fewer).
  about: str


D256 = dict(d_model=256, num_layers=3, num_heads=4, d_ff=1024)
MODELS = {
    "default": ModelSpec("default", {}, 64, 32, 10, "experiments/default.py"),
    "d256": ModelSpec("default", D256, 64, 32, 10, "default with D=256, F=1024, 3+3 layers"),
    # The peers' workloads (../shared/peers/torch_peers.py), at their vocabularies.
    "small": ModelSpec("default", dict(D256, vocab_size=8000), 64, 32, 10,
                       "the peers' small: d256 with V=8000"),
    "base32k": ModelSpec("wmt14_en_de_base", dict(vocab_size=32000), 16, 64, 5,
                         "the peers' base: the paper's base with V=32000"),
    # Long packed rows: pairs of 10-60 tokens a side packed into rows of 128.
    "packed": ModelSpec("default", dict(D256, vocab_size=8000, max_len=128), 36, 128, 8,
                        "small at 36 packed rows of 128 (pairs of 10-60 tokens)"),
    "base": ModelSpec("wmt14_en_de_base", {}, 16, 64, 5, "the paper's base model"),
    "big": ModelSpec("wmt14_en_de_big", {}, 16, 64, 3, "the paper's big model"),
}
QUICK_MODELS = ("default", "d256")
# The models whose synthetic rows are packed pairs, and the pairs' length range (each side).
PACKED_MODELS = {"packed": (10, 60)}


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


# --- Measurements (run in the child process). ---------------------------------------------------

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


def first_step(strategy, state, batch) -> tuple[float, object, dict, dict]:
  """The first (compiling) train step: its wall seconds, the new state, its metrics, and
  whether the state was donated (the step consumed the old state's buffers, with no warning)."""
  old_leaf = jax.tree.leaves(state)[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, (state, metrics) = common.time_first(lambda: strategy.train_step(state, batch))
  donation = dict(donated=bool(old_leaf.is_deleted()),
                  donation_warnings=[str(w.message) for w in caught
                                     if DONATION_WARNING in str(w.message)])
  return first, state, metrics, donation


def step_figures(config, timing: common.Timing, peaks: list[tuple[float, float]],
                 settings: dict, target_tokens: int) -> dict:
  """The train step's settings, FLOPs, times, tokens/s (real target tokens: packed rows have
  padding) and MFU (by wall and by CPU time)."""
  step_flops = throughput.train_step_flops(config)
  best, median = timing.best, timing.median
  peak = settings["peak_flops"] or max(wall for wall, _ in peaks)
  cpu_peak = max(cpu for _, cpu in peaks)
  devices = jax.device_count()
  return dict(
      dtype=config.model.dtype, scan=config.model.scan_layers,
      remat=config.model.remat, layers=config.model.num_layers,
      strategy=config.parallel.strategy, devices=devices,
      batch=config.train.batch_size, length=config.data.max_len,
      parameters=state_lib.count_parameters_by_module(config)["total"],
      step_flops=step_flops, flops_per_token=step_flops / target_tokens,
      target_tokens=target_tokens,
      compile_seconds=timing.compile_seconds, step_seconds=best, median_step_seconds=median,
      step_times=timing.times, tokens_per_second=target_tokens / best,
      median_tokens_per_second=target_tokens / median,  # the peers report medians
      peak_flops=peak, peak_flops_measured=[wall for wall, _ in peaks],
      mfu=step_flops / best / (peak * devices),
      median_mfu=step_flops / median / (peak * devices),
      cpu_seconds_per_step=timing.cpu_seconds, cpu_peak_flops=cpu_peak,
      cpu_time_mfu=step_flops / timing.cpu_seconds / cpu_peak)


def measure_training(name: str, settings: dict) -> dict:
  """Compile time, step times, tokens/s, MFU and peak memory of model `name`'s train step."""
  config = make_config(name, settings)
  spec = MODELS[name]
  steps = settings["steps"] or (3 if settings["quick"] else spec.steps)
  peaks = [common.matmul_peak(config.model.dtype)]

  strategy = parallel.make_strategy(config)
  state = strategy.init_state(jax.random.key(0))
  if name in PACKED_MODELS:
    rows = common.packed_rows(config, strategy.host_batch_size, PACKED_MODELS[name])
  else:
    rows = common.synthetic_rows(config, strategy.host_batch_size)
  target_tokens = int(np.count_nonzero(rows["targets"]))
  batch = strategy.shard_batch(rows)
  first, state, metrics, donation = first_step(strategy, state, batch)

  def one_step():
    nonlocal state
    state, step_metrics = strategy.train_step(state, batch)
    return state, step_metrics

  one_step()  # A second untimed step: some runtimes finish setting up on it.
  with jax.transfer_guard("disallow"):  # Any host<->device copy inside the step raises.
    times, cpu_seconds = common.time_calls(one_step, steps)
  peaks.append(common.matmul_peak(config.model.dtype))
  memory, memory_kind = peak_memory()
  timing = common.Timing(first, times, cpu_seconds)
  result = dict(model=name, about=spec.about,
                **step_figures(config, timing, peaks, settings, target_tokens),
                peak_memory_bytes=memory, peak_memory_kind=memory_kind, **donation,
                loss=float(metrics["loss"]), device=device_info())
  if settings["trace"]:
    result["trace"] = trace_summary.trace_steps(one_step, os.path.join(settings["trace"], name))
  if settings["decode"]:
    result["decode"] = measure_decoding(config, strategy.inference_params(state), settings)
  return result


def measure_decoding(config, params, settings: dict) -> list[dict]:
  """Sentences/s of greedy search and beam search (the experiment's beam) over
  `settings['decode_batch']` sentences, timed as benchmarks/decode_throughput.py times them."""
  model = state_lib.make_model(config)
  batch, new_tokens = settings["decode_batch"], settings["decode_tokens"]
  inputs = common.random_sources(batch, decode_throughput.SOURCE_LEN, config.model.vocab_size)
  rows = []
  for beam_size in (1, config.decode.beam_size):
    timing = decode_throughput.time_decoding(decode.decode_batch, model, params, inputs,
                                             beam_size, new_tokens, settings["decode_repeats"])
    seconds = timing.median
    rows.append(dict(search=decode_throughput.search_name(beam_size), batch=batch,
                     new_tokens=new_tokens, seconds=seconds, best_seconds=timing.best,
                     compile_seconds=timing.first - seconds,  # decoding: first call minus the median
                     sentences_per_second=batch / seconds,
                     tokens_per_second=batch * new_tokens / seconds))
  return rows


def iterator_figures(config, tokenizer, batches: int) -> dict:
  """`make_train_iterator` alone, consumed as fast as it produces: its first batch, its speed
  and its packing efficiency over `batches` batches."""
  iterator = pipeline.make_train_iterator(config, tokenizer, config.data.data_dir)
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
  return dict(startup_seconds=startup, seconds_per_batch=alone, batches_per_second=1 / alone,
              packing_efficiency=(real["inputs"] + real["targets"]) / (2 * slots),
              inputs_efficiency=real["inputs"] / slots,
              targets_efficiency=real["targets"] / slots)


def measure_pipeline(settings: dict) -> dict:
  """The default experiment's input pipeline: its own speed and packing, and the data wait that
  the training loop (jaxformer.train.loop) logs over a short real run."""
  config = make_config("default", settings)
  tokenizer = common.prepare_data(config, settings["workdir"])
  batches = 10 if settings["quick"] else 40
  alone = iterator_figures(config, tokenizer, batches)
  # The training loop itself, two logging windows of `batches` steps; the second is steady.
  config.train.steps = 2 * batches
  config.train.log_every_steps = batches
  config.train.eval_every_steps = config.checkpoint.every_steps = 10 * batches
  run = common.train_fresh_run(config, settings["workdir"], prefix="loop-")
  steady = run.train_metrics[-1]
  return dict(batch=config.train.batch_size, length=config.data.max_len,
              batches_timed=batches, **alone,
              loop_step_seconds=steady["step_time"],
              loop_tokens_per_second=steady["tokens_per_second"],
              loop_packing_efficiency=steady.get("packing_efficiency", float("nan")),
              data_wait_fraction=steady["data_wait_fraction"], run_dir=run.run_dir)


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
  print_train_table(report["train"], d)
  print_decode_table(report["train"])
  if report.get("pipeline"):
    print_pipeline(report["pipeline"], report["train"])
  print_traces(report["train"])


def print_train_table(results: list[dict], device: dict) -> None:
  print("Train step (best of the timed steps; MFU = model FLOP/s / (best matmul peak x devices))")
  header = (f"{'model':<8} {'N':>2} {'params':>7} {'dtype':<8} {'scan':<5} {'remat':<5} "
            f"{'batch':>8} "
            f"{'GFLOP/step':>10} {'MFLOP/tok':>9} {'compile s':>9} {'step s':>8} "
            f"{'median s':>8} {'tokens/s':>9} {'peak GFLOP/s':>12} {'MFU':>6} {'med MFU':>7} "
            f"{'CPU MFU':>7} {'memory':>10}")
  print(header)
  print("-" * len(header))
  for r in results:
    if "error" in r:
      print(f"{r['model']:<8} failed: {r['error']}")
      continue
    print(f"{r['model']:<8} {r['layers']:>2} {r['parameters'] / 1e6:>6.1f}M {r['dtype']:<8} "
          f"{'on' if r['scan'] else 'off':<5} {r['remat']:<5} "
          f"{str(r['batch']) + 'x' + str(r['length']):>8} {r['step_flops'] / 1e9:>10.1f} "
          f"{r['flops_per_token'] / 1e6:>9.1f} {r['compile_seconds']:>9.1f} "
          f"{r['step_seconds']:>8.3f} {r['median_step_seconds']:>8.3f} "
          f"{r['tokens_per_second']:>9.0f} {r['peak_flops'] / 1e9:>12.1f} {r['mfu']:>6.1%} "
          f"{r['median_mfu']:>7.1%} {cpu_mfu(r, device):>7} {gib(r['peak_memory_bytes']):>10}")
  notes = []
  for r in results:
    if "error" in r:
      continue
    if r["donation_warnings"] or not r["donated"]:
      notes.append(f"{r['model']}: the state was not donated ({r['donation_warnings']})")
  kinds = {r["peak_memory_kind"] for r in results if "peak_memory_kind" in r}
  print(f"memory: {', '.join(sorted(kinds))}; tokens/s counts target tokens; "
        "state donated and no host-device copy in any step" if not notes else "; ".join(notes))


def print_decode_table(results: list[dict]) -> None:
  decode_rows = [(r["model"], row) for r in results for row in r.get("decode", [])]
  if not decode_rows:
    return
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


def print_pipeline(p: dict, results: list[dict]) -> None:
  print()
  if "error" in p:
    print(f"Input pipeline failed: {p['error']}")
    return
  print(f"Input pipeline (default experiment, batch {p['batch']} x {p['length']}, "
        f"{p['batches_timed']} batches)")
  print(f"  make_train_iterator alone: {p['batches_per_second']:.1f} batches/s "
        f"({p['seconds_per_batch'] * 1e3:.1f} ms/batch; first batch after "
        f"{p['startup_seconds']:.1f} s)")
  print(f"  packing efficiency (non-pad share): {p['packing_efficiency']:.1%} "
        f"(inputs {p['inputs_efficiency']:.1%}, targets {p['targets_efficiency']:.1%})")
  default = next((r for r in results if r.get("model") == "default"
                  and "step_seconds" in r), None)
  versus = (f" (the benchmark's step on a batch already on the device: "
            f"{default['median_step_seconds'] * 1e3:.1f} ms median)" if default else "")
  print(f"  training loop (jaxformer.train.loop, steady window): "
        f"{p['loop_step_seconds'] * 1e3:.1f} ms/step{versus}; data wait "
        f"{p['data_wait_fraction']:.1%} of wall time; logged packing efficiency "
        f"{p['loop_packing_efficiency']:.1%}")


def print_traces(results: list[dict]) -> None:
  for r in results:
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
    jax_internals.install()  # As the jaxformer CLI does, before the first compilation.
    print(json.dumps(run_task(args.child, json.loads(args.settings))))
    return 0
  models = args.models.split(",") if args.models else list(
      QUICK_MODELS if args.quick else MODELS)
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
  if args.decode_tokens <= decode_throughput.SOURCE_LEN:
    raise SystemExit(f"--decode-tokens must exceed the {decode_throughput.SOURCE_LEN} source "
                     "tokens")
  settings = dict(dtype=args.dtype, scan=args.scan, remat=args.remat, layers=args.layers,
                  batch=args.batch,
                  steps=args.steps, strategy=args.strategy, peak_flops=args.peak_flops,
                  quick=args.quick, decode=args.decode, decode_batch=args.decode_batch,
                  decode_tokens=args.decode_tokens,
                  decode_repeats=1 if args.quick else args.decode_repeats,
                  workdir=args.workdir, trace=args.trace)
  # The parent never touches a device (on a GPU it would hold memory the children need), so it
  # prints its progress itself: jaxformer.log.log asks jax for the process index, which starts
  # the backend.
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
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
  common.print_report(report, args.json, print_tables)
  return 0


if __name__ == "__main__":
  with contextlib.suppress(BrokenPipeError):
    sys.exit(main())
