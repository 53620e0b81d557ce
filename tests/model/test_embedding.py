"""Token embeddings and positional encodings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.errors import JaxformerError
from jaxformer.model.embedding import PositionalEncoding, TokenEmbedding, sinusoidal_table
from jaxformer.model.transformer import Transformer

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       tiny_config)


def paper_pe(pos: int, dim: int, d_model: int) -> float:
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
  i = dim // 2
  angle = pos / 10000 ** (2 * i / d_model)
  return math.sin(angle) if dim % 2 == 0 else math.cos(angle)


def test_sinusoidal_table_matches_the_paper_at_chosen_positions():
  d_model = 512
  table = sinusoidal_table(100, d_model)
  assert table.shape == (100, d_model) and table.dtype == np.float32
  # Position 0: sin 0 = 0 at even dims, cos 0 = 1 at odd dims.
  np.testing.assert_array_equal(table[0, 0::2], 0.0)
  np.testing.assert_array_equal(table[0, 1::2], 1.0)
  # Position 1, dims 0-3, from the paper's formula worked out by hand.
  np.testing.assert_allclose(table[1, :4], [0.841471, 0.540302, 0.821856, 0.569695], atol=1e-6)
  for pos, dim in [(1, 0), (1, 1), (7, 10), (7, 11), (50, 100), (50, 101), (99, 510),
                   (99, 511), (3, 257)]:
    assert table[pos, dim] == pytest.approx(paper_pe(pos, dim, d_model), abs=1e-6)


def test_positional_encoding_follows_passed_positions():
  cfg = tiny_config(pos_encoding="sinusoidal")
  module = PositionalEncoding(cfg)
  positions = jnp.array([[0, 1, 2, 0, 1], [5, 3, 0, 0, 0]])
  out = module.apply({}, positions)
  assert out.shape == (2, 5, cfg.d_model)
  for b in range(2):
    for t in range(5):
      expected = [paper_pe(int(positions[b, t]), j, cfg.d_model) for j in range(cfg.d_model)]
      np.testing.assert_allclose(out[b, t], expected, atol=1e-6)


def test_learned_positions_are_a_trainable_table():
  cfg = tiny_config(pos_encoding="learned")
  module = PositionalEncoding(cfg)
  positions = jnp.array([[0, 3, 1]])
  variables = module.init(jax.random.PRNGKey(0), positions)
  table = np.asarray(variables["params"]["pos_embedding"])
  assert table.shape == (cfg.max_len, cfg.d_model)
  np.testing.assert_array_equal(module.apply(variables, positions)[0], table[[0, 3, 1]])
  grad = jax.grad(lambda p: module.apply({"params": p}, positions).sum())(variables["params"])
  used = np.zeros(cfg.max_len, bool)
  used[[0, 1, 3]] = True
  grad = np.asarray(grad["pos_embedding"])
  assert np.all(grad[used] == 1.0) and np.all(grad[~used] == 0)


def test_token_embedding_is_scaled_by_sqrt_d_and_attend_is_its_transpose():
  cfg = tiny_config()
  module = TokenEmbedding(cfg)
  ids = jnp.array([[4, 5, 0]])
  variables = module.init(jax.random.PRNGKey(0), ids)
  table = np.asarray(variables["params"]["embed"]["embedding"])
  assert table.shape == (cfg.vocab_size, cfg.d_model)
  np.testing.assert_allclose(module.apply(variables, ids)[0], table[[4, 5, 0]] *
                             math.sqrt(cfg.d_model), rtol=1e-6)
  x = np.random.RandomState(0).standard_normal((1, 2, cfg.d_model)).astype(np.float32)
  np.testing.assert_allclose(module.apply(variables, x, method=TokenEmbedding.attend),
                             x @ table.T, rtol=1e-5, atol=1e-5)


def test_shared_embeddings_use_one_table_and_separate_use_two():
  _, shared = init_params(tiny_config(share_embeddings=True))
  assert "shared_embedding" in shared and "source_embedding" not in shared
  _, separate = init_params(tiny_config(share_embeddings=False))
  assert "source_embedding" in separate and "target_embedding" in separate
  _, untied = init_params(tiny_config(tie_output=False))
  assert untied["decoder"]["logits"]["kernel"].shape == (32, 40)
  assert "logits" not in shared["decoder"]


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_sequences_longer_than_max_len_are_an_error(pos_encoding):
  cfg = tiny_config(pos_encoding=pos_encoding, max_len=8)
  model, params = init_params(cfg)
  rng = np.random.RandomState(0)
  ok_source, ok_target = random_ids(rng, SOURCE_SHAPE, 40), random_ids(rng, TARGET_SHAPE, 40)
  long = random_ids(rng, (2, 9), 40)
  for source, target, kwargs in [
      (long, ok_target, {}),
      (ok_source, long, {}),
      (ok_source, long, {"targets_positions": jnp.zeros((2, 9), jnp.int32)}),
  ]:
    with pytest.raises(JaxformerError, match="model.max_len"):
      model.apply({"params": params}, source, target, **kwargs)
  with pytest.raises(JaxformerError, match="model.max_len"):
    PositionalEncoding(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, 9), jnp.int32))
  encoded = model.apply({"params": params}, ok_source, method=Transformer.encode)
  with pytest.raises(JaxformerError, match="model.max_len"):
    model.apply({"params": params}, encoded, ok_source, 9, method=Transformer.init_cache,
                mutable=["cache"])
