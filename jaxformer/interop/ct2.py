"""A trained run as a CTranslate2 model directory, for fast CPU (and int8) translation.

`jaxformer export --workdir W --format ctranslate2 --out DIR [--quantize int8]` fills
CTranslate2's own `TransformerSpec` (its Python spec API, no torch) with the run's parameters
and saves it. DIR then holds:

    model.bin                    the weights (float32, or int8 with --quantize int8)
    config.json                  CTranslate2's settings: special tokens, LayerNorm epsilon
    shared_vocabulary.json       the piece of every embedding row, in id order
    source.spm, target.spm       the SentencePiece models that cut sources and detokenize
                                 targets (one model twice for a run's own vocab.model; a run
                                 imported from Marian has two)
    jaxformer.json               the run's decode settings, the keyword arguments of `translate`

Every setting of jaxformer's model has an exact CTranslate2 counterpart: post- or pre-LN (the
pre-LN stacks' final LayerNorms), model.layer_norm_epsilon, sinusoidal (either
model.sinusoid_layout) or learned positions (the table the model adds is written as the
position encodings, so no layout is assumed), shared or separate embeddings, tied (with
model.final_logits_bias) or separate output projection, attention biases on or off, relu, gelu
(flax's tanh approximation) or swish, scanned or unrolled layers, model.vocab_size beyond the
vocabulary's pieces. A setting without one is refused, naming it, before anything is written
(`check_supported`).

Translating with the exported model as jaxformer.decode does (`translate` below; copy it, it
needs only ctranslate2 and sentencepiece):

    import json, ctranslate2, sentencepiece
    settings = json.load(open(f"{DIR}/jaxformer.json"))  # beam_size, alpha, max_extra_len, ...
    translator = ctranslate2.Translator(DIR, compute_type="int8")  # or "default" (float32)
    source, target = (sentencepiece.SentencePieceProcessor(model_file=f"{DIR}/{side}.spm")
                      for side in ("source", "target"))
    print(translate(translator, source, target, ["three hundred twenty one"], **settings))

What `translate` sets, and why: CTranslate2 appends EOS to each source itself (config.json's
add_source_eos) and starts the decoder with BOS; each sentence may run to its source length
(EOS included) + max_extra_len tokens, capped by max_len, so sentences of one source length
share a `translate_batch` call (it takes one `max_decoding_length`); `min_decoding_length=0`
lets EOS come first, and `suppress_sequences` bans PAD and BOS, as jaxformer's decoder does.
Two differences remain, so beam search agrees on nearly every sentence rather than all (the
tests require 99%; greedy search and per-token scores agree exactly):
- CTranslate2's length penalty divides log P by length^alpha (EOS not counted), jaxformer's by
  ((5 + length) / 6)^alpha (GNMT's, EOS counted); `translate` asks for the beam's n best at
  log P (length_penalty=0) and ranks them with jaxformer's penalty;
- CTranslate2 renormalises the probabilities after banning PAD and BOS, jaxformer does not, and
  each search stops by its own rule (CTranslate2: once enough hypotheses ended).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer import decode, interop
from jaxformer.errors import ConfigError
from jaxformer.model.embedding import PositionalEncoding
from jaxformer.tokens import BOS_ID, EOS_ID, UNK_ID

PyTree = Any

# jaxformer's activations -> the name of CTranslate2's equal one (ctranslate2.specs.Activation):
# flax's nn.gelu is the tanh approximation, nn.swish is x * sigmoid(x).
ACTIVATIONS = {"relu": "RELU", "gelu": "GELUTanh", "swish": "SWISH"}
SETTINGS_FILE = "jaxformer.json"
# Names of the embedding rows past the SentencePiece pieces (model.vocab_size may exceed them):
# CTranslate2 needs one name per row; the model can score them but they decode to nothing.
UNUSED_PIECE = "<unused_{}>"


def check_supported(model_config: Any) -> None:
  """Raises ConfigError naming the first setting of `model_config` CTranslate2 cannot express."""
  if model_config.activation not in ACTIVATIONS:
    raise ConfigError(f"model.activation={model_config.activation!r} has no CTranslate2 "
                      f"counterpart (it has {sorted(ACTIVATIONS)}); --format ctranslate2 cannot "
                      "export this run")


def export(run: Any, out: str, quantize: str | None) -> None:
  """Writes `run` (an InferenceRun, parameters on the host) as a CTranslate2 model in `out`;
  `quantize` None keeps float32 weights, 'int8' stores int8 weights with per-row scales."""
  check_supported(run.config.model)
  specs = interop.require("ctranslate2.specs", "ctranslate2")
  spec = transformer_spec(specs, run.config.model, run.params)  # on the host already
  pieces = vocabulary(run.tokenizer, run.config.model.vocab_size)
  spec.register_source_vocabulary(pieces)
  spec.register_target_vocabulary(pieces)
  configure_tokens(spec.config, pieces, run.config.model)
  spec.validate()
  spec.optimize(quantization=quantize)
  spec.save(out)
  source_model, target_model, _ = run.tokenizer.marian_files()
  for name, model in (("source.spm", source_model), ("target.spm", target_model)):
    with open(os.path.join(out, name), "wb") as f:
      f.write(model)
  d = run.config.decode
  settings = dict(beam_size=d.beam_size, alpha=d.alpha, max_extra_len=d.max_extra_len,
                  max_len=run.config.model.max_len,
                  never_generated=[pieces[i] for i in decode.NEVER_GENERATED])
  with open(os.path.join(out, SETTINGS_FILE), "w") as f:
    json.dump(settings, f, indent=2, ensure_ascii=False)


def vocabulary(tokenizer: Any, vocab_size: int) -> list[str]:
  """The V = model.vocab_size names of the embedding rows: the SentencePiece pieces in id
  order, then UNUSED_PIECE names for any rows beyond them."""
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
  return pieces + [UNUSED_PIECE.format(i) for i in range(len(pieces), vocab_size)]


def configure_tokens(ct2_config: Any, pieces: Sequence[str], model_config: Any) -> None:
  """CTranslate2's special tokens are jaxformer's pieces: sources end with EOS (added by
  CTranslate2), the decoder starts with BOS. Also the LayerNorm epsilon."""
  ct2_config.unk_token = pieces[UNK_ID]
  ct2_config.bos_token = pieces[BOS_ID]
  ct2_config.eos_token = pieces[EOS_ID]
  ct2_config.decoder_start_token = pieces[BOS_ID]
  ct2_config.add_source_bos = False
  ct2_config.add_source_eos = True
  # Always written: CTranslate2's own default (1e-5 with a LayerNorm bias) is not jaxformer's.
  ct2_config.layer_norm_epsilon = float(model_config.layer_norm_epsilon)


# --- The weights. ---------------------------------------------------------------------------

def transformer_spec(specs: Any, cfg: Any, params: PyTree) -> Any:
  """A filled `ctranslate2.specs.TransformerSpec` of the model config `cfg` and `params`."""
  options = dict(pre_norm=cfg.norm == "pre",
                 activation=getattr(specs.Activation, ACTIVATIONS[cfg.activation]))
  encoder = specs.TransformerEncoderSpec(cfg.num_layers, cfg.num_heads, **options)
  decoder = specs.TransformerDecoderSpec(cfg.num_layers, cfg.num_heads, **options)
  if cfg.share_embeddings:
    source_table = target_table = params["shared_embedding"]["embed"]["embedding"]  # [V, D]
  else:
    source_table = params["source_embedding"]["embed"]["embedding"]
    target_table = params["target_embedding"]["embed"]["embedding"]

  encoder.embeddings[0].weight = f32(source_table)
  encoder.position_encodings.encodings = position_table(cfg, params["encoder"])
  for i, layer in enumerate(encoder.layer):
    p = layer_params(params["encoder"], i)
    fill_attention(layer.self_attention, p["self_attention"], p["self_attention_norm"])
    fill_feed_forward(layer.ffn, p["feed_forward"], p["feed_forward_norm"])

  decoder.embeddings.weight = f32(target_table)
  decoder.position_encodings.encodings = position_table(cfg, params["decoder"])
  for i, layer in enumerate(decoder.layer):
    p = layer_params(params["decoder"], i)
    fill_attention(layer.self_attention, p["self_attention"], p["self_attention_norm"])
    fill_attention(layer.attention, p["cross_attention"], p["cross_attention_norm"], cross=True)
    fill_feed_forward(layer.ffn, p["feed_forward"], p["feed_forward_norm"])
  fill_output(decoder.projection, cfg, params["decoder"], target_table)

  if cfg.norm == "pre":  # Only pre-LN stacks end with a LayerNorm, in both models.
    fill_layer_norm(encoder.layer_norm, params["encoder"]["final_norm"])
    fill_layer_norm(decoder.layer_norm, params["decoder"]["final_norm"])
  return specs.TransformerSpec(encoder, decoder)


def layer_params(stack: PyTree, i: int) -> PyTree:
  """Layer i's parameters of a stack: `layers_{i}` unrolled, or row i of the scanned `layers`
  (model.scan_layers stacks each weight on a leading axis of N)."""
  if "layers" in stack:
    return jax.tree_util.tree_map(lambda x: x[i], stack["layers"])
  return stack[f"layers_{i}"]


def position_table(cfg: Any, stack: PyTree) -> np.ndarray:
  """The `[max_len, D]` vectors the model adds at positions 0..max_len-1, float32.

  Asked of the model's own PositionalEncoding (its learned table, or its sinusoids in whatever
  layout the config says), so CTranslate2 adds exactly what jaxformer adds.
  """
  float32 = ml_collections.ConfigDict(cfg.to_dict())
  float32.dtype = "float32"  # The table itself, not rounded to a bfloat16 compute dtype.
  float32 = ml_collections.FrozenConfigDict(float32)
  variables = {"params": stack["positions"]} if "positions" in stack else {}
  positions = jnp.arange(cfg.max_len)[None]                                  # [1, L]
  table = PositionalEncoding(float32).apply(variables, positions)[0]         # [L, D]
  return np.asarray(table, np.float32)


def f32(x: Any) -> np.ndarray:
  """A float32 copy of `x`: int8 quantisation (spec.optimize) scales the spec's arrays in place,
  which must not be the run's parameters (nor read-only views of them)."""
  return np.array(x, dtype=np.float32)


