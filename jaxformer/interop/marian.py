"""Hugging Face MarianMT (`transformers.MarianMTModel`, the Opus-MT models), both ways.

Marian's Transformer is jaxformer's post-LN model with Marian's settings (model.activation
'swish', model.final_logits_bias, model.layer_norm_epsilon 1e-5, model.sinusoid_layout 'half'),
so a conversion renames tensors and rearranges them in three exact ways:

- Layouts. A torch Linear keeps its weight as [out, in]; jaxformer's kernels are [in, out], and
  its attention kernels keep the heads apart: [D, H, K] (query, key, value), [H, K, D] (out).
- Sinusoids. Marian puts sin(angle i) at dimension i and its cos at D/2 + i; the paper (and
  jaxformer's default) interleaves them. Permuting the D dimensions of the residual stream in
  every weight (embedding columns, the D side of each matrix, LayerNorm scales and offsets,
  biases on D) computes the same function with the other layout: LayerNorm, attention and the
  tied logits do not depend on the order of those dimensions. The H*K side of the attention
  projections is not the residual stream and stays as it is. An export marks its config.json
  (SINUSOID_LAYOUT_KEY) so that an import permutes back, and the round trip is exact.
- Ids. jaxformer's PAD, UNK, BOS, EOS are 0..3; Marian's are wherever vocab.json puts them
  (Opus-MT: </s> 0, <unk> 1, <pad> last), and its decoder starts with pad, not a BOS token. An
  import moves embedding rows (and logit biases) so that the special tokens land on jaxformer's
  ids. When the decoder's start token is one of pad/unk/eos, BOS becomes a new row: a copy of
  the start token's embedding (so that the decoder's first input is exactly Marian's) with the
  logit bias NEW_BOS_LOGIT_BIAS (so that it adds nothing to the softmax: the log-probabilities
  stay Marian's over its own vocabulary). jaxformer's masks treat PAD as padding, so a PAD start
  would be masked out; a BOS with the start's embedding changes nothing in the model.

HF's LayerNorm epsilon is fixed at 1e-5; a model trained with jaxformer's default 1e-6 exports
with a small difference in the numbers (said on stderr; the import of the export restores it).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.errors import ConfigError, InputError
from jaxformer.log import log
from jaxformer.model.embedding import half_layout_order
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FORMAT = "hf"
WEIGHTS_FILE, TORCH_WEIGHTS_FILE = "model.safetensors", "pytorch_model.bin"
CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE = ("config.json", "generation_config.json",
                                                "tokenizer_config.json")
SOURCE_SPM, TARGET_SPM, VOCAB_JSON = tokenizer_lib.BUNDLE_FILES
# Extra keys of an exported config.json that HF ignores and the import reads back.
SINUSOID_LAYOUT_KEY = "jaxformer_sinusoid_layout"
EPSILON_KEY = "jaxformer_layer_norm_epsilon"
HF_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which MarianMTModel uses.
NEW_BOS_LOGIT_BIAS = -1e9  # exp() of it is 0 in float32: the new BOS row is never predicted.
# jaxformer's model.activation <-> HF's activation_function. jaxformer's gelu is the tanh
# approximation, HF's 'gelu_new' ('gelu' there is the exact erf form, which jaxformer lacks).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new", "swish": "swish"}
IMPORTED_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                        "swish": "swish", "silu": "swish"}
# Fine-tuning a pretrained model wants a far smaller rate than training from scratch.
IMPORT_LEARNING_RATE = 5e-5
IMPORT_DATA_MAX_LEN = 128


# --- Which tensor is which: HF name, jaxformer path, and its kind. ---------------------------

# Per kind: the jaxformer axis of D (permuted with the sinusoid layout) and of V (the ids).
D_AXIS = {"embedding": 1, "heads_in": 0, "heads_out": 2, "dense_in": 0, "dense_out": 1,
          "vector_d": 0, "logits": 0}
V_AXIS = {"embedding": 0, "logits": 1, "logits_bias": 0}


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """A jaxformer array in HF's layout (torch Linear weights are [out, in])."""
  if kind == "heads_in":                      # [D, H, K] -> [H*K, D]
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":                     # [H, K, D] -> [D, H*K]
    return x.reshape(-1, x.shape[-1]).T
  if kind == "heads_bias":                    # [H, K] -> [H*K]
    return x.reshape(-1)
  if kind in ("dense_in", "dense_out", "logits"):
    return x.T
  if kind == "logits_bias":                   # [V] -> [1, V], a buffer in HF
    return x[None]
  return x                                    # embeddings [V, D], vectors


