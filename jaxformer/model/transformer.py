"""The encoder-decoder Transformer (Vaswani et al. 2017, section 3 and figure 1).

    source ids [B, S] -> Encoder -> encoded [B, S, D] ----------------.
                                                                       v
    target ids [B, T] -> shift right -> Decoder (masked self-attention, cross-attention,
                                                 feed-forward) x N -> logits [B, T, V]

Each layer wraps every sub-layer in a residual connection with layer normalisation, placed as
`config.norm` says:

    'post' (the paper):  x = LayerNorm(x + Dropout(Sublayer(x)))
    'pre':               x = x + Dropout(Sublayer(LayerNorm(x)))   (+ a final LayerNorm per stack)

The decoder runs in one of three modes: 'full' (all positions at once, teacher forcing),
'init_cache' (creates the decoding cache, see attention.py) and 'step' (one new position per
call, reading and extending the cache).

`config.scan_layers` runs each stack with `nn.scan` (one compiled layer, weights stacked on a
leading axis of N) and `config.remat` recomputes each layer's activations in the backward pass
('full') or keeps only its weight matmuls ('dots'); neither changes the numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.model import attention
from jaxformer.model.attention import FULL, INIT_CACHE, STEP, MultiHeadAttention
from jaxformer.model.embedding import (PositionalEncoding, TokenEmbedding, check_length,
                                       default_positions)
from jaxformer.tokens import BOS_ID, PAD_ID

# nn.gelu is the tanh approximation (HF's 'gelu_new'); swish is SiLU, x * sigmoid(x).
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "swish": nn.swish}
# The name of each stack's layers in the parameter tree: `layers` (scanned, a leading axis of N)
# or `layers_0` .. `layers_{N-1}` (unrolled).
LAYERS = "layers"
# What each layer keeps for the backward pass under `model.remat` (None: recompute everything).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def shift_right(targets: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
  """Decoder inputs for teacher forcing: `[B, T]` -> `[B, T]`.

  Position t gets target t-1, and the first position of every sequence gets BOS, so the decoder
  predicts target t having seen targets < t. In a packed row each sequence (a run of equal
  segment ids) starts with its own BOS instead of the previous sequence's last token. Padded
  target positions get padding.
  """
  previous = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=BOS_ID)[:, :-1]
  if segment_ids is not None:
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                     constant_values=True)
    previous = jnp.where(starts, BOS_ID, previous)
  return jnp.where(targets != PAD_ID, previous, PAD_ID)


def layer_norm(config: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=jnp.dtype(config.dtype),
                      param_dtype=jnp.float32, name=name)


def dense(config: Any, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32,
                  kernel_init=nn.initializers.xavier_uniform(), name=name)


def residual(config: Any, x: jnp.ndarray, sublayer: Callable[[jnp.ndarray], jnp.ndarray],
             norm: nn.LayerNorm, deterministic: bool) -> jnp.ndarray:
  """One sub-layer with its residual connection, dropout and LayerNorm (post or pre)."""
  dropout = nn.Dropout(rate=config.dropout_rate)
  if config.norm == "post":
    return norm(x + dropout(sublayer(x), deterministic=deterministic))
  return x + dropout(sublayer(norm(x)), deterministic=deterministic)


class FeedForward(nn.Module):
  """Position-wise feed-forward network: Dense(F), ReLU (or GELU, swish), dropout, Dense(D)."""
  config: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    cfg = self.config
    h = ACTIVATIONS[cfg.activation](dense(cfg, cfg.d_ff, "inner")(x))       # [B, L, F]
    h = nn.Dropout(rate=cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg, cfg.d_model, "outer")(h)                            # [B, L, D]


class EncoderLayer(nn.Module):
  """Self-attention over the source, then feed-forward. `[B, S, D]` -> `[B, S, D]`."""
  config: Any
  deterministic: bool = True
  scanned: bool = False  # under nn.scan: return (x, None).

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray):
    cfg, det = self.config, self.deterministic
    attend = MultiHeadAttention(cfg, name="self_attention")
    feed_forward = FeedForward(cfg, name="feed_forward")
    x = residual(cfg, x, lambda y: attend(y, y, mask, det),
                 layer_norm(cfg, "self_attention_norm"), det)
    x = residual(cfg, x, lambda y: feed_forward(y, det), layer_norm(cfg, "feed_forward_norm"), det)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Masked self-attention, cross-attention over the encoder output, feed-forward.

  `[B, T, D]` -> `[B, T, D]` in 'full' mode; one position `[B*n, 1, D]` in 'step' mode, at
  position `index` (masks are then built from the cache, and `encoded` is not used: its keys
  and values are cached).
  """
  config: Any
  deterministic: bool = True
  mode: str = FULL
  scanned: bool = False  # under nn.scan: return (x, None).

  @nn.compact
  def __call__(self, x: jnp.ndarray, encoded: jnp.ndarray | None,
               self_mask: jnp.ndarray | None, cross_mask: jnp.ndarray,
               index: jnp.ndarray | None = None):
    cfg, det = self.config, self.deterministic
    self_attention = MultiHeadAttention(cfg, name="self_attention")
    cross_attention = MultiHeadAttention(cfg, cross=True, name="cross_attention")
    feed_forward = FeedForward(cfg, name="feed_forward")
    if self.mode == INIT_CACHE:
      self_attention(x, None, None, mode=INIT_CACHE)
      cross_attention(x, encoded, None, mode=INIT_CACHE)
    else:
      x = residual(cfg, x, lambda y: self_attention(y, y, self_mask, det, self.mode, index),
                   layer_norm(cfg, "self_attention_norm"), det)
      x = residual(cfg, x, lambda y: cross_attention(y, encoded, cross_mask, det, self.mode),
                   layer_norm(cfg, "cross_attention_norm"), det)
      x = residual(cfg, x, lambda y: feed_forward(y, det), layer_norm(cfg, "feed_forward_norm"),
                   det)
    return (x, None) if self.scanned else x