def linear(spec: Any, kernel: np.ndarray, bias: np.ndarray | None) -> None:
  """A CTranslate2 linear layer computes x W^T + b with W `[out, in]`: flax's `[in, out]`
  kernel transposed."""
  spec.weight = np.ascontiguousarray(f32(kernel).T)
  if bias is not None:
    spec.bias = f32(bias)


def fill_layer_norm(spec: Any, p: PyTree) -> None:
  spec.gamma = f32(p["scale"])
  spec.beta = f32(p["bias"])


def fill_attention(spec: Any, p: PyTree, norm: PyTree, cross: bool = False) -> None:
  """One attention sub-layer and its LayerNorm. CTranslate2 fuses projections: self-attention
  has linear_0 = [Q; K; V] `[3D, D]` and linear_1 = the output; cross-attention has linear_0 =
  Q, linear_1 = [K; V] `[2D, D]` and linear_2 = the output.

  jaxformer's Q, K, V kernels are `[D, H, K]` (flattened to `[D, H*K]`, head-major, as
  CTranslate2 splits heads) and the output kernel `[H, K, D]`; biases are absent without
  model.attention_bias.
  """
  def kernel(name):
    return f32(p[name]["kernel"]).reshape(p[name]["kernel"].shape[0], -1)  # [D, H*K]

  def bias(name):
    return f32(p[name]["bias"]).reshape(-1) if "bias" in p[name] else None

  def fused(names):
    kernels = np.concatenate([kernel(n) for n in names], axis=1)
    biases = [bias(n) for n in names]
    return kernels, None if biases[0] is None else np.concatenate(biases)

  if cross:
    linear(spec.linear[0], kernel("query"), bias("query"))
    linear(spec.linear[1], *fused(("key", "value")))
  else:
    linear(spec.linear[0], *fused(("query", "key", "value")))
  out_kernel = f32(p["out"]["kernel"])
  linear(spec.linear[-1], out_kernel.reshape(-1, out_kernel.shape[-1]), p["out"].get("bias"))
  fill_layer_norm(spec.layer_norm, norm)


