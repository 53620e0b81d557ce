"""StableHLO: the beam search of a run as serialised `jax.export` programs, with its parameters.

The directory `export` writes (the layout of FORMAT, version VERSION):

  manifest.json            what is here: the buckets and their programs, the token ids, the
                           decode settings, and what each program takes and returns
  params.npz               the parameters (numpy.savez, uncompressed), one array per flax
                           parameter path joined by '/' ('encoder/layers_0/.../kernel')
  vocab.model              the SentencePiece vocabulary, of sources and targets
  beam_search_<W>.bin      one program per source width W: `jax.export.Exported.serialize()`

There is one program per length bucket translate uses (jaxformer.decode.length_buckets: the
powers of two from 8 up to model.max_len), each with a symbolic batch size B, so that any number
of sentences of that width runs without exporting again. `jax.export.deserialize(bytes)` gives an
Exported whose `.call(params, inputs, alpha)` takes

  params   {name: array}, exactly the arrays of params.npz (passed in, not baked in, so that
           the programs stay small and the weights can be read or replaced)
  inputs   [B, W] int32: per sentence its SentencePiece ids then EOS, PAD after
  alpha    [] float32: the length penalty ((5 + len) / 6) ** alpha (the run's in the manifest)

and returns (tokens [B, k, L] int32, scores [B, k] float32, lengths [B, k] int32): the k =
beam_size best hypotheses, best first, each `lengths` tokens long (its EOS included, if it
ended with one), PAD after; L = min(W + max_extra_len, max_len): the DecodeResult of
jaxformer.decode.decode_batch, as a tuple. docs/stablehlo_translate.py reads the directory with
jax, numpy and sentencepiece only.

Platforms: CPU by default. `export(..., platforms=("cpu", "cuda"))` lowers every program for
both (jax.export's multi-platform lowering, which works on a machine without a GPU and adds a few
percent to each program); the program then runs on whichever of them jax's default device is.
'tpu' can be added the same way. Attention is always traced as XLA's einsums, never cuDNN's
fused kernel (model.attention_kernel is set to 'xla' for the export): the kernel is chosen from
the machine the export runs on, and a custom call would tie the programs to one platform.

Compatibility is jax.export's: a program serialised by one jax version can be called by later
versions for about six months (JAX's export documentation); the manifest records the jax that
wrote it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxformer import decode, tokens
from jaxformer.data.tokenizer import TwoSidedTokenizer
from jaxformer.errors import InputError
from jaxformer.model.transformer import Transformer

FORMAT, VERSION = "jaxformer-stablehlo", 1
MANIFEST, PARAMS, VOCAB = "manifest.json", "params.npz", "vocab.model"
DEFAULT_PLATFORMS = ("cpu",)
SEPARATOR = "/"  # joins a parameter's flax path into its name in params.npz


def program_file(width: int) -> str:
  return f"beam_search_{width}.bin"


def flat_params(params: Any) -> dict[str, np.ndarray]:
  """The nested parameter dict as {'encoder/layers_0/.../kernel': host array}."""
  flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
  return {name: np.asarray(value) for name, value in flat.items()}


def nested_params(flat: dict[str, Any]) -> dict[str, Any]:
  """flat_params undone: the nested dict the model applies."""
  return traverse_util.unflatten_dict(flat, sep=SEPARATOR)


def _portable_model(model_config: ml_collections.FrozenConfigDict) -> Transformer:
  """The run's model with attention as XLA einsums (see the module docstring)."""
  config = model_config.as_configdict()
  config.attention_kernel = "xla"
  return Transformer(config=ml_collections.FrozenConfigDict(config))


def beam_search_program(model: Transformer, *, beam_size: int, max_extra_len: int,
                        max_len: int) -> Callable:
  """The function each exported program is: (params {name: [...]}, inputs [B, W], alpha [])
  -> (tokens [B, k, L], scores [B, k], lengths [B, k]), jaxformer.decode's cached search."""
  def program(params, inputs, alpha):
    result = decode.decode_batch(model, nested_params(params), inputs, beam_size=beam_size,
                                 alpha=alpha, max_extra_len=max_extra_len, max_len=max_len,
                                 eos_id=tokens.EOS_ID)
    return tuple(result)  # A tuple, not a DecodeResult: loaders need not register its class.
  return jax.jit(program)


def export_bucket(program: Callable, params: dict[str, np.ndarray], width: int,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """`program` exported for sources of `width` positions and a symbolic batch size."""
  batch, = jax.export.symbolic_shape("B")
  param_specs = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in params.items()}
  return jax.export.export(program, platforms=tuple(platforms))(
      param_specs, jax.ShapeDtypeStruct((batch, width), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.float32))


def manifest(run: Any, widths: Sequence[int], platforms: Sequence[str]) -> dict[str, Any]:
  """manifest.json: everything a loader needs besides the files it names."""
  d, max_len = run.config.decode, run.config.model.max_len
  return {
      "format": FORMAT, "version": VERSION, "jax_version": jax.__version__,
      "step": run.step, "platforms": list(platforms),
      "parameters": PARAMS, "vocabulary": VOCAB,
      "ids": {"pad": tokens.PAD_ID, "unk": tokens.UNK_ID, "bos": tokens.BOS_ID,
              "eos": tokens.EOS_ID},
      "beam_size": d.beam_size, "alpha": d.alpha, "max_extra_len": d.max_extra_len,
      "max_len": max_len,
      # Smallest first: a sentence of n ids (EOS included) goes to the first width >= n.
      "buckets": [{"width": w, "program": program_file(w),
                   "output_length": min(w + d.max_extra_len, max_len)} for w in widths],
      "takes": {
          "params": f"{{name: array}} of {PARAMS}, every array of it",
          "inputs": "int32 [B, width]: a sentence per row, its ids then eos, pad after; any B",
          "alpha": "float32 []: the length penalty's exponent, ((5 + len) / 6) ** alpha"},
      "returns": {
          "tokens": "int32 [B, beam_size, output_length]: hypotheses best first, pad after",
          "scores": "float32 [B, beam_size]: log P / length penalty",
          "lengths": "int32 [B, beam_size]: tokens in each hypothesis, its eos included"},
  }


def export(run: Any, out: str, quantize: str | None = None, *,
           platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
  """Writes the StableHLO directory of `run` (an InferenceRun, params on the host) into `out`
  (new and empty): the layout of the module docstring. `quantize` is never set (this format
  offers none, jaxformer.interop.QUANTIZATIONS)."""
  del quantize
  if isinstance(run.tokenizer, TwoSidedTokenizer):
    raise InputError("this run has two vocabularies (imported from Marian); the StableHLO "
                     "export and docs/stablehlo_translate.py read one SentencePiece model: "
                     "export it with --format ctranslate2 or hf instead")
  params = flat_params(run.params)
  max_len = run.config.model.max_len
  program = beam_search_program(_portable_model(run.config.model),
                                beam_size=run.config.decode.beam_size,
                                max_extra_len=run.config.decode.max_extra_len, max_len=max_len)
  widths = decode.length_buckets(max_len)
  for width in widths:
    exported = export_bucket(program, params, width, platforms)
    with open(os.path.join(out, program_file(width)), "wb") as f:
      f.write(exported.serialize())
  np.savez(os.path.join(out, PARAMS), **params)
  run.tokenizer.save(os.path.join(out, VOCAB))
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest(run, widths, platforms), f, indent=2)
    f.write("\n")
