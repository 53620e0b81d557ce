"""Token embeddings and positional encodings (Vaswani et al. 2017, sections 3.4 and 3.5).

A token id becomes a D-dimensional vector by a table lookup, multiplied by sqrt(D) so that it has
about the same scale as the positional encoding added to it. The same table, transposed, can
turn the decoder's output back into one score per vocabulary entry (`TokenEmbedding.attend`),
which is how the paper ties the pre-softmax projection to the embeddings.

Attention has no notion of order, so each position p gets a vector added to its token
embedding: either the paper's fixed sinusoids,

    PE[p, 2i]     = sin(p / 10000^(2i / D))
    PE[p, 2i + 1] = cos(p / 10000^(2i / D)),

(sin at even dimensions, cos at the odd dimension next to it), or a learned `[max_len, D]` table.
Marian and fairseq lay the same sinusoids out 'half' and half: sin(angle i) at dimension i and
cos(angle i) at dimension D/2 + i (`model.sinusoid_layout`), which a model imported from them
keeps. The two layouts are one permutation of the dimensions apart (`half_layout_order`).
Positions are passed in explicitly when a row holds several packed sequences (each restarts at 0)
or when decoding one position at a time.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxformer.errors import InputError

# The base of the sinusoids' geometric progression of wavelengths (the paper's 10000).
SINUSOID_BASE = 10000.0
# Standard deviation of the learned positional table at initialisation.
LEARNED_POSITION_INIT_STDDEV = 0.02


def half_layout_order(d_model: int) -> np.ndarray:
  """The interleaved dimensions in half/half order, `[D]`: 0, 2, 4, ..., 1, 3, 5, ...

  `interleaved_table[:, order]` is the half/half table; `np.argsort(order)` goes back.
  """
  return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def sinusoidal_table(max_len: int, d_model: int, layout: str = "interleaved") -> np.ndarray:
  """The paper's positional encodings for positions 0..max_len-1: float32 `[max_len, D]`.

  'interleaved': column 2i holds sin(p / 10000^(2i/D)) and column 2i+1 holds cos of the same
  angle. 'half': column i holds that sin and column D/2 + i that cos.
  """
  positions = np.arange(max_len, dtype=np.float64)[:, None]            # [L, 1]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]          # [1, D/2]
  angles = positions / np.power(SINUSOID_BASE, two_i / d_model)       # [L, D/2]
  table = np.zeros((max_len, d_model), dtype=np.float64)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles)
  if layout == "half":
    table = table[:, half_layout_order(d_model)]
  return table.astype(np.float32)


def check_length(length: int, max_len: int, what: str) -> None:
  """Raises InputError when a sequence of `length` positions does not fit `model.max_len`."""
  if length > max_len:
    raise InputError(f"{what} has {length} positions but model.max_len={max_len}; shorten the "
                     "sequences (data.max_len) or raise model.max_len")


def default_positions(ids: jnp.ndarray) -> jnp.ndarray:
  """Positions 0, 1, ... of every row of `ids` `[B, L]` (one sequence per row): `[B, L]`."""
  return jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)


class TokenEmbedding(nn.Module):
  """Token ids `[B, L]` -> vectors `[B, L, D]` scaled by sqrt(D); `attend` is the transpose."""
  config: Any

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.d_model,
        # Unit-variance vectors after the sqrt(D) scale.
        embedding_init=nn.initializers.normal(stddev=cfg.d_model ** -0.5),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)

  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    x = self.embed(ids)
    return x * jnp.asarray(np.sqrt(self.config.d_model), x.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    """Scores against every vocabulary entry: `[B, T, D]` @ table^T -> `[B, T, V]`."""
    return self.embed.attend(x)


class PositionalEncoding(nn.Module):
  """The vectors `[B, L, D]` to add at `positions` `[B, L]`: sinusoidal or learned."""
  config: Any

  @nn.compact
  def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    check_length(positions.shape[-1], cfg.max_len, "a sequence")
    if cfg.pos_encoding == "sinusoidal":
      table = jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model, cfg.sinusoid_layout))
    else:  # 'learned'
      table = self.param("pos_embedding",
                         nn.initializers.normal(stddev=LEARNED_POSITION_INIT_STDDEV),
                         (cfg.max_len, cfg.d_model), jnp.float32)
    return jnp.take(table, positions, axis=0).astype(jnp.dtype(cfg.dtype))