def layer_stack(layer_cls: type[nn.Module], config: Any, name: str, remat: bool = True,
                **attributes) -> Callable[..., jnp.ndarray]:
  """N layers of `layer_cls` with distinct weights, as one function `x, *args -> x`.

  Must be called inside a compact method. Unrolled, the layers are named `{name}_0` ..
  `{name}_{N-1}`; with `config.scan_layers` they are one scanned module `{name}` whose
  parameters and recorded attention weights have a leading axis of N, while its cache entries
  keep the batch on axis 0 and put the layers on axis 1 (so that a beam search can treat every
  cache entry alike).
  """
  if remat and config.remat != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat],
                         prevent_cse=not config.scan_layers)
  if config.scan_layers:
    scanned = nn.scan(layer_cls,
                      variable_axes={"params": 0, "intermediates": 0, "cache": 1},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=config.num_layers)
    stack = scanned(config, scanned=True, name=name, **attributes)
    return lambda x, *args: stack(x, *args)[0]
  layers = [layer_cls(config, name=f"{name}_{i}", **attributes)
            for i in range(config.num_layers)]

  def run(x, *args):
    for layer in layers:
      x = layer(x, *args)
    return x
  return run


def embed_with_positions(config: Any, embedding: TokenEmbedding, ids: jnp.ndarray,
                         positions: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
  """Dropout(token embedding * sqrt(D) + positional encoding): `[B, L]` -> `[B, L, D]`."""
  x = embedding(ids) + PositionalEncoding(config, name="positions")(positions)
  return nn.Dropout(rate=config.dropout_rate)(x, deterministic=deterministic)


class Encoder(nn.Module):
  """Source ids `[B, S]` -> encoded `[B, S, D]`."""
  config: Any
  embedding: TokenEmbedding

  @nn.compact
  def __call__(self, ids: jnp.ndarray, positions: jnp.ndarray | None = None,
               segment_ids: jnp.ndarray | None = None, deterministic: bool = True):
    cfg = self.config
    check_length(ids.shape[-1], cfg.max_len, "the source")
    positions = default_positions(ids) if positions is None else positions
    x = embed_with_positions(cfg, self.embedding, ids, positions, deterministic)
    mask = attention.encoder_self_mask(ids, segment_ids)
    x = layer_stack(EncoderLayer, cfg, LAYERS, deterministic=deterministic)(x, mask)
    if cfg.norm == "pre":
      x = layer_norm(cfg, "final_norm")(x)
    return x


class Decoder(nn.Module):
  """Decoder inputs `[B, T]` and the encoder output `[B, S, D]` -> logits `[B, T, V]` (float32).

  `project=False` stops before the output projection and returns the final hidden states
  `[B, T, D]` (compute dtype): the training loss projects them block by block itself
  (jaxformer.objective.projected_loss_sums, with the parameters of `output_projection`).
  """
  config: Any
  embedding: TokenEmbedding

  @nn.compact
  def __call__(self, encoded: jnp.ndarray | None, source_ids: jnp.ndarray,
               decoder_inputs: jnp.ndarray, positions: jnp.ndarray | None = None,
               source_segment_ids: jnp.ndarray | None = None,
               target_segment_ids: jnp.ndarray | None = None,
               deterministic: bool = True, mode: str = FULL, project: bool = True):
    cfg = self.config
    check_length(decoder_inputs.shape[-1], cfg.max_len, "the target")
    layers = layer_stack(DecoderLayer, cfg, LAYERS, remat=mode == FULL,
                         deterministic=deterministic, mode=mode)
    index = None  # 'step': the position of this step, the same for every row.
    if mode == INIT_CACHE:
      rows, length = decoder_inputs.shape  # [B*n, L]: room for n hypotheses per sentence.
      batch = source_ids.shape[0]
      self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
      self.variable("cache", "cache_slot", jnp.zeros, (batch, length), jnp.int32)
      # Each self-attention cache holds L positions of n slots; [B, L*n, D] gives its shape.
      layers(jnp.zeros((batch, length * (rows // batch), cfg.d_model), jnp.dtype(cfg.dtype)),
             encoded, None, None)
      return None
    if mode == STEP:
      index, self_mask = self._next_step(decoder_inputs.shape[0], source_ids.shape[0])
      positions = jnp.full(decoder_inputs.shape, index)               # [B*n, 1]
      cross_mask = attention.source_key_mask(source_ids)
    else:
      positions = default_positions(decoder_inputs) if positions is None else positions
      self_mask = attention.decoder_self_mask(decoder_inputs, target_segment_ids)
      cross_mask = attention.cross_mask(decoder_inputs, source_ids, target_segment_ids,
                                        source_segment_ids)
    x = embed_with_positions(cfg, self.embedding, decoder_inputs, positions, deterministic)
    x = layers(x, encoded, self_mask, cross_mask, index)
    if cfg.norm == "pre":
      x = layer_norm(cfg, "final_norm")(x)
    if not project and not self.is_initializing():  # init still creates the projection's params
      return x
    if cfg.tie_output:
      logits = self.embedding.attend(x)
      if cfg.final_logits_bias:
        logits = logits + self.param("logits_bias", nn.initializers.zeros, (cfg.vocab_size,),
                                     jnp.float32).astype(logits.dtype)
    else:
      logits = dense(cfg, cfg.vocab_size, "logits")(x)
    return logits.astype(jnp.float32)

  def _next_step(self, rows: int, batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The position of this step (a scalar, the same for every row) and its self-attention
    mask `[B, 1, n, L*n]` (attention.history_mask), for `rows` = B*n hypotheses.

    Records that each hypothesis writes this position into its own slot, and advances the
    position.
    """
    cache_index = self.variable("cache", "cache_index")  # [] the position this step writes.
    cache_slot = self.variable("cache", "cache_slot")    # [B*n, L]
    index, hypotheses = cache_index.value, rows // batch
    own_slot = jnp.arange(rows, dtype=jnp.int32)[:, None] % hypotheses     # [B*n, 1]
    cache_slot.value = jax.lax.dynamic_update_slice(cache_slot.value, own_slot, (0, index))
    cache_index.value = index + 1
    return index, attention.history_mask(cache_slot.value, index, hypotheses)


class Transformer(nn.Module):
  """The encoder-decoder Transformer. `config` is the model section of the config (frozen).

  The config is trusted as it is: `jaxformer.config.validate_model` checks it (a run's config
  always passes `config.validate`).
  """
  config: Any

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      self.shared_embedding = TokenEmbedding(cfg)
      source_embedding = target_embedding = self.shared_embedding
    else:
      self.source_embedding = TokenEmbedding(cfg)
      self.target_embedding = TokenEmbedding(cfg)
      source_embedding, target_embedding = self.source_embedding, self.target_embedding
    self.encoder = Encoder(cfg, source_embedding)
    self.decoder = Decoder(cfg, target_embedding)

  def __call__(self, inputs: jnp.ndarray, targets: jnp.ndarray,
               inputs_positions: jnp.ndarray | None = None,
               targets_positions: jnp.ndarray | None = None,
               inputs_segment_ids: jnp.ndarray | None = None,
               targets_segment_ids: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Teacher forcing: source `[B, S]` and target `[B, T]` ids -> logits `[B, T, V]` float32.

    Logits at position t predict `targets[:, t]` from the source and the targets before t.
    """
    encoded = self.encode(inputs, inputs_positions, inputs_segment_ids, deterministic)
    decoder_inputs = shift_right(targets, targets_segment_ids)
    return self.decode(encoded, inputs, decoder_inputs, targets_positions, inputs_segment_ids,
                       targets_segment_ids, deterministic)

  def encode(self, inputs: jnp.ndarray, inputs_positions: jnp.ndarray | None = None,
             inputs_segment_ids: jnp.ndarray | None = None,
             deterministic: bool = True) -> jnp.ndarray:
    """Source ids `[B, S]` -> encoded `[B, S, D]` (compute dtype)."""
    return self.encoder(inputs, inputs_positions, inputs_segment_ids, deterministic)

  def hidden_states(self, inputs: jnp.ndarray, targets: jnp.ndarray,
                    inputs_positions: jnp.ndarray | None = None,
                    targets_positions: jnp.ndarray | None = None,
                    inputs_segment_ids: jnp.ndarray | None = None,
                    targets_segment_ids: jnp.ndarray | None = None,
                    deterministic: bool = True) -> jnp.ndarray:
    """`__call__` without the output projection: the decoder's last hidden states `[B, T, D]`
    (compute dtype). `output_projection(params, config)` gives the projection that `__call__`
    would apply to them."""
    encoded = self.encode(inputs, inputs_positions, inputs_segment_ids, deterministic)
    decoder_inputs = shift_right(targets, targets_segment_ids)
    return self.decoder(encoded, inputs, decoder_inputs, targets_positions, inputs_segment_ids,
                        targets_segment_ids, deterministic, FULL, project=False)

  def decode(self, encoded: jnp.ndarray, inputs: jnp.ndarray, decoder_inputs: jnp.ndarray,
             targets_positions: jnp.ndarray | None = None,
             inputs_segment_ids: jnp.ndarray | None = None,
             targets_segment_ids: jnp.ndarray | None = None,
             deterministic: bool = True) -> jnp.ndarray:
    """Logits `[B, T, V]` (float32) of shifted decoder inputs `[B, T]` given the encoded source
    `[B, S, D]` and its ids `[B, S]` (for the padding mask)."""
    return self.decoder(encoded, inputs, decoder_inputs, targets_positions, inputs_segment_ids,
                        targets_segment_ids, deterministic, FULL)

  def init_cache(self, encoded: jnp.ndarray, inputs: jnp.ndarray, max_decode_len: int,
                 hypotheses: int = 1) -> None:
    """Creates the decoding cache; apply with mutable=['cache'].

    `encoded` `[B, S, D]` and `inputs` `[B, S]` as from `encode`; `max_decode_len` (a Python int,
    <= model.max_len) is the most positions `decode_step` will be called for, with `hypotheses`
    (n) rows per sentence. The cross-attention keys and values of the encoder output
    ('cross_key', 'cross_value') are computed here, once. The self-attention caches
    ('cached_key', 'cached_value') have room for n hypotheses per sentence. The decoder's
    'cache_index' (a scalar: the next position) is shared by every row; its 'cache_slot' table
    (attention.history_mask) is the one entry with a row per hypothesis: it is made with batch
    B, and a beam search tiles it to B*n and reorders it (only it) with its hypotheses.
    """
    check_length(max_decode_len, self.config.max_len, "max_decode_len")
    dummy = jnp.zeros((inputs.shape[0] * hypotheses, max_decode_len), jnp.int32)
    self.decoder(encoded, inputs, dummy, mode=INIT_CACHE)

  def decode_step(self, token_ids: jnp.ndarray, inputs: jnp.ndarray) -> jnp.ndarray:
    """One decoding position: token ids `[B*n, 1]`, source ids `[B, S]` -> logits `[B*n, 1, V]`.

    Row b*n + j is hypothesis j of sentence b. Apply with mutable=['cache'].
    """
    return self.decoder(None, inputs, token_ids, mode=STEP)


def output_projection(params: Any, config: Any) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """The decoder's pre-softmax projection in `params`: (table `[V, D]`, bias `[V]` or None).

  logits = hidden @ table.T (+ bias), computed in the compute dtype: the target embedding when
  `config.tie_output` (with `final_logits_bias`'s bias, else none), else the transposed kernel
  and the bias of the `logits` Dense.
  """
  if not config.tie_output:
    dense_params = params["decoder"]["logits"]
    return dense_params["kernel"].T, dense_params["bias"]
  name = "shared_embedding" if config.share_embeddings else "target_embedding"
  bias = params["decoder"]["logits_bias"] if config.final_logits_bias else None
  return params[name]["embed"]["embedding"], bias
