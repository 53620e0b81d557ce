"""Decoding throughput: the cached decoder against a naive one, greedy and beam 4.

For each model (the default experiment's and the paper's base model, with random parameters),
each search (greedy, beam 4), each batch size and each decoder (`decode_batch`, with the
key/value cache; `naive_decode_batch`, which re-runs the whole model on every prefix), this
times one compiled call that produces OUTPUT_LEN tokens per sentence and prints sentences/s and
output tokens/s. EOS is disabled (eos_id = -1) so that every hypothesis runs to the full length
and both decoders do the same number of steps; with random parameters the search would
otherwise stop at an arbitrary point. Compilation is timed separately and left out.

  python benchmarks/decode_throughput.py            # batch 1 and 64, both models, all cases
  python benchmarks/decode_throughput.py --quick    # batch 1 and 8, one timed run; the base
                                                    # model's naive decoding at batch 1 only
  python benchmarks/decode_throughput.py --models default   # one model only
  python benchmarks/decode_throughput.py --json     # one JSON object instead of the table
  python benchmarks/decode_throughput.py --peers    # the peers' decode workload (vocab 8000,
                                                    # 32 sources of 32 tokens -> 32 new), to
                                                    # set beside ../shared/peers/torch_peers.py
  python benchmarks/decode_throughput.py --devices  # sentences/s on 1 and on all local
                                                    # devices (decode.ParallelDecoder)
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer import config as config_lib
from jaxformer import decode
from jaxformer import devices as devices_lib
from jaxformer.log import log
from jaxformer.model.transformer import Transformer
from jaxformer.train import jax_internals

import common

OUTPUT_LEN = 64  # tokens generated per sentence.
SOURCE_LEN = 16  # source tokens per sentence, EOS included; max_extra_len = the difference.
NO_EOS = -1  # an eos_id no token has: decoding runs to the full length.
BEAM_SIZE = 4  # the paper's beam.
ALPHA = 0.6  # the paper's length penalty.
DECODERS = (("cached", decode.decode_batch), ("naive", decode.naive_decode_batch))


# The peers' decode workload (../shared/peers/torch_peers.py, DECODE and WORKLOADS['small']).
PEER_MODEL = dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, num_layers=3,
                  max_len=64, dropout_rate=0.0)
PEER_BATCH, PEER_SOURCE_LEN, PEER_NEW_TOKENS = 32, 32, 32
DEVICE_BATCH = 32  # --devices: sentences per device, the same for 1 and for all devices.


def model_configs() -> dict[str, ml_collections.FrozenConfigDict]:
  """The model configs by name: the default experiment's and the paper's base model."""
  base = config_lib.get_default_config()
  config_lib.validate(base)
  return {"default": config_lib.load_config("default").model,
          "base": ml_collections.FrozenConfigDict(base).model}


def search_name(beam_size: int) -> str:
  """How the tables name a search: 'greedy' or 'beam N'."""
  return "greedy" if beam_size == 1 else f"beam {beam_size}"


def time_decoding(decode_fn, model, params, inputs: np.ndarray, beam_size: int,
                  output_len: int, repeats: int) -> common.Timing:
  """Times `decode_fn` (decode_batch or naive_decode_batch) decoding `inputs` ([B, S] source
  tokens) to `output_len` tokens per sentence, EOS disabled: the first call and `repeats` more.
  """
  timing, result = common.time_call(
      lambda: decode_fn(model, params, inputs, beam_size=beam_size, alpha=ALPHA,
                        max_extra_len=output_len - inputs.shape[1], eos_id=NO_EOS), repeats)
  lengths = np.asarray(result.lengths[:, 0])
  assert (lengths == output_len).all(), lengths  # Every sentence decoded in full.
  return timing


def peer_config() -> ml_collections.FrozenConfigDict:
  """The peers' small model (vocab 8000, d_model 256, 3 + 3 layers) as a jaxformer model config."""
  config = config_lib.get_default_config().model
  config.update(PEER_MODEL)
  return ml_collections.FrozenConfigDict(config)


def init_params(model: Transformer, source_len: int) -> dict:
  dummy = jnp.ones((1, source_len), jnp.int32)
  return jax.jit(model.init)(jax.random.PRNGKey(0), dummy, dummy)["params"]


