"""The Transformer's masking behaviour, shift-right and packing (its configuration errors are
tests/test_config.py's: the model trusts a validated config)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model.transformer import Transformer, shift_right
from jaxformer.tokens import BOS_ID, PAD_ID

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       tiny_config)


def test_shift_right_plain_and_packed():
  targets = jnp.array([[5, 6, 7, 0], [8, 9, 10, 11]])
  np.testing.assert_array_equal(shift_right(targets),
                                [[BOS_ID, 5, 6, PAD_ID], [BOS_ID, 8, 9, 10]])
  packed = jnp.array([[5, 6, 7, 8, 9, 0, 0]])
  segments = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
  # Each packed sequence starts with its own BOS, never the previous sequence's last token.
  np.testing.assert_array_equal(shift_right(packed, segments),
                                [[BOS_ID, 5, BOS_ID, 7, 8, PAD_ID, PAD_ID]])


def test_what_sits_at_padded_source_positions_changes_no_real_logit():
  cfg = tiny_config(share_embeddings=False, tie_output=False)
  rng = np.random.RandomState(0)
  source = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[6, 2])
  target = random_ids(rng, TARGET_SHAPE, cfg.vocab_size, lengths=[5, 3])
  model, params = init_params(cfg)
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
  source = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[6, 4])
  target = random_ids(rng, TARGET_SHAPE, cfg.vocab_size)
  model, params = init_params(cfg)
  apply = lambda tgt: model.apply({"params": params}, source, tgt)
  logits = np.asarray(apply(target))
  length = target.shape[1]
  for t in (0, 1, 2):
    future = random_ids(rng, (2, length - t - 1), cfg.vocab_size)
    changed = target.at[:, t + 1:].set(jnp.where(future == target[:, t + 1:], 4, future))
    other = np.asarray(apply(changed))
    # Logits at t+1 see targets <= t only (shift right), so the first change shows at t+2.
    np.testing.assert_allclose(other[:, :t + 2], logits[:, :t + 2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, t + 2:], logits[:, t + 2:], atol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_packed_rows_equal_the_sequences_run_separately(pos_encoding):
  """Sequences a (source 3, target 3) and b (source 2, target 2), packed as [a|b] and [b|a]."""
  cfg = tiny_config(pos_encoding=pos_encoding)
  rng = np.random.RandomState(0)
  src = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[3, 2])   # rows: a, b
  tgt = random_ids(rng, TARGET_SHAPE, cfg.vocab_size, lengths=[3, 2])
  model, params = init_params(cfg)
  alone = model.apply({"params": params}, src, tgt)                      # [2, 5, V]
  a_src, b_src, a_tgt, b_tgt = src[0, :3], src[1, :2], tgt[0, :3], tgt[1, :2]
  pad = jnp.zeros((1,), jnp.int32)
  inputs = jnp.stack([jnp.concatenate([a_src, b_src, pad]), jnp.concatenate([b_src, a_src, pad])])
  targets = jnp.stack([jnp.concatenate([a_tgt, b_tgt]), jnp.concatenate([b_tgt, a_tgt])])
  inputs_segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 0]])
  inputs_positions = jnp.array([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 0]])
  targets_segments = jnp.array([[1, 1, 1, 2, 2], [1, 1, 2, 2, 2]])
  targets_positions = jnp.array([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
  packed = model.apply({"params": params}, inputs, targets, inputs_positions, targets_positions,
                       inputs_segments, targets_segments)
  check = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  check(packed[0, :3], alone[0, :3])
  check(packed[0, 3:], alone[1, :2])
  check(packed[1, :2], alone[1, :2])
  check(packed[1, 2:], alone[0, :3])