def from_hf(kind: str, w: np.ndarray, model: Any) -> np.ndarray:
  """The inverse of `to_hf` for the model section `model`."""
  heads = (model.num_heads, model.d_model // model.num_heads)
  if kind == "heads_in":
    return w.T.reshape(model.d_model, *heads)
  if kind == "heads_out":
    return w.T.reshape(*heads, model.d_model)
  if kind == "heads_bias":
    return w.reshape(heads)
  if kind in ("dense_in", "dense_out", "logits"):
    return w.T
  if kind == "logits_bias":
    return w.reshape(-1)
  return w


def _attention(jax_name: str, hf_name: str, bias: bool) -> Iterator[tuple[str, tuple, str]]:
  for jax_proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    yield f"{hf_name}.{hf_proj}.weight", (jax_name, jax_proj, "kernel"), "heads_in"
    if bias:
      yield f"{hf_name}.{hf_proj}.bias", (jax_name, jax_proj, "bias"), "heads_bias"
  yield f"{hf_name}.out_proj.weight", (jax_name, "out", "kernel"), "heads_out"
  if bias:
    yield f"{hf_name}.out_proj.bias", (jax_name, "out", "bias"), "vector_d"


def _layer(stack: str, model: Any) -> Iterator[tuple[str, tuple, str]]:
  """(HF name, path under the layer, kind) of one layer's tensors (attention biases only with
  model.attention_bias: HF always has them, an export writes zeros)."""
  blocks = [("self_attention", "self_attn", "self_attn_layer_norm")]
  if stack == "decoder":
    blocks.append(("cross_attention", "encoder_attn", "encoder_attn_layer_norm"))
  for jax_name, hf_name, hf_norm in blocks:
    yield from _attention(jax_name, hf_name, model.attention_bias)
    yield f"{hf_norm}.weight", (f"{jax_name}_norm", "scale"), "vector_d"
    yield f"{hf_norm}.bias", (f"{jax_name}_norm", "bias"), "vector_d"
  yield "fc1.weight", ("feed_forward", "inner", "kernel"), "dense_in"
  yield "fc1.bias", ("feed_forward", "inner", "bias"), "vector"
  yield "fc2.weight", ("feed_forward", "outer", "kernel"), "dense_out"
  yield "fc2.bias", ("feed_forward", "outer", "bias"), "vector_d"
  yield "final_layer_norm.weight", ("feed_forward_norm", "scale"), "vector_d"
  yield "final_layer_norm.bias", ("feed_forward_norm", "bias"), "vector_d"


def attention_bias_names(num_layers: int) -> list[str]:
  """HF's names of every attention projection's bias ([D] each, as H * K = D)."""
  attentions = {"encoder": ("self_attn",), "decoder": ("self_attn", "encoder_attn")}
  return [f"model.{stack}.layers.{i}.{attention}.{proj}.bias"
          for stack, names in attentions.items() for i in range(num_layers)
          for attention in names for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]


def tensor_table(model: Any) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF name, jaxformer parameter path (unrolled layers), kind) of every tensor of `model`."""
  embed = ("embed", "embedding")
  if model.share_embeddings:
    table = [("model.shared.weight", ("shared_embedding", *embed), "embedding")]
  else:
    table = [("model.encoder.embed_tokens.weight", ("source_embedding", *embed), "embedding"),
             ("model.decoder.embed_tokens.weight", ("target_embedding", *embed), "embedding")]
  for stack in ("encoder", "decoder"):
    for i in range(model.num_layers):
      table += [(f"model.{stack}.layers.{i}.{name}", (stack, f"layers_{i}", *path), kind)
                for name, path, kind in _layer(stack, model)]
  if not model.tie_output:
    table += [("lm_head.weight", ("decoder", "logits", "kernel"), "logits"),
              ("final_logits_bias", ("decoder", "logits", "bias"), "logits_bias")]
  elif model.final_logits_bias:
    table.append(("final_logits_bias", ("decoder", "logits_bias"), "logits_bias"))
  return table


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def unrolled(params: dict, model: Any) -> dict:
  """Params of a scanned stack (`{stack}/layers`, a leading axis N) as `{stack}/layers_i`."""
  if not model.scan_layers:
    return params
  params = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    stacked = tree.pop("layers")
    for i in range(model.num_layers):
      tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    params[stack] = tree
  return params


# --- Export. ---------------------------------------------------------------------------------

def check_exportable(model: Any) -> None:
  """ConfigError naming the first setting of `model` that MarianMT cannot express."""
  if model.norm != "post":
    raise ConfigError(f"--format hf: model.norm={model.norm!r} (pre-LN) cannot be exported; "
                      "HF MarianMT is a post-LN Transformer (model.norm='post')")
  if model.pos_encoding != "sinusoidal":
    raise ConfigError(f"--format hf: model.pos_encoding={model.pos_encoding!r} cannot be "
                      "exported; HF MarianMT has sinusoidal positions only")


def hf_config(run: Any) -> dict[str, Any]:
  """MarianConfig's settings of `run`'s model, with jaxformer's token ids (so that HF's
  generate starts from BOS, as jaxformer's decoding does)."""
  m = run.config.model
  return dict(
      architectures=["MarianMTModel"], vocab_size=m.vocab_size, decoder_vocab_size=m.vocab_size,
      d_model=m.d_model, encoder_layers=m.num_layers, decoder_layers=m.num_layers,
      encoder_attention_heads=m.num_heads, decoder_attention_heads=m.num_heads,
      encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function=ACTIVATIONS[m.activation],
      max_position_embeddings=m.max_len, scale_embedding=True, dropout=m.dropout_rate,
      attention_dropout=m.attention_dropout_rate, activation_dropout=m.dropout_rate,
      share_encoder_decoder_embeddings=m.share_embeddings, tie_word_embeddings=m.tie_output,
      pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
      decoder_start_token_id=BOS_ID, forced_eos_token_id=None,
      **{SINUSOID_LAYOUT_KEY: m.sinusoid_layout, EPSILON_KEY: m.layer_norm_epsilon})


