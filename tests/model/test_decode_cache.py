"""Cached one-position-at-a-time decoding equals the teacher-forced pass.

Each case decodes inside `jax.jit` and `lax.scan` (as a beam search would), with n hypotheses
per sentence sharing their sentence's cross-attention keys and values, and with the
cross-attention key/value projections removed from the parameters the steps see: so a step
that recomputed them from the encoder output would fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decode
from jaxformer.model.transformer import Transformer, shift_right
from jaxformer.tokens import BOS_ID, PAD_ID

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       tiny_config)

HYPOTHESIS_ENTRIES = {"cache_slot"}  # one row per hypothesis: tiled (and reordered) by a search
SHARED_ENTRIES = {"cached_key", "cached_value", "cache_index", "cross_key", "cross_value"}


def entry_name(path) -> str:
  return path[-1].key


def without_cross_projections(params):
  """The parameters minus every cross-attention key and value projection."""
  def prune(tree):
    if not isinstance(tree, dict):
      return tree
    if "cross_attention" in tree:
      tree = dict(tree)
      tree["cross_attention"] = {k: v for k, v in tree["cross_attention"].items()
                                 if k not in ("key", "value")}
    return {k: prune(v) for k, v in tree.items()}
  return prune(params)


def init_cache(model, params, inputs, length, hypotheses):
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  _, variables = model.apply({"params": params}, encoded, inputs, length, hypotheses,
                             method=Transformer.init_cache, mutable=["cache"])
  return variables["cache"]


def decode_with_cache(model, params, inputs, decoder_inputs, hypotheses):
  """init_cache, then decode_step once per position inside lax.scan, all in one jit.

  Returns the logits `[B*n, T, V]` of `decoder_inputs` `[B*n, T]` (n = `hypotheses`).
  """
  @jax.jit
  def run(params, inputs, decoder_inputs):
    cache = init_cache(model, params, inputs, decoder_inputs.shape[1], hypotheses)
    # Tile the per-hypothesis entries only, as a beam search does.
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.repeat(x, hypotheses, axis=0)
        if entry_name(path) in HYPOTHESIS_ENTRIES else x, cache)
    step_params = without_cross_projections(params)

    def step(cache, ids):  # ids [B*n]
      logits, variables = model.apply({"params": step_params, "cache": cache}, ids[:, None],
                                      inputs, method=Transformer.decode_step, mutable=["cache"])
      return variables["cache"], logits[:, 0]
    _, logits = jax.lax.scan(step, cache, decoder_inputs.T)          # [T, B*n, V]
    return logits.transpose(1, 0, 2)
  return run(params, inputs, decoder_inputs)


CASES = [  # both encodings x both norms; n = 1 and 2; unrolled and scanned layers
    dict(pos_encoding="sinusoidal", norm="post", hypotheses=1, scan_layers=False),
    dict(pos_encoding="sinusoidal", norm="pre", hypotheses=2, scan_layers=True),
    dict(pos_encoding="learned", norm="post", hypotheses=2, scan_layers=False),
    dict(pos_encoding="learned", norm="pre", hypotheses=1, scan_layers=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cached_decoding_equals_teacher_forcing(case):
  case = dict(case)
  n = case.pop("hypotheses")
  config = tiny_config(**case)
  rng = np.random.RandomState(0)
  inputs = random_ids(rng, SOURCE_SHAPE, config.vocab_size, lengths=[6, 3])
  batch, length = TARGET_SHAPE
  # Row b*n + j: hypothesis j of sentence b; some end early (padding after them).
  targets = random_ids(rng, (batch * n, length), config.vocab_size,
                       lengths=[length - (r % 3) for r in range(batch * n)])
  model, params = init_params(config)

  cache = jax.eval_shape(lambda: init_cache(model, params, inputs, length, n))
  entries = jax.tree_util.tree_leaves_with_path(cache)
  assert {entry_name(p) for p, _ in entries} == HYPOTHESIS_ENTRIES | SHARED_ENTRIES
  for path, leaf in entries:  # batch B on axis 0 (the position is one scalar for all rows)
    name = entry_name(path)
    assert leaf.shape[:1] == (() if name == "cache_index" else (batch,)), name
    if name in ("cached_key", "cached_value"):  # room for n hypotheses, never tiled by n
      assert length * n in leaf.shape[-2:], name

  got = decode_with_cache(model, params, inputs, shift_right(targets), n)
  # Teacher forcing of the same hypotheses, each with its sentence's source.
  expected = jax.jit(model.apply)({"params": params}, jnp.repeat(inputs, n, axis=0), targets)
  real = np.asarray(targets != PAD_ID)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real],
                             rtol=1e-5, atol=1e-5)


def test_reordered_hypotheses_attend_to_their_own_history():
  """Beam search moves hypotheses between rows at every step, through decode's reorder rule
  (only the slot table moves): each row's logits still equal teacher forcing of the tokens
  that row's hypothesis has, in whatever slots its ancestors' keys and values were written."""
  config = tiny_config(pos_encoding="sinusoidal", norm="post")
  n, (batch, length) = 3, TARGET_SHAPE
  rng = np.random.RandomState(1)
  inputs = random_ids(rng, SOURCE_SHAPE, config.vocab_size, lengths=[6, 3])
  model, params = init_params(config)
  cache = jax.jit(init_cache, static_argnums=(0, 3, 4))(model, params, inputs, length, n)
  cache = decode.reorder_decoder_cache(cache, jnp.repeat(jnp.arange(batch), n))

  @jax.jit
  def step(cache, ids):  # ids [B*n]
    logits, variables = model.apply({"params": params, "cache": cache}, ids[:, None], inputs,
                                    method=Transformer.decode_step, mutable=["cache"])
    return variables["cache"], logits[:, 0]

  history = np.zeros((batch * n, 0), np.int32)  # the tokens fed so far, per row
  ids = np.full((batch * n,), BOS_ID, np.int32)
  for t in range(length):
    if t > 0:  # each row continues a random hypothesis of its sentence with a random token
      rows = np.concatenate([b * n + rng.randint(0, n, size=n) for b in range(batch)])
      history, cache = history[rows], decode.reorder_decoder_cache(cache, jnp.asarray(rows))
      ids = rng.randint(BOS_ID + 1, config.vocab_size, size=batch * n).astype(np.int32)
    history = np.concatenate([history, ids[:, None]], axis=1)
    cache, logits = step(cache, ids)

  # The last step attended to keys and values written in every slot: teacher forcing agrees.
  rows_inputs = jnp.repeat(inputs, n, axis=0)
  encoded = model.apply({"params": params}, rows_inputs, method=Transformer.encode)
  expected = model.apply({"params": params}, encoded, rows_inputs, jnp.asarray(history),
                         method=Transformer.decode)[:, -1]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
