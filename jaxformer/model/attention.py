"""Multi-head attention (Vaswani et al. 2017, section 3.2), its masks, and its decoding cache.

Masks are boolean, True = may attend, shaped `[B, 1, T, S]` (the 1 broadcasts over heads). Every
mask of the model is built by the functions of the first section and nowhere else.

`MultiHeadAttention` projects queries, keys and values into H heads of K = D / H dimensions,
computes softmax(Q K^T / sqrt(K)) V in every head, and projects the H results back to D. While
decoding it keeps keys and values in the 'cache' collection, heads first and each head's keys
transposed (keys `[B, H, K, S]`, values `[B, H, S, K]`): a step's Q K^T and its weighted sum
of values are then plain batched matrix products over the cache as it lies in memory.

- Cross-attention projects the encoder output to keys and values once per sentence (mode
  'init_cache'), into `cross_key` and `cross_value`. Every step then only projects its
  queries; the n hypotheses of sentence b (beam search) are n queries over sentence b's keys
  and values, which are never copied n times.
- Self-attention keeps `cached_key` `[B, H, K, L*n]` and `cached_value` `[B, H, L*n, K]`: for
  each sentence, L positions (the longest decode) of n slots, position-major (entry p*n + s is
  slot s at position p). At step t, hypothesis j of sentence b writes its key and value into
  slot j of position t (one block of the cache, written in place) and attends to the entries
  `history_mask` names: its own history, written by its ancestors in whatever slots they held.
  So when beam search reorders its hypotheses, the keys and values stay where they are; only
  the decoder's table of slots (`cache_slot` `[B*n, L]`, a few integers per hypothesis)
  follows them. Each query scores all n slots of every position, n times the scores it needs:
  at the paper's beam of 4 that costs far less than moving the cache (reading and writing all
  of it) at every step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import ConfigError
from jaxformer.tokens import PAD_ID

# ---------------------------------------------------------------------------------------------
# Masks: boolean, True = may attend, [B, 1, T, S].
# ---------------------------------------------------------------------------------------------


def pairwise_mask(query_valid: jnp.ndarray, key_valid: jnp.ndarray) -> jnp.ndarray:
  """Query `[B, T]` and key `[B, S]` booleans -> `[B, 1, T, S]`, True where both are True."""
  return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def padding_mask(query_ids: jnp.ndarray, key_ids: jnp.ndarray) -> jnp.ndarray:
  """Neither the query nor the key is padding: `[B, T]`, `[B, S]` ids -> `[B, 1, T, S]`."""
  return pairwise_mask(query_ids != PAD_ID, key_ids != PAD_ID)


def causal_mask(length: int) -> jnp.ndarray:
  """Position t may attend to positions <= t only: `[1, 1, T, T]`."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def segment_mask(query_segments: jnp.ndarray, key_segments: jnp.ndarray) -> jnp.ndarray:
  """In a packed row, a query attends only within its own sequence: `[B, 1, T, S]`."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def encoder_self_mask(ids: jnp.ndarray, segments: jnp.ndarray | None = None) -> jnp.ndarray:
  """Encoder self-attention over source ids `[B, S]`: `[B, 1, S, S]`."""
  mask = padding_mask(ids, ids)
  if segments is not None:
    mask &= segment_mask(segments, segments)
  return mask


def decoder_self_mask(ids: jnp.ndarray, segments: jnp.ndarray | None = None) -> jnp.ndarray:
  """Masked decoder self-attention over decoder inputs `[B, T]`: `[B, 1, T, T]`."""
  mask = padding_mask(ids, ids) & causal_mask(ids.shape[-1])
  if segments is not None:
    mask &= segment_mask(segments, segments)
  return mask


def cross_mask(target_ids: jnp.ndarray, source_ids: jnp.ndarray,
               target_segments: jnp.ndarray | None = None,
               source_segments: jnp.ndarray | None = None) -> jnp.ndarray:
  """Decoder positions `[B, T]` attending to the encoder output `[B, S]`: `[B, 1, T, S]`."""
  mask = padding_mask(target_ids, source_ids)
  if target_segments is not None and source_segments is not None:
    mask &= segment_mask(target_segments, source_segments)
  return mask


def source_key_mask(source_ids: jnp.ndarray) -> jnp.ndarray:
  """Every query may attend to every real source token: `[B, 1, 1, S]` (decoding steps)."""
  return (source_ids != PAD_ID)[:, None, None, :]


def history_mask(slots: jnp.ndarray, index: jnp.ndarray, hypotheses: int) -> jnp.ndarray:
  """What each of n hypotheses per sentence sees in the self-attention cache at step `index`.

  `slots` `[B*n, L]`: row b*n + j says, for each position p, the slot whose entry at p holds
  hypothesis j's key and value (written by it or by an ancestor). Hypothesis j sees slot s at
  position p iff p <= index and slots[b*n + j, p] == s: `[B, 1, n, L*n]`, the entries ordered
  position-major (p*n + s) as the cache lies. With n = 1: the positions <= index.
  """
  rows, length = slots.shape
  own = slots[:, :, None] == jnp.arange(hypotheses)                   # [B*n, L, n]
  written = (jnp.arange(length) <= index)[None, :, None]               # [1, L, 1]
  return (own & written).reshape(rows // hypotheses, 1, hypotheses, length * hypotheses)


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------

# Masked scores are this fraction of the most negative finite value of their dtype (as JAX does):
# far below any real score, with room left so that nothing added to it overflows.
MASK_FILL_FRACTION = 0.7


def masked_fill_value(dtype: Any) -> float:
  """The score given to masked pairs: very negative yet finite in `dtype`.

  Not -inf: a fully masked row (a source that is all padding) would give 0/0 = NaN in softmax.
  Not a fixed -1e9: it overflows in float16. A row whose scores all equal this value gets a
  uniform (finite, ignored) distribution instead.
  """
  return float(jnp.finfo(dtype).min) * MASK_FILL_FRACTION


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
  """softmax over the last axis of float32 scores `[B, H, T, S]`, masked pairs given no weight."""
  if mask is not None:
    scores = jnp.where(mask, scores, masked_fill_value(scores.dtype))
  return jax.nn.softmax(scores, axis=-1)


def attention_weights(query: jnp.ndarray, key: jnp.ndarray,
                      mask: jnp.ndarray | None) -> jnp.ndarray:
  """softmax(Q K^T / sqrt(K)) per head, in float32.

  Queries `[B, T, H, K]`, keys `[B, S, H, K]`, mask `[B, 1, T, S]` -> weights `[B, H, T, S]`.
  """
  depth = query.shape[-1]
  scores = jnp.einsum("bthk,bshk->bhts", query, key, preferred_element_type=jnp.float32)
  return masked_softmax(scores / np.sqrt(depth).astype(np.float32), mask)


def cached_attention(query: jnp.ndarray, key_t: jnp.ndarray, value: jnp.ndarray,
                     mask: jnp.ndarray) -> jnp.ndarray:
  """Attention over cached keys and values (decoding), in the cache's layout: queries
  `[B, H, T, K]`, transposed keys `[B, H, K, S]`, values `[B, H, S, K]`, mask `[B, 1, T, S]`
  -> `[B, H, T, K]`. No dropout, nothing recorded."""
  depth = query.shape[-1]
  scores = jnp.einsum("bhtk,bhks->bhts", query, key_t, preferred_element_type=jnp.float32)
  weights = masked_softmax(scores / np.sqrt(depth).astype(np.float32), mask)
  return jnp.einsum("bhts,bhsk->bhtk", weights.astype(value.dtype), value)


def heads_first(x: jnp.ndarray) -> jnp.ndarray:
  """Projections `[B, S, H, K]` in the cache's layout of values and queries: `[B, H, S, K]`."""
  return jnp.swapaxes(x, 1, 2)


