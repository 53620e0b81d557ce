"""The Transformer's masking behaviour, shift-right, packing and configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.data.tokenizer import BOS_ID, PAD_ID
from jaxformer.errors import ConfigError
from jaxformer.model.transformer import Transformer, shift_right
from model_testing import init_params, random_ids, tiny_config


def test_shift_right_plain_and_packed():
  targets = jnp.array([[5, 6, 7, 0], [8, 9, 10, 11]])
  np.testing.assert_array_equal(shift_right(targets),
                                [[BOS_ID, 5, 6, PAD_ID], [BOS_ID, 8, 9, 10]])
  packed = jnp.array([[5, 6, 7, 8, 9, 0, 0]])
  segments = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
  # Each packed sequence starts with its own BOS, never the previous sequence's last token.
  np.testing.assert_array_equal(shift_right(packed, segments),
                                [[BOS_ID, 5, BOS_ID, 7, 8, PAD_ID, PAD_ID]])


def test_more_source_padding_changes_nothing():
  cfg = tiny_config()
  rng = np.random.RandomState(0)
  source = random_ids(rng, (2, 5), cfg.vocab_size, lengths=[5, 3])
  target = random_ids(rng, (2, 4), cfg.vocab_size, lengths=[4, 2])
  model, params = init_params(cfg, source, target)
  logits = model.apply({"params": params}, source, target)
  longer = jnp.pad(source, ((0, 0), (0, 3)))   # three more padded source positions
  other = model.apply({"params": params}, longer, target)
  real = np.asarray(target != PAD_ID)
  np.testing.assert_allclose(np.asarray(other)[real], np.asarray(logits)[real],
                             rtol=1e-5, atol=1e-5)


def test_what_sits_at_padded_source_positions_changes_no_real_logit():
  cfg = tiny_config(share_embeddings=False, tie_output=False)
  rng = np.random.RandomState(0)
  source = random_ids(rng, (2, 6), cfg.vocab_size, lengths=[6, 2])
  target = random_ids(rng, (2, 5), cfg.vocab_size, lengths=[5, 3])
  model, params = init_params(cfg, source, target)
  logits = np.asarray(model.apply({"params": params}, source, target))
  # The vector the encoder sees at padded positions: the pad token's embedding row.
  table = params["source_embedding"]["embed"]["embedding"]
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["source_embedding"]["embed"]["embedding"] = table.at[PAD_ID].set(
      rng.standard_normal(cfg.d_model) * 10)
  other = np.asarray(model.apply({"params": changed}, source, target))
  real = np.asarray(target != PAD_ID)
  np.testing.assert_allclose(other[real], logits[real], rtol=1e-5, atol=1e-5)
  # The encoder output at padded positions, as the decoder receives it.
  encoded = model.apply({"params": params}, source, method=Transformer.encode)
  noise = jnp.asarray(rng.standard_normal(encoded.shape), jnp.float32) * 10
  noisy = jnp.where((source == PAD_ID)[..., None], encoded + noise, encoded)
  decode = lambda enc: np.asarray(model.apply({"params": params}, enc, source,
                                              shift_right(target), method=Transformer.decode))
  np.testing.assert_allclose(decode(noisy)[real], logits[real], rtol=1e-5, atol=1e-5)
  assert not np.allclose(decode(encoded + noise)[real], logits[real], atol=1e-3)


def test_future_targets_do_not_change_earlier_logits():
  cfg = tiny_config(norm="pre")
  rng = np.random.RandomState(0)
  source = random_ids(rng, (2, 5), cfg.vocab_size, lengths=[5, 4])
  target = random_ids(rng, (2, 6), cfg.vocab_size)
  model, params = init_params(cfg, source, target)
  apply = jax.jit(lambda tgt: model.apply({"params": params}, source, tgt))
  logits = np.asarray(apply(target))
  for t in (0, 1, 3):
    changed = target.at[:, t + 1:].set(random_ids(rng, (2, 5 - t), cfg.vocab_size))
    other = np.asarray(apply(changed))
    # Logits at t+1 see targets <= t only (shift right), so the first change shows at t+2.
    np.testing.assert_allclose(other[:, :t + 2], logits[:, :t + 2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, t + 2:], logits[:, t + 2:], atol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_packed_row_equals_sequences_run_separately(pos_encoding):
  cfg = tiny_config(pos_encoding=pos_encoding)
  rng = np.random.RandomState(0)
  src_a, tgt_a = random_ids(rng, (1, 3), cfg.vocab_size), random_ids(rng, (1, 4), cfg.vocab_size)
  src_b, tgt_b = random_ids(rng, (1, 2), cfg.vocab_size), random_ids(rng, (1, 3), cfg.vocab_size)
  pad = lambda n: jnp.zeros((1, n), jnp.int32)
  inputs = jnp.concatenate([src_a, src_b, pad(2)], axis=1)                     # S = 7
  inputs_segments = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  inputs_positions = jnp.array([[0, 1, 2, 0, 1, 0, 0]])
  targets = jnp.concatenate([tgt_a, tgt_b, pad(1)], axis=1)                    # T = 8
  targets_segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  targets_positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  model, params = init_params(cfg, inputs, targets)
  packed = model.apply({"params": params}, inputs, targets, inputs_positions, targets_positions,
                       inputs_segments, targets_segments)
  alone_a = model.apply({"params": params}, src_a, tgt_a)
  alone_b = model.apply({"params": params}, src_b, tgt_b)
  np.testing.assert_allclose(packed[:, :4], alone_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:7], alone_b, rtol=1e-5, atol=1e-5)


BAD_SETTINGS = [
    (dict(d_model=30, num_heads=4), "model.d_model=30 is not divisible by model.num_heads=4"),
    (dict(pos_encoding="rotary"), "model.pos_encoding='rotary'.*'sinusoidal', 'learned'"),
    (dict(norm="sandwich"), "model.norm='sandwich'.*'post', 'pre'"),
    (dict(activation="swish"), "model.activation='swish'.*'relu', 'gelu'"),
    (dict(dtype="float16"), "model.dtype='float16'.*'float32', 'bfloat16'"),
    (dict(remat="some"), "model.remat='some'.*'none', 'full', 'dots'"),
    (dict(d_model=15, num_heads=5), "model.d_model=15 must be even"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
  with pytest.raises(ConfigError, match=message):
    Transformer(tiny_config(**settings))
