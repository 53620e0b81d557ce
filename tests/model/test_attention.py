"""Masks, the attention core, recorded attention weights, and low-precision safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model import attention
from jaxformer.model.transformer import Transformer

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       tiny_config)


# --- Masks against brute force. ----------------------------------------------------------------

def test_causal_mask():
  mask = np.asarray(attention.causal_mask(5))
  assert mask.shape == (1, 1, 5, 5) and mask.dtype == bool
  for t in range(5):
    for s in range(5):
      assert mask[0, 0, t, s] == (s <= t)


def test_padding_segment_and_combined_masks():
  q_ids = jnp.array([[5, 6, 0], [7, 0, 0]])
  k_ids = jnp.array([[5, 0, 6, 0], [0, 8, 9, 9]])
  q_seg = jnp.array([[1, 2, 0], [1, 0, 0]])
  k_seg = jnp.array([[1, 0, 2, 0], [0, 1, 1, 1]])
  pad = np.asarray(attention.padding_mask(q_ids, k_ids))
  seg = np.asarray(attention.segment_mask(q_seg, k_seg))
  cross = np.asarray(attention.cross_mask(q_ids, k_ids, q_seg, k_seg))
  assert pad.shape == seg.shape == cross.shape == (2, 1, 3, 4)
  for b in range(2):
    for t in range(3):
      for s in range(4):
        real = bool(q_ids[b, t] != 0 and k_ids[b, s] != 0)
        same = bool(q_seg[b, t] == k_seg[b, s])
        assert pad[b, 0, t, s] == real
        assert seg[b, 0, t, s] == same
        assert cross[b, 0, t, s] == (real and same)


def test_decoder_self_mask_is_padding_and_causal_and_segment():
  ids = jnp.array([[2, 5, 2, 7, 0]])
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(attention.decoder_self_mask(ids, seg))[0, 0]
  for t in range(5):
    for s in range(5):
      expected = s <= t and ids[0, t] != 0 and ids[0, s] != 0 and seg[0, t] == seg[0, s]
      assert mask[t, s] == expected


def test_history_mask_is_each_hypothesis_own_slots_up_to_the_step():
  n, index = 3, 2
  slots = jnp.array([[0, 2, 1, 0],    # sentence 0, hypotheses 0-2: the slot of each position
                     [1, 1, 1, 2],
                     [0, 0, 2, 1],
                     [2, 0, 0, 0]] + [[0, 0, 0, 0]] * 2)  # sentence 1
  mask = np.asarray(attention.history_mask(slots, jnp.int32(index), n))
  assert mask.shape == (2, 1, n, 4 * n) and mask.dtype == bool
  for b in range(2):
    for j in range(n):
      for p in range(4):
        for s in range(n):  # entry p*n + s: slot s at position p
          expected = p <= index and int(slots[b * n + j, p]) == s
          assert mask[b, 0, j, p * n + s] == expected, (b, j, p, s)


def test_masked_fill_value_is_finite_and_far_below_scores():
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    fill = jnp.asarray(attention.masked_fill_value(dtype), dtype)
    assert np.isfinite(float(fill)) and float(fill) < -1e4


def test_fully_masked_row_gives_finite_weights():
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.standard_normal((1, 2, 2, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
  mask = jnp.zeros((1, 1, 2, 3), bool)
  weights = attention.attention_weights(q, k, mask)
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


# --- The model with padding, bfloat16 and recorded weights. ----------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("record", [False, True])
def test_fully_padded_source_row_is_finite(dtype, record):
  cfg = tiny_config(dtype=dtype)
  rng = np.random.RandomState(0)
  source = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[6, 0])  # row 1: all padding
  target = random_ids(rng, TARGET_SHAPE, cfg.vocab_size, lengths=[5, 0])
  model, params = init_params(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  if record:
    logits, _ = model.apply({"params": params}, source, target, mutable=["intermediates"])
  else:
    logits = model.apply({"params": params}, source, target)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_bfloat16_compute_is_close_to_float32():
  rng = np.random.RandomState(0)
  source = random_ids(rng, SOURCE_SHAPE, 40, lengths=[6, 3])
  target = random_ids(rng, TARGET_SHAPE, 40, lengths=[5, 2])
  model32, params = init_params(tiny_config())
  logits32 = model32.apply({"params": params}, source, target)
  logits16 = Transformer(tiny_config(dtype="bfloat16")).apply({"params": params}, source, target)
  assert logits16.dtype == jnp.float32
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.1 * scale


def test_recorded_attention_weights_are_masked_distributions():
  cfg = tiny_config()
  rng = np.random.RandomState(0)
  source = random_ids(rng, SOURCE_SHAPE, cfg.vocab_size, lengths=[6, 4])
  target = random_ids(rng, TARGET_SHAPE, cfg.vocab_size, lengths=[5, 3])
  model, params = init_params(cfg)
  fused = model.apply({"params": params}, source, target)
  logits, state = model.apply({"params": params}, source, target, mutable=["intermediates"])
  # The einsum path (which records weights) and the fused path give the same logits.
  np.testing.assert_allclose(logits, fused, rtol=1e-5, atol=1e-5)
  inter = state["intermediates"]
  (enc,) = inter["encoder"]["layers_1"]["self_attention"]["attention_weights"]
  (dec,) = inter["decoder"]["layers_0"]["self_attention"]["attention_weights"]
  (cross,) = inter["decoder"]["layers_1"]["cross_attention"]["attention_weights"]
  assert enc.shape == (2, cfg.num_heads, 6, 6)
  assert dec.shape == (2, cfg.num_heads, 5, 5)
  assert cross.shape == (2, cfg.num_heads, 5, 6)
  np.testing.assert_allclose(np.sum(enc, -1), 1.0, rtol=1e-5)
  # No weight on padded source keys (row 1 has 4 real tokens), none on future targets.
  assert np.all(np.asarray(enc)[1, :, :4, 4:] == 0) and np.all(np.asarray(cross)[1, :, :3, 4:] == 0)
  future = np.triu(np.ones((5, 5), bool), k=1)
  assert np.all(np.asarray(dec)[0][:, future] == 0)  # row 0: every target is real


def test_nothing_is_recorded_unless_intermediates_is_mutable():
  cfg = tiny_config()
  rng = np.random.RandomState(0)
  source, target = random_ids(rng, SOURCE_SHAPE, 40), random_ids(rng, TARGET_SHAPE, 40)
  model, params = init_params(cfg)
  _, state = model.apply({"params": params}, source, target, mutable=["cache"])
  assert not state  # nothing went into any collection
  _, state = model.apply({"params": params}, source, target, mutable=["intermediates"])
  assert "intermediates" in state


def test_attention_dropout_acts_only_in_training():
  rng = np.random.RandomState(0)
  source = random_ids(rng, SOURCE_SHAPE, 40, lengths=[6, 4])
  target = random_ids(rng, TARGET_SHAPE, 40, lengths=[5, 3])
  model, params = init_params(tiny_config(attention_dropout_rate=0.5))
  plain = Transformer(tiny_config()).apply({"params": params}, source, target)
  det = model.apply({"params": params}, source, target, deterministic=True)
  np.testing.assert_array_equal(det, plain)
  drop = jax.jit(lambda seed: model.apply({"params": params}, source, target,
                                          deterministic=False,
                                          rngs={"dropout": jax.random.PRNGKey(seed)}))
  assert not np.allclose(drop(0), plain, atol=1e-3)
  np.testing.assert_array_equal(drop(0), drop(0))
  assert not np.allclose(drop(0), drop(1), atol=1e-3)


def test_kernel_shapes_per_head():
  cfg = tiny_config()
  _, params = init_params(cfg)
  mha = params["decoder"]["layers_0"]["cross_attention"]
  heads, depth = cfg.num_heads, cfg.d_model // cfg.num_heads
  for name in ("query", "key", "value"):
    assert mha[name]["kernel"].shape == (cfg.d_model, heads, depth)
    assert mha[name]["bias"].shape == (heads, depth)
  assert mha["out"]["kernel"].shape == (heads, depth, cfg.d_model)
  _, no_bias = init_params(tiny_config(attention_bias=False))
  assert set(no_bias["encoder"]["layers_0"]["self_attention"]["query"]) == {"kernel"}