def fill_feed_forward(spec: Any, p: PyTree, norm: PyTree) -> None:
  linear(spec.linear_0, p["inner"]["kernel"], p["inner"]["bias"])
  linear(spec.linear_1, p["outer"]["kernel"], p["outer"]["bias"])
  fill_layer_norm(spec.layer_norm, norm)


def fill_output(spec: Any, cfg: Any, decoder: PyTree, target_table: np.ndarray) -> None:
  """The pre-softmax projection `[V, D]`: the target embedding itself when tied (spec.optimize
  then stores it once), with model.final_logits_bias's bias; else the logits layer."""
  if cfg.tie_output:
    bias = decoder["logits_bias"] if cfg.final_logits_bias else None
    spec.weight = f32(target_table)
    if bias is not None:
      spec.bias = f32(bias)
  else:
    linear(spec, decoder["logits"]["kernel"], decoder["logits"]["bias"])


# --- Translating with the exported model (copy this function; it needs no jaxformer). -------

def translate(translator: Any, source: Any, target: Any, lines: Sequence[str], *,
              beam_size: int, alpha: float, max_extra_len: int, max_len: int,
              never_generated: Sequence[str]) -> list[str]:
  """The best translation of each of `lines`, found as jaxformer.decode's beam search finds it.

  `translator` is a `ctranslate2.Translator` of an exported directory, `source` and `target`
  `sentencepiece.SentencePieceProcessor`s of its source.spm and target.spm; the settings are
  the directory's jaxformer.json (a run's decode.*, model.max_len, the pieces of PAD and BOS).
  A blank line translates to ''.
  """
  pieces = [source.encode(line, out_type=str) if line.strip() else [] for line in lines]
  banned = [[piece] for piece in never_generated]
  by_length: dict[int, list[int]] = {}
  for i, p in enumerate(pieces):
    if p:
      by_length.setdefault(len(p), []).append(i)
  best = [""] * len(lines)
  for length, rows in by_length.items():
    limit = min(length + 1 + max_extra_len, max_len)  # + 1: the EOS CTranslate2 appends.
    results = translator.translate_batch(
        [pieces[i] for i in rows], beam_size=beam_size, num_hypotheses=beam_size,
        length_penalty=0.0, return_scores=True, min_decoding_length=0,
        max_decoding_length=limit, suppress_sequences=banned)
    for i, result in zip(rows, results):
      best[i] = target.decode(gnmt_best(result.hypotheses, result.scores, alpha, limit))
  return best


def gnmt_best(hypotheses: Sequence[Sequence[str]], log_probs: Sequence[float], alpha: float,
              limit: int) -> list[str]:
  """Of CTranslate2's n best (scored by log P), the best by jaxformer's log P / ((5 + L) / 6)^alpha.

  L counts the EOS, which CTranslate2 leaves out of a hypothesis; one cut at the length `limit`
  has no EOS (L = limit).
  """
  def score(k):
    length = min(len(hypotheses[k]) + 1, limit)
    return log_probs[k] / ((5.0 + length) / 6.0) ** alpha
  return list(hypotheses[max(range(len(hypotheses)), key=score)])
