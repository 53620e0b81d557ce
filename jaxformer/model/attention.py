"""Multi-head attention (Vaswani et al. 2017, section 3.2), its masks, and its decoding cache.

Masks are boolean, True = may attend, shaped `[B, 1, T, S]` (the 1 broadcasts over heads). Every
mask of the model is built by the functions of the first section and nowhere else.

`MultiHeadAttention` projects queries, keys and values into H heads of K = D / H dimensions,
computes softmax(Q K^T / sqrt(K)) V in every head, and projects the H results back to D. While
decoding it keeps keys and values in the 'cache' collection:

- self-attention writes this step's key and value at position `cache_index` `[B*n]` (one per
  row) of `cached_key` and `cached_value` `[B*n, H, L, K]` (L = the longest decode) and attends
  to the positions <= that index;
- cross-attention projects the encoder output to keys and values once per sentence (mode
  'init_cache') into `cross_key` and `cross_value` `[B, H, S, K]`; every step then only projects
  its queries.

The cache keeps each head's keys and values together (heads before positions): a step's
attention is then a batched matrix product over the cache as it lies in memory, where the
`[.., L, H, K]` layout of the projections would be transposed, whole, at every step. With n hypotheses per sentence (beam search), the n queries of sentence b attend
  to sentence b's keys and values, which are never copied n times.

Every cache entry has its batch on axis 0. `init_cache` makes the self-attention entries with
batch B; a beam search repeats them n times along axis 0 (and reorders them by beam), and leaves
the cross-attention entries alone.
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


def cached_positions_mask(cache_index: jnp.ndarray, cache_length: int) -> jnp.ndarray:
  """One decoding step at `cache_index` `[B]` sees cached positions <= index: `[B, 1, 1, L]`."""
  return (jnp.arange(cache_length) <= cache_index[:, None])[:, None, None, :]


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


def attention_weights(query: jnp.ndarray, key: jnp.ndarray, mask: jnp.ndarray | None,
                      heads_first: bool = False) -> jnp.ndarray:
  """softmax(Q K^T / sqrt(K)) per head, in float32.

  Queries `[B, T, H, K]`, keys `[B, S, H, K]` (or `[B, H, S, K]` with `heads_first`, the cache's
  layout), mask `[B, 1, T, S]` -> weights `[B, H, T, S]`.
  """
  depth = query.shape[-1]
  keys = "bhsk" if heads_first else "bshk"
  scores = jnp.einsum(f"bthk,{keys}->bhts", query, key, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(depth).astype(np.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, masked_fill_value(scores.dtype))
  return jax.nn.softmax(scores, axis=-1)


def heads_first(x: jnp.ndarray) -> jnp.ndarray:
  """A projection `[B, S, H, K]` in the cache's layout `[B, H, S, K]`."""
  return jnp.swapaxes(x, 1, 2)


def cached_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                     mask: jnp.ndarray) -> jnp.ndarray:
  """Attention over cached keys and values (decoding): queries `[B, T, H, K]`, keys and values
  `[B, H, S, K]`, mask `[B, 1, T, S]` -> `[B, T, H, K]`. No dropout, nothing recorded."""
  weights = attention_weights(query, key, mask, heads_first=True)
  return jnp.einsum("bhts,bhsk->bthk", weights.astype(value.dtype), value)


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
               mode: str = FULL) -> jnp.ndarray | None:
    """Attention of `inputs_q` `[B, T, D]` over `inputs_kv` `[B, S, D]`: `[B, T, D]`.

    mode 'full': all positions at once. 'init_cache': creates this module's cache (self:
    empty, `inputs_q` `[B, L, D]` gives its shape; cross: keys and values of `inputs_kv`) and
    returns None. 'step': self: `inputs_q` is one position `[B*n, 1, D]`, `inputs_kv` and `mask`
    are ignored (the cache gives them); cross: `inputs_kv` is ignored, `mask` is `[B, 1, 1, S]`.
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
        self.variable("cache", "cross_key", lambda: heads_first(project_key(inputs_kv)))
        self.variable("cache", "cross_value", lambda: heads_first(project_value(inputs_kv)))
      else:
        batch, length = inputs_q.shape[:2]
        shape, dtype = (batch, heads, length, depth), jnp.dtype(cfg.dtype)
        self.variable("cache", "cached_key", jnp.zeros, shape, dtype)
        self.variable("cache", "cached_value", jnp.zeros, shape, dtype)
        self.variable("cache", "cache_index", jnp.zeros, (batch,), jnp.int32)
      return None

    query = project_query(inputs_q)                                  # [B, T, H, K]
    if mode == STEP and self.cross:
      out = self._cross_attend_cached(query, mask)
    elif mode == STEP:
      out = self._self_attend_cached(query, project_key(inputs_q), project_value(inputs_q))
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

  def _self_attend_cached(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray
                          ) -> jnp.ndarray:
    """One position `[B*n, 1, H, K]`: appends its key/value, attends to the cache so far."""
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    index = cache_index.value                                         # [B*n]
    length = cached_key.value.shape[2]
    # Write this step's key and value at position `index` of each row (an elementwise select,
    # cheaper than a scatter on every backend).
    here = (jnp.arange(length) == index[:, None])[:, None, :, None]  # [B*n, 1, L, 1]
    cached_key.value = jnp.where(here, heads_first(key), cached_key.value)
    cached_value.value = jnp.where(here, heads_first(value), cached_value.value)
    cache_index.value = index + 1
    mask = cached_positions_mask(index, length)
    return cached_attention(query, cached_key.value, cached_value.value, mask)

  def _cross_attend_cached(self, query: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Queries `[B*n, T, H, K]` over the cached encoder keys/values `[B, H, S, K]`.

    The n hypotheses of sentence b (rows b*n .. b*n + n-1) become n*T queries of row b, so they
    share that sentence's keys and values. `mask` is `[B, 1, 1, S]`.
    """
    key = self.variable("cache", "cross_key").value
    value = self.variable("cache", "cross_value").value
    batch, (rows, length, heads, depth) = key.shape[0], query.shape
    query = query.reshape(batch, (rows // batch) * length, heads, depth)
    out = cached_attention(query, key, value, mask)
    return out.reshape(rows, length, heads, depth)
