"""The attention weights of one sentence pair, as the model itself computes them.

`attention_maps` translates a sentence with beam search, then runs the teacher-forced model once
on (source, translation) with the 'intermediates' collection mutable: every `MultiHeadAttention`
sows its softmax weights, `[B, H, T, S]`, there. Nothing is recomputed here; `sown_weights`
only stacks what the layers sowed. The result, `AttentionMaps`, holds NumPy arrays and the
subwords that label them, which jaxformer.plots draws.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from jaxformer import decode
from jaxformer import devices as devices_lib
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.errors import InputError
from jaxformer.model.transformer import LAYERS, Transformer, shift_right
from jaxformer.tokens import EOS_ID, UNK_ID


class AttentionMaps(NamedTuple):
  """One sentence pair and every attention weight the model computed for it.

  The target is the model's own translation, with its EOS (unless the search stopped at the
  length limit first); the decoder's query at target
  position t is the one that predicts token t (its input is token t-1, or BOS). Weights are
  float32 probabilities, N layers, H heads, S source and T target tokens.
  """
  source_ids: np.ndarray      # [S] int32 token ids of the source, EOS included.
  target_ids: np.ndarray      # [T] int32 token ids of the translation.
  source_pieces: list[str]    # S subwords of the source, the closing '</s>' included.
  target_pieces: list[str]    # T subwords of the translation.
  decoder_input_pieces: list[str]  # T decoder inputs: '<s>', then the target shifted right.
  translation: str            # the detokenized translation.
  cross: np.ndarray           # [N, H, T, S] decoder queries over the encoder output.
  encoder_self: np.ndarray    # [N, H, S, S] encoder self-attention.
  decoder_self: np.ndarray    # [N, H, T, T] masked decoder self-attention.


def check_not_empty(text: str) -> None:
  """Raises InputError for an empty or blank text (checked before loading anything)."""
  if not text.strip():
    raise InputError("the text is empty; give a sentence to translate, e.g. --text \"...\"")


def encode_source(tokenizer: Tokenizer, text: str, max_len: int) -> np.ndarray:
  """`text` as source ids with the closing EOS, `[1, S]` int32.

  Raises InputError for an empty text or one longer than `max_len` tokens (EOS included):
  a picture of a truncated sentence would mislead, so it is refused rather than cut.
  """
  check_not_empty(text)
  ids = list(tokenizer.encode(text)) + [EOS_ID]
  if len(ids) > max_len:
    raise InputError(f"the text has {len(ids)} tokens (EOS included), more than this model's "
                     f"model.max_len={max_len}; give a shorter sentence")
  return np.asarray([ids], np.int32)


def pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
  """The subword of each id ('▁' marks a word start); ids past the vocabulary show as unk."""
  return [tokenizer.id_to_piece(i if 0 <= i < tokenizer.vocab_size else UNK_ID)
          for i in map(int, ids)]


@functools.partial(jax.jit, static_argnames="model")
def _teacher_forced_intermediates(model: Transformer, params: Any, inputs: jax.Array,
                                  targets: jax.Array) -> Any:
  """The 'intermediates' collection of one teacher-forced forward pass (the sown weights)."""
  _, variables = model.apply({"params": params}, inputs, targets, mutable=["intermediates"])
  return variables["intermediates"]


def sown_weights(stack: dict, module: str) -> np.ndarray:
  """Stack the weights one attention module of every layer sowed: `[N, H, Q, K]`.

  `stack` is the intermediates of the encoder or the decoder, `module` 'self_attention' or
  'cross_attention'. Unrolled layers sow under `layers_0` .. `layers_{N-1}`, each `[B, H, Q, K]`;
  a scanned stack (model.scan_layers) sows once under `layers`, `[N, B, H, Q, K]`. B is 1 here.
  """
  if LAYERS in stack:
    return np.asarray(stack[LAYERS][module]["attention_weights"][0])[:, 0]
  names = sorted((k for k in stack if k.startswith(LAYERS + "_")),
                 key=lambda k: int(k.rsplit("_", 1)[1]))
  return np.stack([np.asarray(stack[k][module]["attention_weights"][0])[0] for k in names])


def attention_maps(model: Transformer, params: Any, tokenizer: Tokenizer, text: str, *,
                   beam_size: int, alpha: float, max_extra_len: int) -> AttentionMaps:
  """Translates `text` with beam search, then records the model's attention on the pair.

  1. `decode.decode_batch` finds the best translation (with its EOS, unless the search hit
     the length limit first).
  2. The teacher-forced model runs once on (source, translation) with the 'intermediates'
     collection mutable, so each attention module sows its softmax weights.
  Raises InputError for an empty text or one that does not fit the model.
  """
  inputs = encode_source(tokenizer, text, model.config.max_len)
  result = decode.decode_batch(model, params, inputs, beam_size=beam_size, alpha=alpha,
                               max_extra_len=max_extra_len, max_len=model.config.max_len)
  # Copies to the host are collectives when the parameters (and so what is computed from
  # them) are spread over several processes: every process calls this function.
  tokens, lengths = jax.tree.map(devices_lib.to_host, (result.tokens, result.lengths))
  target_ids = tokens[0, 0, :int(lengths[0, 0])].astype(np.int32)
  intermediates = jax.tree.map(
      devices_lib.to_host,
      _teacher_forced_intermediates(model, params, inputs, target_ids[None]))
  return AttentionMaps(
      source_ids=inputs[0],
      target_ids=target_ids,
      source_pieces=pieces(tokenizer, inputs[0]),
      target_pieces=pieces(tokenizer, target_ids),
      decoder_input_pieces=pieces(tokenizer, np.asarray(shift_right(target_ids[None]))[0]),
      translation=tokenizer.decode(target_ids.tolist()),
      cross=sown_weights(intermediates["decoder"], "cross_attention"),
      encoder_self=sown_weights(intermediates["encoder"], "self_attention"),
      decoder_self=sown_weights(intermediates["decoder"], "self_attention"))
