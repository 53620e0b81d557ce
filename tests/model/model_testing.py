"""Tiny model configs and batches shared by the model tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer.config import get_default_config
from jaxformer.model.transformer import Transformer

TINY = dict(vocab_size=40, num_layers=2, d_model=32, num_heads=4, d_ff=48, max_len=16,
            dropout_rate=0.0)


def tiny_config(**overrides) -> ml_collections.FrozenConfigDict:
  """The model section of the default config, shrunk to a test size, with `overrides`."""
  config = get_default_config().model
  config.update({**TINY, **overrides})
  return ml_collections.FrozenConfigDict(config)


def random_ids(rng: np.random.RandomState, shape, vocab_size: int, lengths=None) -> jnp.ndarray:
  """Random real token ids (>= 4, never a special id), padded with 0 after `lengths[b]`."""
  ids = rng.randint(4, vocab_size, size=shape)
  if lengths is not None:
    for b, length in enumerate(lengths):
      ids[b, length:] = 0
  return jnp.asarray(ids, jnp.int32)


def init_params(config, inputs, targets, seed: int = 0):
  model = Transformer(config)
  return model, model.init(jax.random.PRNGKey(seed), inputs, targets)["params"]
