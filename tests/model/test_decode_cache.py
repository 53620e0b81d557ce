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


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hypotheses_share_the_cross_attention_cache(scan_layers):
  """n = 2 hypotheses per sentence: rows b*n + j, cross keys/values of batch B only."""
  config = tiny_config(scan_layers=scan_layers, norm="pre")
  rng = np.random.RandomState(1)
  inputs = random_ids(rng, (2, 5), config.vocab_size, lengths=[5, 3])
  hypotheses = random_ids(rng, (4, 4), config.vocab_size)      # [B*n, T], n = 2
  model, params = init_params(config, inputs, hypotheses[:2])
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  _, variables = model.apply({"params": params}, encoded, inputs, 4,
                             method=Transformer.init_cache, mutable=["cache"])
  leaves = jax.tree_util.tree_leaves_with_path(variables["cache"])
  for path, leaf in leaves:  # every entry has its batch B on axis 0
    assert leaf.shape[0] == 2, jax.tree_util.keystr(path)
  names = {jax.tree_util.keystr(path).split("'")[-2] for path, _ in leaves}
  assert names == {"cached_key", "cached_value", "cache_index", "cross_key", "cross_value"}

  got = decode_with_cache(model, params, inputs, shift_right(hypotheses), hypotheses=2)
  # The same hypotheses with each sentence's source copied, teacher-forced.
  expected = model.apply({"params": params}, jnp.repeat(inputs, 2, axis=0), hypotheses)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_keys_are_computed_once():
  """decode_step reads the encoder's keys/values from the cache and never projects them."""
  config = tiny_config()
  rng = np.random.RandomState(2)
  inputs = random_ids(rng, (1, 5), config.vocab_size)
  model, params = init_params(config, inputs, random_ids(rng, (1, 3), config.vocab_size))
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  _, variables = model.apply({"params": params}, encoded, inputs, 3,
                             method=Transformer.init_cache, mutable=["cache"])
  # Cross key/value projections absent from the params: decode_step must still work.
  pruned = jax.tree_util.tree_map(lambda x: x, params)
  for i in range(config.num_layers):
    del pruned["decoder"][f"layers_{i}"]["cross_attention"]["key"]
    del pruned["decoder"][f"layers_{i}"]["cross_attention"]["value"]
  ids = jnp.array([[2]])
  logits, _ = model.apply({"params": pruned, "cache": variables["cache"]}, ids, inputs,
                          method=Transformer.decode_step, mutable=["cache"])
  full, _ = model.apply({"params": params, "cache": variables["cache"]}, ids, inputs,
                        method=Transformer.decode_step, mutable=["cache"])
  np.testing.assert_array_equal(logits, full)
