"""CTranslate2 (float32 and int8) against jaxformer's own beam search, sentences/s on this CPU.

The same sentences (English numbers of the default task) are translated with beam 4 by:
- jaxformer: `decode.decode_batch` (the cached decoder, one compiled call per batch; the
  compiling first call is left out);
- CTranslate2 float32 and int8, exported by `jaxformer.interop.ct2.export`, through
  `ct2.translate` (jaxformer's length penalty and length limits, sentences grouped by source
  length) and through one plain `translate_batch` call (CTranslate2's own length penalty, one
  length limit: faster, not always the same translations).

The model is a trained run (`--workdir`) or, without one, the default experiment's model with
random parameters (its outputs run to the length limit in every decoder: the same work).

  python benchmarks/ctranslate2_throughput.py --workdir W     # a trained run
  python benchmarks/ctranslate2_throughput.py --quick         # 64 sentences, one timed round
  python benchmarks/ctranslate2_throughput.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from jaxformer import config as config_lib
from jaxformer import decode, inference
from jaxformer.data import tasks
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.interop import ct2
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID, PAD_ID
from jaxformer.train import jax_internals
from jaxformer.train import state as state_lib

import common

BEAM_SIZE = 4
BATCH = 32  # sentences per call, for every decoder.
SEED = 0


def sentences(count: int) -> list[str]:
  rng = np.random.default_rng(SEED)
  return [tasks.english_number(int(n)) for n in rng.integers(1, 10 ** 6, count)]


def random_run() -> inference.InferenceRun:
  """The default experiment's model with random parameters and a vocabulary of its task."""
  config = config_lib.load_config("default")
  texts = [s for n in range(1, 3000, 7) for s in (tasks.english_number(n),
                                                  tasks.spanish_number(n))]
  tokenizer = tokenizer_lib.train(texts, vocab_size=config.model.vocab_size)
  params = jax.jit(lambda key: state_lib.init_params(config, key))(jax.random.key(SEED))
  return inference.InferenceRun(Transformer(config.model), jax.device_get(params), config,
                                tokenizer, 0)


def time_rounds(fn, rounds: int) -> float:
  """The best wall seconds of `rounds` calls of `fn` (the least disturbed by the machine)."""
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def jaxformer_seconds(run, lines: list[str], rounds: int) -> float:
  d = run.config.decode
  rows = [run.tokenizer.encode(line) + [EOS_ID] for line in lines]
  ids = np.full((len(rows), max(map(len, rows))), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  batches = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]
  params = jax.device_put(run.params)  # Once, not at every call.

  def translate_all():
    return [decode.decode_batch(run.model, params, batch, beam_size=BEAM_SIZE,
                                alpha=d.alpha, max_extra_len=d.max_extra_len).tokens
            for batch in batches]
  translate_all()  # Compiles (one shape, the last batch aside).
  return time_rounds(translate_all, rounds)


def ct2_seconds(model_dir: str, compute_type: str, lines: list[str], settings: dict,
                rounds: int) -> dict[str, float]:
  import ctranslate2
  import sentencepiece
  translator = ctranslate2.Translator(model_dir, compute_type=compute_type)
  source, target = (sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(model_dir, f"{side}.spm")) for side in ("source", "target"))
  pieces = [source.encode(line, out_type=str) for line in lines]

  def exact():
    return [ct2.translate(translator, source, target, lines[i:i + BATCH], **settings)
            for i in range(0, len(lines), BATCH)]

  def plain():
    return translator.translate_batch(pieces, max_batch_size=BATCH, beam_size=BEAM_SIZE,
                                      length_penalty=settings["alpha"],
                                      max_decoding_length=settings["max_len"])
  exact(), plain()  # Warm-up.
  return {"exact": time_rounds(exact, rounds), "plain": time_rounds(plain, rounds)}


def measure(run, count: int, rounds: int) -> dict:
  lines = sentences(count)
  report = {"sentences": count, "beam_size": BEAM_SIZE, "batch": BATCH,
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": open("/proc/loadavg").read()
            .split()[:3], "cpus": os.cpu_count(), "sentences_per_second": {}}
  rate = report["sentences_per_second"]
  rate["jaxformer"] = count / jaxformer_seconds(run, lines, rounds)
  with tempfile.TemporaryDirectory() as tmp:
    for quantize, compute_type in ((None, "float32"), ("int8", "int8")):
      out = os.path.join(tmp, compute_type)
      os.makedirs(out)
      ct2.export(run, out, quantize)
      with open(os.path.join(out, ct2.SETTINGS_FILE)) as f:
        settings = dict(json.load(f), beam_size=BEAM_SIZE)
      for how, seconds in ct2_seconds(out, compute_type, lines, settings, rounds).items():
        rate[f"ctranslate2 {compute_type} ({how})"] = count / seconds
  return report


def print_table(report: dict) -> None:
  print(f"beam {report['beam_size']}, {report['sentences']} sentences in batches of "
        f"{report['batch']}, {report['cpus']} CPUs, load average {' '.join(report['loadavg'])}")
  base = report["sentences_per_second"]["jaxformer"]
  for name, rate in report["sentences_per_second"].items():
    print(f"{name:<32} {rate:>9.1f} sentences/s  {rate / base:>5.2f}x")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a trained run (default: random parameters)")
  parser.add_argument("--quick", action="store_true", help="64 sentences, one timed round")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  jax_internals.install()  # As the jaxformer CLI does, before the first compilation.
  run = random_run() if args.workdir is None else inference.load_for_inference(
      args.workdir, sharding=inference.inference_sharding())
  run = run._replace(params=jax.device_get(run.params))
  report = measure(run, 64 if args.quick else 256, 1 if args.quick else 3)
  common.print_report(report, args.json, print_table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
