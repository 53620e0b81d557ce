"""Tests of jaxformer/attention_maps.py: the weights it returns are the model's own.

Expectations come from outside the code under test: the translation from the same beam search
run here, the weights from the model applied here directly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import attention_maps, decode
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID

from tests import tiny_run_testing
from tests.model.model_testing import stack_layers
from tests.tiny_run_testing import NUM_HEADS, NUM_LAYERS, TEXT, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_run_testing.number_tokenizer()


@pytest.fixture(scope="module")
def run():
  """(config, params) of the tiny model."""
  config = tiny_config()
  return config, tiny_run_testing.init_params(config)


@pytest.fixture(scope="module")
def maps(run, tokenizer):
  """attention_maps of TEXT with the tiny model and its config's decoding settings."""
  config, params = run
  d = config.decode
  return attention_maps.attention_maps(Transformer(config=config.model), params, tokenizer, TEXT,
                                       beam_size=d.beam_size, alpha=d.alpha,
                                       max_extra_len=d.max_extra_len)


@functools.partial(jax.jit, static_argnames="model")
def teacher_forced(model, params, source, target):
  """The model's logits and sown attention weights for one pair, as the model gives them."""
  return model.apply({"params": params}, source, target, mutable=["intermediates"])


def test_attention_weights_are_the_models_own(run, maps, tokenizer):
  config, params = run
  model = Transformer(config=config.model)
  source = tokenizer.encode(TEXT) + [EOS_ID]
  assert maps.source_pieces == [tokenizer.id_to_piece(i) for i in source]
  assert maps.source_ids.tolist() == source
  # The translation: the same beam search, run here.
  d = config.decode
  result = decode.decode_batch(model, params, np.array([source]), beam_size=d.beam_size,
                               alpha=d.alpha, max_extra_len=d.max_extra_len)
  target = np.asarray(result.tokens[0, 0, :int(result.lengths[0, 0])])
  assert maps.target_pieces == [tokenizer.id_to_piece(i) for i in target]
  assert maps.target_ids.tolist() == target.tolist()
  assert maps.decoder_input_pieces == ["<s>"] + maps.target_pieces[:-1]
  # The model's own weights, from a teacher-forced pass run here.
  _, state = teacher_forced(model, params, jnp.array([source]), jnp.array([target]))
  sown = state["intermediates"]
  for i in range(NUM_LAYERS):
    layer = f"layers_{i}"
    np.testing.assert_allclose(
        maps.cross[i], sown["decoder"][layer]["cross_attention"]["attention_weights"][0][0],
        atol=1e-6)
    np.testing.assert_allclose(
        maps.encoder_self[i], sown["encoder"][layer]["self_attention"]["attention_weights"][0][0],
        atol=1e-6)
    np.testing.assert_allclose(
        maps.decoder_self[i], sown["decoder"][layer]["self_attention"]["attention_weights"][0][0],
        atol=1e-6)
  assert maps.cross.shape == (NUM_LAYERS, NUM_HEADS, len(target), len(source))
  # Probabilities over the keys: non-negative, summing to 1 over the source axis.
  assert (maps.cross >= 0).all()
  np.testing.assert_allclose(maps.cross.sum(axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(maps.encoder_self.sum(axis=-1), 1.0, atol=1e-5)
  # Masked decoder self-attention: nothing above the diagonal.
  above = np.triu(np.ones((len(target), len(target)), bool), k=1)
  assert (maps.decoder_self[:, :, above] == 0).all()


def test_scanned_layers_sow_the_same_weights(run, maps):
  config, params = run
  source, target = maps.source_ids[None], maps.target_ids[None]
  _, unrolled = teacher_forced(Transformer(config=config.model), params, source, target)
  scanned_model = Transformer(config=tiny_config(scan_layers=True).model)
  _, scanned = teacher_forced(scanned_model, stack_layers(params, NUM_LAYERS), source, target)
  for stack, module in (("encoder", "self_attention"), ("decoder", "self_attention"),
                        ("decoder", "cross_attention")):
    layers = [unrolled["intermediates"][stack][f"layers_{i}"][module]["attention_weights"][0][0]
              for i in range(NUM_LAYERS)]
    np.testing.assert_array_equal(
        attention_maps.sown_weights(unrolled["intermediates"][stack], module), np.stack(layers))
    np.testing.assert_allclose(
        attention_maps.sown_weights(scanned["intermediates"][stack], module), np.stack(layers),
        atol=1e-6)