def run_peers(repeats: int) -> dict:
  """decode_batch on one device at the peers' workload: greedy and beam 4, every sentence
  decoded to exactly PEER_NEW_TOKENS tokens."""
  model = Transformer(peer_config())
  params = init_params(model, PEER_SOURCE_LEN)
  inputs = common.random_sources(PEER_BATCH, PEER_SOURCE_LEN, PEER_MODEL["vocab_size"])
  rows = []
  for beam_size in (1, BEAM_SIZE):
    log(f"peers workload {search_name(beam_size)} ...")
    timing = time_decoding(decode.decode_batch, model, params, inputs, beam_size,
                           PEER_NEW_TOKENS, repeats)
    rows.append(dict(search=search_name(beam_size), batch=PEER_BATCH, seconds=timing.median,
                     sentences_per_s=PEER_BATCH / timing.median))
  return dict(device=str(jax.devices()[0]), workload="peers", model=PEER_MODEL,
              source_tokens=PEER_SOURCE_LEN, output_tokens=PEER_NEW_TOKENS, repeats=repeats,
              load_average=list(os.getloadavg()), results=rows)


def time_parallel(model, params, devices, beam_size: int, repeats: int) -> float:
  """Sentences/s of decode.ParallelDecoder over `devices`, DEVICE_BATCH sentences each."""
  mesh = devices_lib.inference_mesh(1, devices)
  decoder = decode.ParallelDecoder(
      model, devices_lib.place(params, devices_lib.param_shardings(mesh, params)), mesh,
      beam_size=beam_size, alpha=ALPHA, max_extra_len=OUTPUT_LEN - SOURCE_LEN, eos_id=NO_EOS)
  inputs = common.random_sources(DEVICE_BATCH * len(devices), SOURCE_LEN, model.config.vocab_size)
  timing, result = common.time_call(lambda: decoder.decode_sharded(inputs), repeats)
  assert (np.asarray(result.lengths) == OUTPUT_LEN).all()  # Every sentence decoded in full.
  return len(inputs) / timing.median


def run_devices(models: list[str], repeats: int) -> dict:
  """Sentences/s on one device and on all local devices, DEVICE_BATCH sentences per device."""
  everything = jax.local_devices()
  rows = []
  for name in models:
    model = Transformer(model_configs()[name])
    params = init_params(model, SOURCE_LEN)
    for beam_size in (1, BEAM_SIZE):
      log(f"{name} {search_name(beam_size)} on 1 and {len(everything)} devices ...")
      one = time_parallel(model, params, everything[:1], beam_size, repeats)
      all_ = time_parallel(model, params, everything, beam_size, repeats)
      rows.append(dict(model=name, search=search_name(beam_size), one_device=one,
                       all_devices=all_, scaling=all_ / one / len(everything)))
  return dict(device=str(everything[0]), devices=len(everything), workload="devices",
              batch_per_device=DEVICE_BATCH, output_tokens=OUTPUT_LEN, repeats=repeats,
              load_average=list(os.getloadavg()), results=rows)


def print_peers(report: dict) -> None:
  print(f"The peers' decode workload on {report['device']}: {report['results'][0]['batch']} "
        f"sources of {report['source_tokens']} tokens -> {report['output_tokens']} new "
        f"(vocab {report['model']['vocab_size']}); load average {report['load_average']}")
  for r in report["results"]:
    print(f"{r['search']:<7} {r['sentences_per_s']:>8.1f} sentences/s ({r['seconds']:.3f} s)")


def print_devices(report: dict) -> None:
  n = report["devices"]
  print(f"Sentences/s on 1 and on {n} devices ({report['device']}), {report['batch_per_device']}"
        f" sentences per device; load average {report['load_average']}")
  print(f"{'model':<8} {'search':<7} {'1 device':>9} {f'{n} devices':>10} {'scaling':>8}")
  for r in report["results"]:
    print(f"{r['model']:<8} {r['search']:<7} {r['one_device']:>9.1f} {r['all_devices']:>10.1f}"
          f" {r['scaling']:>8.2f}")
  print("scaling = the all-device figure / (devices x the one-device figure)")


