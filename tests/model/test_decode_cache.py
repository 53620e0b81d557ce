"""Cached one-position-at-a-time decoding equals the teacher-forced pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model.transformer import Transformer, shift_right
from model_testing import init_params, random_ids, tiny_config


def decode_with_cache(model, params, inputs, decoder_inputs, hypotheses=1):
  """Runs init_cache then decode_step per position; returns logits `[B*n, T, V]`."""
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  length = decoder_inputs.shape[1]
  _, variables = model.apply({"params": params}, encoded, inputs, length,
                             method=Transformer.init_cache, mutable=["cache"])
  cache = variables["cache"]
  if hypotheses > 1:  # Tile the self-attention cache only, as a beam search would.
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "cross" in jax.tree_util.keystr(path)
        else jnp.repeat(x, hypotheses, axis=0), cache)
  step = jax.jit(lambda cache, ids: model.apply(
      {"params": params, "cache": cache}, ids, inputs, method=Transformer.decode_step,
      mutable=["cache"]))
  outs = []
  for t in range(length):
    logits, variables = step(cache, decoder_inputs[:, t:t + 1])
    cache = variables["cache"]
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_decoding_equals_teacher_forcing(pos_encoding, norm):
  config = tiny_config(pos_encoding=pos_encoding, norm=norm)
  rng = np.random.RandomState(0)
  inputs = random_ids(rng, (2, 7), config.vocab_size, lengths=[7, 4])
  targets = random_ids(rng, (2, 6), config.vocab_size, lengths=[4, 6])
  model, params = init_params(config, inputs, targets)
  expected = model.apply({"params": params}, inputs, targets)
  got = decode_with_cache(model, params, inputs, shift_right(targets))
  real = np.asarray(targets != 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real],
                             rtol=1e-5, atol=1e-5)
