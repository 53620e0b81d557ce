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
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer import config as config_lib
from jaxformer import decode
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
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs per case after the compiling one (default 3; 1 --quick)")
  args = parser.parse_args(argv)
  repeats = args.repeats or (1 if args.quick else 3)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(model_configs()))
  if unknown:
    parser.error(f"unknown model(s) {', '.join(unknown)}; choose from default, base")
  jax_internals.install()  # As the jaxformer CLI does, before the first compilation.
  common.print_report(run(models, args.quick, repeats), args.json, print_table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