def speedups(rows: list[dict]) -> list[dict]:
  """How many times faster the cached decoder ran than the naive one, case by case."""
  found = []
  for row in rows:
    if row["decoder"] == "naive" and "seconds" in row:
      cached = next(r for r in rows if r["decoder"] == "cached" and all(
          r[key] == row[key] for key in ("model", "search", "batch")))
      found.append(dict(model=row["model"], search=row["search"], batch=row["batch"],
                        speedup=row["seconds"] / cached["seconds"]))
  return found


def run(models: list[str], quick: bool, repeats: int) -> dict:
  batch_sizes = (1, 8) if quick else (1, 64)
  rows = []
  configs = model_configs()
  for name in models:
    config = configs[name]
    if config.max_len < OUTPUT_LEN:
      raise SystemExit(f"model {name}: max_len={config.max_len} < {OUTPUT_LEN} output tokens")
    model = Transformer(config)
    dummy = jnp.ones((1, SOURCE_LEN), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), dummy, dummy)["params"]
    for beam_size in (1, BEAM_SIZE):
      for batch in batch_sizes:
        inputs = common.random_sources(batch, SOURCE_LEN, config.vocab_size)
        for decoder, decode_fn in DECODERS:
          row = dict(model=name, search=search_name(beam_size), batch=batch, decoder=decoder)
          if quick and name == "base" and decoder == "naive" and batch > 1:
            rows.append({**row, "skipped": "--quick"})
            continue
          log(f"{name} {row['search']} batch {batch} {decoder} ...")
          timing = time_decoding(decode_fn, model, params, inputs, beam_size, OUTPUT_LEN,
                                 repeats)
          seconds, tokens = timing.median, batch * OUTPUT_LEN
          rows.append({**row, "seconds": seconds, "compile_seconds": timing.first - seconds,
                       "sentences_per_s": batch / seconds, "tokens_per_s": tokens / seconds})
  return dict(device=str(jax.devices()[0]), output_tokens=OUTPUT_LEN, source_tokens=SOURCE_LEN,
              quick=quick, repeats=repeats, results=rows, cached_speedup=speedups(rows))


def print_table(report: dict) -> None:
  print(f"Decoding {report['output_tokens']} tokens per sentence from {report['source_tokens']}-"
        f"token sources on {report['device']} (random parameters, EOS disabled)")
  header = (f"{'model':<8} {'search':<7} {'batch':>5} {'decoder':<7} {'seconds':>9} "
            f"{'sentences/s':>12} {'tokens/s':>10} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  for r in report["results"]:
    head = f"{r['model']:<8} {r['search']:<7} {r['batch']:>5} {r['decoder']:<7}"
    if "skipped" in r:
      print(f"{head} skipped ({r['skipped']})")
      continue
    print(f"{head} {r['seconds']:>9.3f} {r['sentences_per_s']:>12.2f} "
          f"{r['tokens_per_s']:>10.0f} {r['compile_seconds']:>9.1f}")
  print()
  for s in report["cached_speedup"]:
    print(f"cached / naive speed-up, {s['model']} {s['search']} batch {s['batch']}: "
          f"{s['speedup']:.1f}x")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="batch 1 and 8, one timed run, the base model's naive decoding at "
                           "batch 1 only")
  parser.add_argument("--models", default="default,base",
                      help="comma-separated, from: default (experiments/default.py), base "
                           "(the paper's base model)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--peers", action="store_true",
                      help="the peers' decode workload only (torch_peers.py --what decode)")
  parser.add_argument("--devices", action="store_true",
                      help="sentences/s on 1 and on all local devices")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs per case after the compiling one (default 3; 1 --quick)")
  args = parser.parse_args(argv)
  repeats = args.repeats or (1 if args.quick else 3)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(model_configs()))
  if unknown:
    parser.error(f"unknown model(s) {', '.join(unknown)}; choose from default, base")
  jax_internals.install()  # As the jaxformer CLI does, before the first compilation.
  if args.peers:
    common.print_report(run_peers(repeats), args.json, print_peers)
  elif args.devices:
    common.print_report(run_devices(models, repeats), args.json, print_devices)
  else:
    common.print_report(run(models, args.quick, repeats), args.json, print_table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