def hf_tensors(params: dict, model: Any) -> dict[str, np.ndarray]:
  """{HF name: float32 array} of jaxformer `params`, in Marian's half/half layout; the tensors
  HF always has and this model lacks (attention biases, the logits bias) are zeros."""
  params = unrolled(params, model)
  order = half_layout_order(model.d_model) if model.sinusoid_layout == "interleaved" else None
  tensors = {}
  for name, path, kind in tensor_table(model):
    x = np.asarray(_get(params, path), np.float32)
    if order is not None and kind in D_AXIS:
      x = np.take(x, order, axis=D_AXIS[kind])
    tensors[name] = np.ascontiguousarray(to_hf(kind, x))
  if not model.attention_bias:  # HF's projections always have biases: zero adds nothing.
    tensors.update((name, np.zeros(model.d_model, np.float32))
                   for name in attention_bias_names(model.num_layers))
  tensors.setdefault("final_logits_bias", np.zeros((1, model.vocab_size), np.float32))
  return tensors


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")


def write_tokenizer(tokenizer: tokenizer_lib.Tokenizer, out_dir: str, max_len: int) -> None:
  """MarianTokenizer's files: source.spm, target.spm, vocab.json (piece -> jaxformer id) and
  tokenizer_config.json naming the special pieces."""
  source, target, pieces = tokenizer.marian_files()
  for name, data in ((SOURCE_SPM, source), (TARGET_SPM, target)):
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(data)
  _write_json(os.path.join(out_dir, VOCAB_JSON), {piece: i for i, piece in enumerate(pieces)})
  _write_json(os.path.join(out_dir, TOKENIZER_FILE), {
      "tokenizer_class": "MarianTokenizer", "model_max_length": max_len,
      "pad_token": pieces[PAD_ID], "unk_token": pieces[UNK_ID], "eos_token": pieces[EOS_ID],
      "bos_token": pieces[BOS_ID], "separate_vocabs": False})