def keys_transposed(x: jnp.ndarray) -> jnp.ndarray:
  """Key projections `[B, S, H, K]` in the cache's layout of keys: `[B, H, K, S]`."""
  return jnp.transpose(x, (0, 2, 3, 1))


# cuDNN's fused attention takes these compute dtypes and head sizes (multiples of 8, up to 128).
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
FUSED_MAX_HEAD_DIM, FUSED_HEAD_DIM_MULTIPLE = 128, 8


def use_fused_kernel(config: Any, query: jnp.ndarray) -> bool:
  """Whether attention runs cuDNN's fused kernel (`model.attention_kernel`).

  'cudnn' always (a ConfigError where cuDNN refuses it); 'xla' never; 'auto' on a GPU when
  the compute dtype is bfloat16 or float16 and the head size suits the kernel (and falls back
  to the einsums if cuDNN still refuses while tracing). Any mask is allowed: cuDNN adds it as
  a bias.
  """
  kernel = config.attention_kernel
  if kernel != "auto":
    return kernel == "cudnn"
  depth = query.shape[-1]
  return (jax.default_backend() == "gpu" and query.dtype in FUSED_DTYPES
          and depth <= FUSED_MAX_HEAD_DIM and depth % FUSED_HEAD_DIM_MULTIPLE == 0)


