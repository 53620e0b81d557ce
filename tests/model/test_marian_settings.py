"""The model settings that Marian (HF MarianMT, Opus-MT) models need: the swish activation, a
bias on the tied logits, the LayerNorm epsilon and the half/half sinusoid layout. Each checked
against a NumPy computation of what it should do; the defaults are the paper's model, which
the other model tests check unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model import transformer
from jaxformer.model.embedding import PositionalEncoding, half_layout_order, sinusoidal_table

from tests.model import model_testing


def test_swish_is_x_times_sigmoid_x_in_the_feed_forward():
  config = model_testing.tiny_config(activation="swish")
  x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 3, 32)), jnp.float32)
  ff = transformer.FeedForward(config)
  params = ff.init(jax.random.PRNGKey(0), x)["params"]
  h = x @ params["inner"]["kernel"] + params["inner"]["bias"]
  expected = (h / (1 + np.exp(-h))) @ params["outer"]["kernel"] + params["outer"]["bias"]
  np.testing.assert_allclose(ff.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-6, 1e-2])
def test_layer_norm_adds_the_configured_epsilon_to_the_variance(epsilon):
  config = model_testing.tiny_config(layer_norm_epsilon=epsilon)
  x = 0.01 * jnp.asarray(np.random.RandomState(1).standard_normal((2, 32)), jnp.float32)
  norm = transformer.layer_norm(config, "norm")
  params = norm.init(jax.random.PRNGKey(0), x)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(norm.apply(params, x), (x - mean) / np.sqrt(var + epsilon),
                             rtol=1e-4, atol=1e-5)


def test_final_logits_bias_is_added_to_the_tied_logits():
  with_bias = model_testing.tiny_config(final_logits_bias=True)
  model, params = model_testing.init_params(with_bias)
  plain = model_testing.tiny_config()
  assert "logits_bias" not in model_testing.random_params(plain)["decoder"]
  bias = params["decoder"]["logits_bias"]
  assert bias.shape == (with_bias.vocab_size,)
  rng = np.random.RandomState(2)
  inputs = model_testing.random_ids(rng, model_testing.SOURCE_SHAPE, with_bias.vocab_size)
  targets = model_testing.random_ids(rng, model_testing.TARGET_SHAPE, with_bias.vocab_size)
  without = dict(params, decoder={k: v for k, v in params["decoder"].items()
                                  if k != "logits_bias"})
  logits = model.apply({"params": params}, inputs, targets)
  base = transformer.Transformer(plain).apply({"params": without}, inputs, targets)
  np.testing.assert_allclose(logits, base + bias, rtol=1e-6, atol=1e-6)


def test_half_layout_puts_sin_in_the_first_half_and_cos_in_the_second():
  d_model, p = 8, 3
  half = sinusoidal_table(10, d_model, "half")
  for i in range(d_model // 2):
    angle = p / 10000 ** (2 * i / d_model)
    np.testing.assert_allclose(half[p, i], np.sin(angle), rtol=1e-6)
    np.testing.assert_allclose(half[p, d_model // 2 + i], np.cos(angle), rtol=1e-6)
  interleaved = sinusoidal_table(10, d_model)
  np.testing.assert_array_equal(half, interleaved[:, half_layout_order(d_model)])
  np.testing.assert_array_equal(half[:, np.argsort(half_layout_order(d_model))], interleaved)


def test_positional_encoding_uses_the_configured_layout():
  config = model_testing.tiny_config(sinusoid_layout="half")
  positions = jnp.arange(5)[None]
  out = PositionalEncoding(config).apply({}, positions)
  np.testing.assert_array_equal(out[0], sinusoidal_table(16, 32, "half")[:5])
