"""Translates text with a StableHLO export of a jaxformer run, using jax, numpy and sentencepiece
only (no jaxformer): what serving the model somewhere else looks like.

  jaxformer export --workdir runs/numbers --format stablehlo --out numbers_shlo
  python docs/stablehlo_translate.py numbers_shlo "three hundred twenty-one" "forty-two"
  python docs/stablehlo_translate.py numbers_shlo < lines.txt     # one translation per line

The directory (jaxformer/interop/stablehlo.py describes it) holds the vocabulary, the parameters
and one serialised beam-search program per source width ("bucket"). Translating a line is:
SentencePiece ids + EOS -> padded to the smallest bucket that holds them -> the bucket's program
-> the best hypothesis, cut at its EOS -> text. Lines of one bucket share one call; the program
takes any batch size (jax compiles it once per batch size it meets).
"""

import json
import os
import sys

import jax
import numpy as np
import sentencepiece as spm


def load(directory):
  """The manifest, the parameters, the vocabulary and the programs {width: Exported}."""
  with open(os.path.join(directory, "manifest.json")) as f:
    manifest = json.load(f)
  if (manifest.get("format"), manifest.get("version")) != ("jaxformer-stablehlo", 1):
    raise ValueError(f"{directory} is not a jaxformer StableHLO export (version 1) this script "
                     "reads")
  with np.load(os.path.join(directory, manifest["parameters"])) as arrays:
    params = {name: arrays[name] for name in arrays.files}
  vocab = spm.SentencePieceProcessor(model_file=os.path.join(directory, manifest["vocabulary"]))
  programs = {}
  for bucket in manifest["buckets"]:
    with open(os.path.join(directory, bucket["program"]), "rb") as f:
      programs[bucket["width"]] = jax.export.deserialize(bytearray(f.read()))
  return {"manifest": manifest, "params": params, "vocab": vocab, "programs": programs}


def encode(model, line):
  """The source ids of a line: its pieces' ids, then EOS ([] for an empty line)."""
  if not line.strip():
    return []
  return model["vocab"].encode(line) + [model["manifest"]["ids"]["eos"]]


def bucket_width(model, length):
  """The smallest exported width that holds `length` ids."""
  for bucket in model["manifest"]["buckets"]:
    if length <= bucket["width"]:
      return bucket["width"]
  raise ValueError(f"a line of {length} ids (EOS included) is longer than the model's max_len, "
                   f"{model['manifest']['max_len']}; shorten it")


def beam_search(model, inputs):
  """The exported beam search of `inputs` [B, W] int32 (W a bucket's width):
  (tokens [B, k, L], scores [B, k], lengths [B, k]) as numpy arrays, best hypothesis first."""
  program = model["programs"][inputs.shape[1]]
  alpha = np.float32(model["manifest"]["alpha"])
  return tuple(np.asarray(x) for x in program.call(model["params"], inputs, alpha))


def decode(model, ids):
  """Text of a hypothesis's ids: cut at EOS; ids past the vocabulary read as UNK."""
  manifest_ids, vocab = model["manifest"]["ids"], model["vocab"]
  if manifest_ids["eos"] in ids:
    ids = ids[:ids.index(manifest_ids["eos"])]
  return vocab.decode([i if i < vocab.get_piece_size() else manifest_ids["unk"] for i in ids])


def translate(model, lines):
  """The best translation of each line, in order; an empty line stays empty."""
  sources = [encode(model, line) for line in lines]
  by_width = {}  # width -> the indices of the lines padded to it
  for i, ids in enumerate(sources):
    if ids:
      by_width.setdefault(bucket_width(model, len(ids)), []).append(i)
  translations = [""] * len(lines)
  for width, rows in by_width.items():
    inputs = np.full((len(rows), width), model["manifest"]["ids"]["pad"], np.int32)
    for row, i in enumerate(rows):
      inputs[row, :len(sources[i])] = sources[i]
    tokens, _, lengths = beam_search(model, inputs)
    for row, i in enumerate(rows):
      translations[i] = decode(model, tokens[row, 0, :lengths[row, 0]].tolist())
  return translations


def main(argv):
  if not argv:
    sys.exit(f"usage: {sys.argv[0]} EXPORT_DIR [LINE ...]   (no LINE: lines from stdin)")
  model = load(argv[0])
  lines = argv[1:] or sys.stdin.read().splitlines()
  for translation in translate(model, lines):
    print(translation)


if __name__ == "__main__":
  main(sys.argv[1:])