# Decoding modes of an attention module (see the module docstring).
FULL, INIT_CACHE, STEP = "full", "init_cache", "step"


class MultiHeadAttention(nn.Module):
  """Multi-head attention with kernels `[D, H, K]` (Q, K, V) and `[H, K, D]` (output).

  Attributes:
    config: the model config (d_model, num_heads, attention_bias, attention_dropout_rate, dtype).
    cross: cross-attention (keys and values from the encoder output) rather than self-attention;
      decides what the cache holds.
  """
  config: Any
  cross: bool = False

  @nn.compact
  def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray | None,
               mask: jnp.ndarray | None, deterministic: bool = True,
               mode: str = FULL, index: jnp.ndarray | None = None) -> jnp.ndarray | None:
    """Attention of `inputs_q` `[B, T, D]` over `inputs_kv` `[B, S, D]`: `[B, T, D]`.

    mode 'full': all positions at once. 'init_cache': creates this module's cache (self:
    empty, `inputs_q` `[B, L*n, D]` gives its shape, L positions of n slots; cross: keys and
    values of `inputs_kv`) and returns None. 'step': self: `inputs_q` is one position of each
    hypothesis `[B*n, 1, D]`, written at position `index` (a scalar), `inputs_kv` is ignored
    and `mask` is `history_mask`'s `[B, 1, n, L*n]`; cross: `inputs_kv` is ignored, `mask` is
    `[B, 1, 1, S]`.
    """
    cfg = self.config
    heads, depth = cfg.num_heads, cfg.d_model // cfg.num_heads
    dense = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                 use_bias=cfg.attention_bias, kernel_init=nn.initializers.xavier_uniform())
    project_query = nn.DenseGeneral(features=(heads, depth), axis=-1, name="query", **dense)
    project_key = nn.DenseGeneral(features=(heads, depth), axis=-1, name="key", **dense)
    project_value = nn.DenseGeneral(features=(heads, depth), axis=-1, name="value", **dense)
    project_out = nn.DenseGeneral(features=cfg.d_model, axis=(-2, -1), name="out", **dense)

    if mode == INIT_CACHE:
      if self.cross:
        self.variable("cache", "cross_key", lambda: keys_transposed(project_key(inputs_kv)))
        self.variable("cache", "cross_value", lambda: heads_first(project_value(inputs_kv)))
      else:
        (batch, entries), dtype = inputs_q.shape[:2], jnp.dtype(cfg.dtype)
        self.variable("cache", "cached_key", jnp.zeros, (batch, heads, depth, entries), dtype)
        self.variable("cache", "cached_value", jnp.zeros, (batch, heads, entries, depth), dtype)
      return None

    query = project_query(inputs_q)                                  # [B, T, H, K]
    if mode == STEP and self.cross:
      out = self._cross_attend_cached(query, mask)
    elif mode == STEP:
      out = self._self_attend_cached(query, project_key(inputs_q), project_value(inputs_q),
                                     mask, index)
    else:
      key, value = project_key(inputs_kv), project_value(inputs_kv)  # [B, S, H, K]
      out = self._attend(query, key, value, mask, deterministic, fused_ok=True)
    return project_out(out)                                          # [B, T, D]

  def _attend(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
              mask: jnp.ndarray | None, deterministic: bool, fused_ok: bool = False
              ) -> jnp.ndarray:
    """The per-head core: `[B, T, H, K]`, `[B, S, H, K]` x2, mask `[B, 1, T, S]` -> `[B, T, H, K]`.

    With `fused_ok` (all positions at once, not a decoding step), runs cuDNN's fused kernel
    when `use_fused_kernel` says so and the weights themselves are not needed: for attention
    dropout in training, or to record them in the 'intermediates' collection (under
    'attention_weights', `[B, H, T, S]`) when it is mutable. Otherwise the einsums below, which
    XLA compiles at least as fast as `jax.nn.dot_product_attention`'s own XLA path on CPU
    (benchmarks/RESULTS.md).
    """
    record = self.is_mutable_collection("intermediates")
    dropout = not deterministic and self.config.attention_dropout_rate > 0.0
    if fused_ok and not (record or dropout) and use_fused_kernel(self.config, query):
      try:
        return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                            implementation="cudnn")
      except (RuntimeError, ValueError, NotImplementedError) as e:  # cuDNN refused (tracing).
        if self.config.attention_kernel == "cudnn":
          raise ConfigError(f"model.attention_kernel='cudnn' cannot run here ({e}); use "
                            "'auto' or 'xla'") from e
        # 'auto': the einsums below.
    weights = attention_weights(query, key, mask)
    if record:
      self.sow("intermediates", "attention_weights", weights)
    weights = nn.Dropout(rate=self.config.attention_dropout_rate)(
        weights, deterministic=deterministic)
    return jnp.einsum("bhts,bshk->bthk", weights.astype(value.dtype), value)

  def _self_attend_cached(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                          mask: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """One position of each hypothesis `[B*n, 1, H, K]`: writes its key and value into its slot
    of position `index`, then attends to its history (`mask` `[B, 1, n, L*n]`)."""
    cached_key = self.variable("cache", "cached_key")      # [B, H, K, L*n]
    cached_value = self.variable("cache", "cached_value")  # [B, H, L*n, K]
    batch, (rows, _, heads, depth) = cached_key.value.shape[0], query.shape
    hypotheses = rows // batch
    # The n hypotheses of sentence b are n queries of row b, as in cross-attention; their n
    # slots of position `index` are entries index*n .. index*n + n-1, one block of the cache.
    def by_sentence(x: jnp.ndarray) -> jnp.ndarray:  # [B*n, 1, H, K] -> [B, n, H, K]
      return x.reshape(batch, hypotheses, heads, depth)

    start = index * hypotheses
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, keys_transposed(by_sentence(key)).astype(cached_key.value.dtype),
        (0, 0, 0, start))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, heads_first(by_sentence(value)).astype(cached_value.value.dtype),
        (0, 0, start, 0))
    out = cached_attention(heads_first(by_sentence(query)), cached_key.value,
                           cached_value.value, mask)                  # [B, H, n, K]
    return heads_first(out).reshape(rows, 1, heads, depth)

  def _cross_attend_cached(self, query: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Queries `[B*n, T, H, K]` over the cached encoder keys and values.

    The n hypotheses of sentence b (rows b*n .. b*n + n-1) become n*T queries of row b, so they
    share that sentence's keys and values. `mask` is `[B, 1, 1, S]`.
    """
    key_t = self.variable("cache", "cross_key").value                # [B, H, K, S]
    value = self.variable("cache", "cross_value").value              # [B, H, S, K]
    batch, (rows, length, heads, depth) = key_t.shape[0], query.shape
    query = query.reshape(batch, (rows // batch) * length, heads, depth)
    out = cached_attention(heads_first(query), key_t, value, mask)   # [B, H, n*T, K]
    return heads_first(out).reshape(rows, length, heads, depth)