def generation_config(run: Any) -> dict[str, Any]:
  """generate()'s defaults, as jaxformer decodes: from BOS, PAD and BOS never generated, no
  forced EOS, the run's beam size, at most model.max_len tokens after the start token. (HF's
  length penalty is not GNMT's: decode.alpha does not carry over.)"""
  return {"decoder_start_token_id": BOS_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
          "pad_token_id": PAD_ID, "forced_eos_token_id": None,
          "bad_words_ids": [[PAD_ID], [BOS_ID]], "num_beams": run.config.decode.beam_size,
          "max_length": run.config.model.max_len + 1}


def export(run: Any, out_dir: str, quantize: str | None = None) -> None:
  """Writes `run` (a jaxformer.inference.InferenceRun, params on the host) as a MarianMT
  directory that `MarianMTModel.from_pretrained` and `MarianTokenizer.from_pretrained` load.
  `quantize` is not offered for this format (jaxformer.interop.QUANTIZATIONS)."""
  del quantize
  model = run.config.model
  check_exportable(model)
  transformers = require_library("transformers")
  safetensors_numpy = require_library("safetensors.numpy")
  if model.layer_norm_epsilon != HF_LAYER_NORM_EPSILON:
    log(f"jaxformer export: model.layer_norm_epsilon={model.layer_norm_epsilon:g}, but HF "
        f"MarianMT's LayerNorm uses {HF_LAYER_NORM_EPSILON:g}: its logits will differ from "
        "jaxformer's a little (an import of this export restores the model exactly)")
  transformers.MarianConfig(**hf_config(run)).save_pretrained(out_dir)
  _write_json(os.path.join(out_dir, GENERATION_FILE), generation_config(run))
  safetensors_numpy.save_file(hf_tensors(run.params, model),
                              os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  write_tokenizer(run.tokenizer, out_dir, model.max_len)


def require_library(name: str):
  from jaxformer import interop  # The package of this module: its optional-library check.
  return interop.require(name, FORMAT)


# --- Import. ---------------------------------------------------------------------------------

# Settings of older Marian configs that HF's MarianMT ignores but a converted model may need:
# jaxformer refuses a config that turns them on (or, for the last, off).
UNSUPPORTED_ON = ("normalize_before", "normalize_embedding", "layernorm_embedding",
                  "add_final_layer_norm")
# (encoder, decoder) settings that jaxformer's one `model.*` key must cover both of.
SAME_ON_BOTH_SIDES = (("encoder_layers", "decoder_layers"),
                      ("encoder_attention_heads", "decoder_attention_heads"),
                      ("encoder_ffn_dim", "decoder_ffn_dim"), ("vocab_size", "decoder_vocab_size"))


def read_hf_config(source_dir: str) -> Any:
  """The MarianConfig of `source_dir` (HF's defaults for what config.json leaves out), checked:
  InputError naming the first field jaxformer cannot express."""
  path = os.path.join(source_dir, CONFIG_FILE)
  where = f"--from {source_dir}: {CONFIG_FILE}"
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise InputError(f"--from {source_dir} has no {CONFIG_FILE}; give the directory that "
                     "MarianMTModel.save_pretrained wrote") from None
  except ValueError as e:
    raise InputError(f"{where} is not JSON ({e})") from None
  if raw.get("model_type") != "marian":
    raise InputError(f"{where}: model_type={raw.get('model_type')!r}; --format hf imports "
                     "MarianMT models (model_type 'marian') only")
  hf = require_library("transformers").MarianConfig.from_pretrained(source_dir)
  for field in UNSUPPORTED_ON:
    if getattr(hf, field, False):
      raise InputError(f"{where}: {field}={getattr(hf, field)!r} is not supported (jaxformer's "
                       "imported model is post-LN, without embedding LayerNorms)")
  checks = [("static_position_embeddings", getattr(hf, "static_position_embeddings", True),
             "learned positions are not supported (sinusoidal only)"),
            ("scale_embedding", hf.scale_embedding, "jaxformer always scales embeddings by "
             "sqrt(d_model)"),
            ("activation_function", hf.activation_function in IMPORTED_ACTIVATIONS,
             f"supported: {', '.join(IMPORTED_ACTIVATIONS)}"),
            ("eos_token_id", isinstance(hf.eos_token_id, int), "one EOS id is needed")]
  for field, fine, why in checks:
    if not fine:
      raise InputError(f"{where}: {field}={getattr(hf, field)!r} is not supported ({why})")
  for encoder, decoder in SAME_ON_BOTH_SIDES:
    if getattr(hf, encoder) != getattr(hf, decoder):
      raise InputError(f"{where}: {encoder}={getattr(hf, encoder)} but {decoder}="
                       f"{getattr(hf, decoder)}; jaxformer's encoder and decoder have the same "
                       "size (one model.* setting for both)")
  return hf


def read_tensors(source_dir: str) -> dict[str, np.ndarray]:
  """{name: float32 array} of model.safetensors, or else of pytorch_model.bin."""
  path = os.path.join(source_dir, WEIGHTS_FILE)
  if os.path.exists(path):
    tensors = require_library("safetensors.numpy").load_file(path)
  elif os.path.exists(os.path.join(source_dir, TORCH_WEIGHTS_FILE)):
    torch = require_library("torch")
    state = torch.load(os.path.join(source_dir, TORCH_WEIGHTS_FILE), map_location="cpu",
                       weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise InputError(f"--from {source_dir} has neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE}")
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


# A tied save keeps one copy of a shared table, under whichever of its names HF chose.
ALIASES = {"model.shared.weight": ("model.encoder.embed_tokens.weight",
                                   "model.decoder.embed_tokens.weight", "lm_head.weight"),
           "model.decoder.embed_tokens.weight": ("lm_head.weight",)}


def tensor(tensors: dict[str, np.ndarray], name: str, source_dir: str) -> np.ndarray:
  """The tensor `name` (or one of its ALIASES); InputError naming it when it is missing."""
  for candidate in (name, *ALIASES.get(name, ())):
    if candidate in tensors:
      return tensors[candidate]
  raise InputError(f"--from {source_dir}: the weights have no tensor {name}")


def read_vocabulary(source_dir: str, vocab_size: int) -> tuple[list[str], str]:
  """(the piece of every Marian id, from vocab.json; the unk piece) of `source_dir`. An id the
  file leaves out (a model may have more rows than pieces) gets a placeholder piece. InputError
  when a file is missing or describes what jaxformer cannot use."""
  for name in (SOURCE_SPM, TARGET_SPM, VOCAB_JSON):
    if not os.path.exists(os.path.join(source_dir, name)):
      raise InputError(f"--from {source_dir} has no {name}; a MarianMT directory holds "
                       f"{SOURCE_SPM}, {TARGET_SPM} and {VOCAB_JSON} beside the model")
  settings = {}
  if os.path.exists(os.path.join(source_dir, TOKENIZER_FILE)):
    with open(os.path.join(source_dir, TOKENIZER_FILE), encoding="utf-8") as f:
      settings = json.load(f)
  if settings.get("separate_vocabs"):
    raise InputError(f"--from {source_dir}: {TOKENIZER_FILE}: separate_vocabs=True is not "
                     "supported (jaxformer has one id space for sources and targets)")
  unk = settings.get("unk_token", "<unk>")
  unk = unk["content"] if isinstance(unk, dict) else unk  # An AddedToken, saved as a dict.
  with open(os.path.join(source_dir, VOCAB_JSON), encoding="utf-8") as f:
    ids = json.load(f)
  pieces, given = [f"<unused_{i}>" for i in range(vocab_size)], set()
  for piece, i in ids.items():
    if not isinstance(i, int) or not 0 <= i < vocab_size or i in given:
      raise InputError(f"--from {source_dir}: {VOCAB_JSON} gives {piece!r} the id {i!r}: not a "
                       f"free id below vocab_size={vocab_size}")
    pieces[i] = piece
    given.add(i)
  if unk not in ids:
    raise InputError(f"--from {source_dir}: {VOCAB_JSON} has no unk piece {unk!r}")
  return pieces, unk


class IdMap:
  """Marian's ids -> jaxformer's: `order[j]` is the Marian id whose rows become jaxformer id j
  (PAD, UNK, BOS, EOS first, then every other id in Marian's order); `new_bos` when BOS is an
  added row (a copy of the decoder's start token, which is pad, unk or eos); `pieces[j]` the
  piece of jaxformer id j."""

  def __init__(self, hf: Any, pieces: list[str], unk_piece: str, where: str):
    special = {"pad_token_id": hf.pad_token_id, "eos_token_id": hf.eos_token_id,
               "decoder_start_token_id": hf.decoder_start_token_id}
    for field, i in special.items():
      if not isinstance(i, int) or not 0 <= i < hf.vocab_size:
        raise InputError(f"{where}: {field}={i!r} is not an id of the vocabulary")
    pad, unk, eos = hf.pad_token_id, pieces.index(unk_piece), hf.eos_token_id
    if len({pad, unk, eos}) < 3:
      raise InputError(f"{where}: pad_token_id={pad}, eos_token_id={eos} and the unk id {unk} "
                       "must differ")
    start = hf.decoder_start_token_id
    self.new_bos = start in (pad, unk, eos)
    rest = [i for i in range(hf.vocab_size) if i not in (pad, unk, eos, start)]
    self.order = np.asarray([pad, unk, start, eos] + rest)
    self.pieces = [pieces[i] for i in self.order]
    if self.new_bos:
      self.pieces[BOS_ID] = next(p for p in ("<s>", "<bos>", "<jaxformer_bos>")
                                 if p not in pieces)


def model_settings(hf: Any, tensors: dict[str, np.ndarray], ids: IdMap) -> dict[str, Any]:
  """jaxformer's model section for the checked MarianConfig `hf` and its weights."""
  biases = [tensors[n] for n in attention_bias_names(hf.encoder_layers) if n in tensors]
  tied = bool(hf.tie_word_embeddings)
  logits_bias = tensors.get("final_logits_bias")
  return dict(
      vocab_size=len(ids.order), num_layers=hf.encoder_layers, d_model=hf.d_model,
      num_heads=hf.encoder_attention_heads, d_ff=hf.encoder_ffn_dim,
      dropout_rate=float(hf.dropout), attention_dropout_rate=float(hf.attention_dropout),
      pos_encoding="sinusoidal", max_len=hf.max_position_embeddings, norm="post",
      activation=IMPORTED_ACTIVATIONS[hf.activation_function],
      share_embeddings=bool(hf.share_encoder_decoder_embeddings), tie_output=tied,
      # All-zero biases compute what no biases do: an export of attention_bias=False wrote them.
      attention_bias=any(np.any(b != 0) for b in biases),
      final_logits_bias=tied and (ids.new_bos or (logits_bias is not None
                                                  and bool(np.any(logits_bias != 0)))),
      layer_norm_epsilon=float(getattr(hf, EPSILON_KEY, HF_LAYER_NORM_EPSILON)),
      sinusoid_layout=getattr(hf, SINUSOID_LAYOUT_KEY, "half"))


def jaxformer_params(tensors: dict[str, np.ndarray], model: Any, ids: IdMap,
                     source_dir: str) -> dict:
  """The parameters of `model` (unrolled layers) from Marian's `tensors`: rows in jaxformer's
  id order, and back in the interleaved layout when the model was exported from it."""
  inverse = (np.argsort(half_layout_order(model.d_model))
             if model.sinusoid_layout == "interleaved" else None)
  params = {}
  for name, path, kind in tensor_table(model):
    if name == "final_logits_bias" and name not in tensors:  # HF's buffer; zeros by default.
      w = np.zeros((1, len(ids.order) - ids.new_bos), np.float32)
    else:
      w = tensor(tensors, name, source_dir)
    try:
      x = from_hf(kind, w, model)
    except ValueError:
      raise InputError(f"--from {source_dir}: {name} has the shape {w.shape}, which does not fit "
                       f"its config.json") from None
    if kind in V_AXIS:
      x = np.take(x, ids.order, axis=V_AXIS[kind])
      if kind == "logits_bias" and ids.new_bos:
        x[BOS_ID] = NEW_BOS_LOGIT_BIAS
    if inverse is not None and kind in D_AXIS:
      x = np.take(x, inverse, axis=D_AXIS[kind])
    _set(params, path, np.ascontiguousarray(x, np.float32))
  return params


def check_shapes(params: dict, model: Any, source_dir: str) -> None:
  """InputError unless `params` has exactly the shapes of the Transformer of `model`."""
  ids = np.zeros((1, 2), np.int32)
  wanted = jax.eval_shape(Transformer(model).init, jax.random.key(0), ids, ids)["params"]
  got, wanted = checkpoint.flat_shapes(params), checkpoint.flat_shapes(wanted)
  if got != wanted:
    raise InputError(f"--from {source_dir}: the weights do not fit its config.json: "
                     f"{checkpoint.describe_mismatch(got, wanted)}")


def run_config(settings: dict[str, Any], source_dir: str) -> ml_collections.FrozenConfigDict:
  """The imported workdir's config.json: the default fine-tuning experiment's, with the model
  from Marian, a rate for fine-tuning a pretrained model, and the source's beam size."""
  config = config_lib.load_experiment("default_finetune")
  config.model.update(settings)
  config.data.max_len = min(IMPORT_DATA_MAX_LEN, config.model.max_len)
  config.train.learning_rate = IMPORT_LEARNING_RATE
  generation = os.path.join(source_dir, GENERATION_FILE)
  if os.path.exists(generation):
    with open(generation, encoding="utf-8") as f:
      config.decode.beam_size = json.load(f).get("num_beams") or config.decode.beam_size
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise InputError(f"--from {source_dir}: the imported model's settings are not valid: "
                     f"{e}") from None
  return ml_collections.FrozenConfigDict(config)


def import_model(source_dir: str, out_dir: str) -> None:
  """Writes the MarianMT directory `source_dir` as a jaxformer workdir into the (new, empty)
  `out_dir`: config.json, vocab.model (a Marian vocabulary) and checkpoints/0 (the parameters
  alone). Everything is read and checked before anything is written."""
  hf = read_hf_config(source_dir)
  where = f"--from {source_dir}: {CONFIG_FILE}"
  pieces, unk = read_vocabulary(source_dir, hf.vocab_size)
  ids = IdMap(hf, pieces, unk, where)
  tensors = read_tensors(source_dir)
  config = run_config(model_settings(hf, tensors, ids), source_dir)
  params = jaxformer_params(tensors, config.model, ids, source_dir)
  check_shapes(params, config.model, source_dir)
  spm_models = []
  for name in (SOURCE_SPM, TARGET_SPM):
    with open(os.path.join(source_dir, name), "rb") as f:
      spm_models.append(f.read())
  try:
    tokenizer = tokenizer_lib.TwoSidedTokenizer(*spm_models, ids.pieces)
  except RuntimeError as e:
    raise InputError(f"--from {source_dir}: {SOURCE_SPM} or {TARGET_SPM} is not a "
                     f"SentencePiece model ({e})") from None
  tokenizer.save(workdir_lib.path(out_dir, workdir_lib.VOCAB_FILE))
  workdir_lib.write_run_config(out_dir, config)
  checkpoint.save_params(workdir_lib.path(out_dir, workdir_lib.CHECKPOINTS_DIR, "0"), params,
                         {"imported_from": os.path.abspath(source_dir), "format": FORMAT})
