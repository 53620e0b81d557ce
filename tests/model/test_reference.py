"""The Flax model equals a float64 NumPy transcription of the paper's equations.

The reference below is written from the formulas of Vaswani et al. 2017 (not from the model's
code): one example at a time, one head at a time, in float64. It reads the Flax parameters by
name, so it also pins down what every parameter means.
"""

import jax
import numpy as np
import pytest

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       tiny_config)


BOS = 2          # the start token of the decoder (jaxformer.tokens.BOS_ID)
PAD = 0
EPSILON = 1e-6   # LayerNorm epsilon


# --- The paper's equations in float64 NumPy. -------------------------------------------------

def positional_encoding(length, d_model):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
  pe = np.zeros((length, d_model))
  for pos in range(length):
    for dim in range(d_model):
      two_i = dim - dim % 2
      angle = pos / 10000 ** (two_i / d_model)
      pe[pos, dim] = np.sin(angle) if dim % 2 == 0 else np.cos(angle)
  return pe


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPSILON) * p["scale"] + p["bias"]


def linear(x, p, bias=True):
  return x @ p["kernel"] + (p["bias"] if bias else 0.0)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def multi_head_attention(xq, xkv, may_attend, p, bias):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, where
  head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V."""
  heads = []
  num_heads = p["query"]["kernel"].shape[1]
  for h in range(num_heads):
    def project(x, name):
      return x @ p[name]["kernel"][:, h, :] + (p[name]["bias"][h] if bias else 0.0)
    q, k, v = project(xq, "query"), project(xkv, "key"), project(xkv, "value")
    scores = q @ k.T / np.sqrt(q.shape[-1])
    scores = np.where(may_attend, scores, -np.inf)
    heads.append(softmax(scores) @ v)
  concat = np.concatenate(heads, axis=-1)                         # [T, H*K]
  w_out = p["out"]["kernel"].reshape(concat.shape[-1], -1)        # [H*K, D]
  return concat @ w_out + (p["out"]["bias"] if bias else 0.0)


def feed_forward(x, p, activation):
  h = linear(x, p["inner"])
  if activation == "relu":
    h = np.maximum(h, 0.0)
  else:  # GELU, tanh approximation
    h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
  return linear(h, p["outer"])


def sublayer(x, fn, norm_params, norm):
  if norm == "post":
    return layer_norm(x + fn(x), norm_params)        # LayerNorm(x + Sublayer(x))
  return x + fn(layer_norm(x, norm_params))          # x + Sublayer(LayerNorm(x))


def reference_logits(params, cfg, source, target):
  """Logits [T, V] of one example: source [S] and target [T] ids, padding 0."""
  d = cfg.d_model
  if cfg.share_embeddings:
    src_table = tgt_table = params["shared_embedding"]["embed"]["embedding"]
  else:
    src_table = params["source_embedding"]["embed"]["embedding"]
    tgt_table = params["target_embedding"]["embed"]["embedding"]

  def positions(stack, length):
    if cfg.pos_encoding == "sinusoidal":
      return positional_encoding(length, d)
    return params[stack]["positions"]["pos_embedding"][:length]

  # Encoder.
  x = src_table[source] * np.sqrt(d) + positions("encoder", len(source))
  source_real = source != PAD
  for i in range(cfg.num_layers):
    p = params["encoder"][f"layers_{i}"]
    x = sublayer(x, lambda y: multi_head_attention(y, y, source_real[None, :],
                                                   p["self_attention"], cfg.attention_bias),
                 p["self_attention_norm"], cfg.norm)
    x = sublayer(x, lambda y: feed_forward(y, p["feed_forward"], cfg.activation),
                 p["feed_forward_norm"], cfg.norm)
  if cfg.norm == "pre":
    x = layer_norm(x, params["encoder"]["final_norm"])
  memory = x

  # Decoder: inputs are the targets shifted right behind BOS.
  decoder_inputs = np.concatenate([[BOS], target[:-1]])
  length = len(target)
  causal = np.tril(np.ones((length, length), dtype=bool))
  y = tgt_table[decoder_inputs] * np.sqrt(d) + positions("decoder", length)
  for i in range(cfg.num_layers):
    p = params["decoder"][f"layers_{i}"]
    y = sublayer(y, lambda z: multi_head_attention(z, z, causal, p["self_attention"],
                                                   cfg.attention_bias),
                 p["self_attention_norm"], cfg.norm)
    y = sublayer(y, lambda z: multi_head_attention(z, memory, source_real[None, :],
                                                   p["cross_attention"], cfg.attention_bias),
                 p["cross_attention_norm"], cfg.norm)
    y = sublayer(y, lambda z: feed_forward(z, p["feed_forward"], cfg.activation),
                 p["feed_forward_norm"], cfg.norm)
  if cfg.norm == "pre":
    y = layer_norm(y, params["decoder"]["final_norm"])
  if cfg.tie_output:
    return y @ tgt_table.T
  return linear(y, params["decoder"]["logits"])


# --- The comparison. ---------------------------------------------------------------------------

CONFIGS = {
    "paper_post_ln": dict(norm="post", pos_encoding="sinusoidal", activation="relu",
                          share_embeddings=True, tie_output=True, attention_bias=True),
    "pre_ln_learned_untied": dict(norm="pre", pos_encoding="learned", activation="gelu",
                                  share_embeddings=False, tie_output=False,
                                  attention_bias=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_equals_numpy_reference(name):
  cfg = tiny_config(**CONFIGS[name])
  rng = np.random.RandomState(1)
  # Row 0: full source, padded target; row 1: padded source, full target.
  source = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[6, 3])
  target = random_ids(rng, TARGET_SHAPE, cfg.vocab_size, lengths=[3, 5])
  # Random parameters: non-zero biases and offsets, gains away from 1, so that all matter.
  model, params = init_params(cfg)

  logits = np.asarray(model.apply({"params": params}, source, target))
  assert logits.dtype == np.float32
  params64 = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params)
  for b in range(source.shape[0]):
    real = np.asarray(target[b]) != PAD
    expected = reference_logits(params64, cfg, np.asarray(source[b]), np.asarray(target[b]))
    error = np.abs(logits[b][real] - expected[real]).max() / np.abs(expected[real]).max()
    assert error <= 1e-5, f"row {b}: relative error {error:.2e}"
