"""Tests of jaxformer/decode.py.

The search algorithms are tested on toy step functions whose probabilities are recomputed here
in NumPy (float64) and searched by brute force or by a plain-Python beam search, so that every
expectation comes from outside the code under test.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxformer import decode
from jaxformer import devices as devices_lib
from jaxformer.config import get_default_config
from jaxformer.errors import InputError
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID

TOY_VOCAB = 6  # 0 PAD, 1 UNK, 2 BOS, 3 EOS, and two more words.
GENERATED = tuple(i for i in range(TOY_VOCAB) if i not in decode.NEVER_GENERATED)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_length_penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha  # The GNMT formula, written out independently.


class ToyRNN:
  """A tiny random recurrent decoder: h' = tanh(h W + E[token]), logits = h' U.

  Its state is the hidden vector of each row, so the search must reorder it by parent beam;
  each sentence b starts from its own random h0[b]. `eos_bias` makes EOS more likely.
  """

  def __init__(self, seed, batch, hidden=8, eos_bias=0.0):
    rng = np.random.default_rng(seed)
    self.embed = rng.normal(size=(TOY_VOCAB, hidden))
    self.w = rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)
    self.out = rng.normal(size=(hidden, TOY_VOCAB)) * 2.0
    self.bias = np.zeros(TOY_VOCAB)
    self.bias[EOS_ID] = eos_bias
    self.h0 = rng.normal(size=(batch, hidden))
    self.steps = 0  # decoder steps run, counted by a callback.

  def _count(self):
    self.steps += 1

  def step_fn(self, token_ids, h):
    jax.debug.callback(self._count)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    h = jnp.tanh(h @ f32(self.w) + f32(self.embed)[token_ids[:, 0]])
    return h @ f32(self.out) + f32(self.bias), h

  def init_state(self):
    return jnp.asarray(self.h0, jnp.float32)

  def np_step(self, h, token):
    """NumPy float64 reference of one step: (new h, log-probs [V])."""
    h = np.tanh(h @ self.w + self.embed[token])
    return h, np_log_softmax(h @ self.out + self.bias)


def enumerate_hypotheses(model, b, max_len, alpha):
  """Every sequence the search may return for sentence b (ending in EOS or at max_len), with
  its score, best first."""
  out = []

  def extend(prefix, h, log_p):
    h, log_probs = model.np_step(h, prefix[-1] if prefix else BOS_ID)
    for token in GENERATED:
      seq, lp = prefix + (token,), log_p + log_probs[token]
      if token == EOS_ID or len(seq) == max_len:
        out.append((seq, lp / np_length_penalty(len(seq), alpha)))
      else:
        extend(seq, h, lp)

  extend((), model.h0[b], 0.0)
  return sorted(out, key=lambda item: -item[1])


def reference_beam_search(model, b, max_len, beam_size, alpha):
  """Plain-Python beam search with the same rule, run to the end: the k most probable
  extensions survive each step; those ending in EOS or at max_len join the finished pool.

  Returns (the k best finished, best first; the step after which early stopping may end the
  search: the first at which nothing is live, or the pool is full and no live hypothesis can
  reach its worst score at any length it may still end with)."""
  live, finished, stop_step = [((), 0.0, model.h0[b])], [], None
  for t in range(max_len):
    candidates = []
    for seq, lp, h in live:
      h2, log_probs = model.np_step(h, seq[-1] if seq else BOS_ID)
      candidates += [(seq + (tok,), lp + log_probs[tok], h2) for tok in GENERATED]
    candidates = sorted(candidates, key=lambda c: -c[1])[:beam_size]
    live = []
    for seq, lp, h in candidates:
      if seq[-1] == EOS_ID or t + 1 == max_len:
        finished.append((seq, lp / np_length_penalty(t + 1, alpha)))
      else:
        live.append((seq, lp, h))
    finished = sorted(finished, key=lambda item: -item[1])[:beam_size]
    best_possible = max((lp / np_length_penalty(n, alpha) for _, lp, _ in live
                         for n in range(t + 2, max_len + 1)), default=-np.inf)
    if stop_step is None and (not live or (len(finished) == beam_size and
                                           finished[-1][1] >= best_possible)):
      stop_step = t + 1
    if not live:
      break
  return finished, stop_step


def run_beam(model, max_lens, beam_size, alpha):
  longest = max(max_lens)
  search = jax.jit(lambda state, lens: decode.beam_search(
      model.step_fn, state, lens, beam_size=beam_size, max_decode_len=longest, alpha=alpha))
  result = search(model.init_state(), jnp.asarray(max_lens, jnp.int32))
  return jax.tree_util.tree_map(np.asarray, result)


def run_greedy(model, max_lens, alpha):
  longest = max(max_lens)
  search = jax.jit(lambda state, lens: decode.greedy_search(
      model.step_fn, state, lens, max_decode_len=longest, alpha=alpha))
  result = search(model.init_state(), jnp.asarray(max_lens, jnp.int32))
  return jax.tree_util.tree_map(np.asarray, result)


def hypotheses(result, b):
  """[(tokens tuple, score)] of sentence b, in the order returned, empty slots left out."""
  return [(tuple(result.tokens[b, j, :result.lengths[b, j]].tolist()), result.scores[b, j])
          for j in range(result.scores.shape[1]) if np.isfinite(result.scores[b, j])]


def check_well_formed(result, max_lens):
  """Best first; EOS only as the last token, PAD only after the end, lengths within the
  limits; empty slots (score -inf) all PAD."""
  for b, max_len in enumerate(max_lens):
    scores = result.scores[b]
    filled = np.isfinite(scores)
    assert filled[0] and np.all(np.diff(scores[filled]) <= 0)
    assert np.all(filled[:filled.sum()])  # the empty slots come last.
    for j in range(result.scores.shape[1]):
      n = result.lengths[b, j]
      row = result.tokens[b, j]
      if not filled[j]:
        assert n == 0 and np.all(row == PAD_ID)
        continue
      assert 1 <= n <= max_len
      assert np.all(row[n:] == PAD_ID)
      assert not np.isin(row[:n], decode.NEVER_GENERATED).any()
      assert EOS_ID not in row[:n - 1].tolist()
      assert row[n - 1] == EOS_ID or n == max_len


# --- The search algorithms, on toy step functions. -------------------------------------------

def test_length_penalty_is_gnmt_formula():
  lengths = np.array([1, 2, 7, 50])
  for alpha in (0.0, 0.6, 1.0):
    np.testing.assert_allclose(decode.length_penalty(lengths, alpha),
                               np_length_penalty(lengths, alpha), rtol=1e-6)


@pytest.mark.parametrize("values", ["normal", "ties", "mostly_minus_inf"])
def test_top_k_of_wide_rows_is_lax_top_k_ties_included(values):
  """decode.top_k ranks wide rows through their chunks' maxima: the same values and indices as
  lax.top_k, equal values going to the lowest index, even where they straddle the k-th place."""
  rng = np.random.RandomState(0)
  width = decode.TOP_K_CHUNK * 20
  for k in (1, 2, 4, 5):
    x = {"normal": rng.standard_normal((8, width)),
         "ties": rng.randint(0, 3, size=(8, width)).astype(np.float32),
         "mostly_minus_inf": np.where(rng.rand(8, width) < 0.002, 1.0, -np.inf)}[values]
    x = jnp.asarray(x, jnp.float32)
    assert width >= k * decode.TOP_K_CHUNK * decode.TOP_K_MIN_CHUNKS  # the chunked route
    expected, got = jax.lax.top_k(x, k), decode.top_k(x, k)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_beam_size_one_is_exactly_greedy():
  model = ToyRNN(seed=0, batch=6, eos_bias=1.0)
  max_lens = [1, 3, 5, 8, 8, 2]
  greedy = run_greedy(model, max_lens, alpha=0.6)
  beam = run_beam(model, max_lens, beam_size=1, alpha=0.6)
  assert len(set(greedy.lengths[:, 0].tolist())) > 1  # rows end at different steps.
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_array_equal(beam.scores, greedy.scores)


def test_greedy_takes_the_most_likely_token_each_step():
  model = ToyRNN(seed=1, batch=3)
  max_lens = [4, 6, 2]
  result = run_greedy(model, max_lens, alpha=0.0)
  check_well_formed(result, max_lens)
  for b, max_len in enumerate(max_lens):
    h, token, seq, log_p = model.h0[b], BOS_ID, [], 0.0
    while len(seq) < max_len and token != EOS_ID:
      h, log_probs = model.np_step(h, token)
      token = max(GENERATED, key=lambda t: log_probs[t])
      seq.append(token)
      log_p += log_probs[token]
    assert hypotheses(result, b)[0][0] == tuple(seq)
    np.testing.assert_allclose(result.scores[b, 0], log_p, rtol=1e-5)


def test_beam_returns_k_distinct_hypotheses():
  model = ToyRNN(seed=2, batch=3)
  result = run_beam(model, [6, 6, 6], beam_size=4, alpha=0.6)
  check_well_formed(result, [6, 6, 6])
  for b in range(3):
    found = hypotheses(result, b)
    assert len(found) == 4
    assert len({seq for seq, _ in found}) == 4


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_equals_exhaustive_enumeration(alpha):
  model = ToyRNN(seed=3, batch=3)
  max_lens = [4, 2, 3]
  wide = len(GENERATED) ** max(max_lens)  # more than all extensions at any step.
  result = run_beam(model, max_lens, beam_size=wide, alpha=alpha)
  check_well_formed(result, max_lens)
  for b, max_len in enumerate(max_lens):
    expected = enumerate_hypotheses(model, b, max_len, alpha)
    found = hypotheses(result, b)
    assert [seq for seq, _ in found] == [seq for seq, _ in expected]
    np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], rtol=1e-5)


@pytest.mark.parametrize("seed,eos_bias,beam_size,alpha", [
    (28, 1.0, 2, 1.0),  # A hypothesis of the maximum length wins in the end.
    (28, 2.0, 2, 0.6),  # The search can stop after 4 of 8 steps.
    (4, 2.0, 2, 0.6),
    (4, 2.0, 3, 0.0),
])
def test_beam_equals_reference_and_stops_as_early_as_the_rule_allows(seed, eos_bias, beam_size,
                                                                     alpha):
  max_len = 8
  model = ToyRNN(seed=seed, batch=1, eos_bias=eos_bias)
  result = run_beam(model, [max_len], beam_size=beam_size, alpha=alpha)
  expected, stop_step = reference_beam_search(model, 0, max_len, beam_size, alpha)
  found = hypotheses(result, 0)
  assert [seq for seq, _ in found] == [seq for seq, _ in expected]
  np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], rtol=1e-5)
  assert model.steps == stop_step


class MarkovToy:
  """Next-token probabilities that depend on the last token only, from a fixed table."""

  def __init__(self, table):
    self.log_table = np.log(np.maximum(table, 1e-30))

  def step_fn(self, token_ids, state):
    return jnp.asarray(self.log_table, jnp.float32)[token_ids[:, 0]], state

  def score(self, seq, alpha):
    tokens = (BOS_ID,) + seq
    log_p = sum(self.log_table[a, b] for a, b in zip(tokens, tokens[1:]))
    return log_p / np_length_penalty(len(seq), alpha)


def test_length_penalty_changes_the_winner_as_the_formula_says():
  # From BOS: EOS at once (p 0.4) or word 1 (p 0.35), after which EOS is almost sure (0.95).
  # Short: log 0.4 = -0.92. Long: log(0.35 * 0.95) = -1.10, better once divided by
  # ((5 + 2) / 6) ** alpha > 1.2, i.e. for alpha > 1.18.
  table = np.zeros((TOY_VOCAB, TOY_VOCAB))
  table[BOS_ID, [EOS_ID, 1, 4, 5]] = [0.4, 0.35, 0.15, 0.1]
  table[1, [EOS_ID, 1, 4, 5]] = [0.95, 0.02, 0.02, 0.01]
  table[4, [EOS_ID, 1, 4, 5]] = table[5, [EOS_ID, 1, 4, 5]] = [0.5, 0.2, 0.2, 0.1]
  toy = MarkovToy(table)
  max_len = 3
  every = [seq for n in range(1, max_len + 1) for seq in itertools.product(GENERATED, repeat=n)
           if EOS_ID not in seq[:-1] and (seq[-1] == EOS_ID or n == max_len)]
  winners = {}
  for alpha in (0.0, 2.0):
    expected = max(every, key=lambda seq: toy.score(seq, alpha))
    result = jax.jit(lambda state: decode.beam_search(
        toy.step_fn, state, jnp.array([max_len]), beam_size=4, max_decode_len=max_len,
        alpha=alpha))(jnp.zeros((1,)))
    best, score = hypotheses(jax.tree_util.tree_map(np.asarray, result), 0)[0]
    assert best == expected
    np.testing.assert_allclose(score, toy.score(expected, alpha), rtol=1e-5)
    winners[alpha] = best
  assert winners[0.0] == (EOS_ID,) and winners[2.0] == (1, EOS_ID)


# --- The Transformer binding, on a tiny random model. ---------------------------------------

ALPHA = 0.6


def tiny_model(**overrides):
  """A random 1-layer Transformer with a 24-token vocabulary and max_len 16."""
  config = get_default_config().model
  config.update(dict(vocab_size=24, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=16,
                     dropout_rate=0.0))
  config.update(overrides)
  model = Transformer(ml_collections.FrozenConfigDict(config))
  dummy = jnp.ones((1, 4), jnp.int32)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), dummy, dummy)["params"]


def source_batch(lengths, width, vocab=24, seed=0):
  """Random source ids (real tokens, EOS last) of the given lengths, PAD-padded to width."""
  rng = np.random.default_rng(seed)
  inputs = np.full((len(lengths), width), PAD_ID, np.int32)
  for b, n in enumerate(lengths):
    inputs[b, :n - 1] = rng.integers(4, vocab, size=n - 1)
    inputs[b, n - 1] = EOS_ID
  return inputs


def teacher_forced_log_probs(model, params, inputs, result):
  """[B, n] log P(hypothesis | source) from one teacher-forced pass, summed in NumPy."""
  batch, n, length = result.tokens.shape
  targets = result.tokens.reshape(batch * n, length)
  logits = jax.jit(model.apply)({"params": params}, np.repeat(inputs, n, axis=0), targets)
  log_probs = np_log_softmax(np.asarray(logits, np.float64))  # [B * n, L, V]
  picked = np.take_along_axis(log_probs, targets[:, :, None], axis=-1)[:, :, 0]
  within = np.arange(length) < result.lengths.reshape(batch * n, 1)
  return np.where(within, picked, 0.0).sum(axis=1).reshape(batch, n)


# Most tests below share these settings and shapes, so that they share compiled functions.
BEAM, EXTRA = 3, 3
LENGTHS, WIDTH = [7, 3], 7


@pytest.fixture(scope="module")
def tiny():
  return tiny_model()


def test_cached_beam_scores_are_teacher_forced_log_probs():
  # Two scanned layers: the cache has a layer axis, which reordering must leave alone.
  model, params = tiny_model(scan_layers=True, num_layers=2)
  inputs = source_batch(LENGTHS, WIDTH)
  result = jax.tree_util.tree_map(np.asarray, decode.decode_batch(
      model, params, inputs, beam_size=BEAM, alpha=ALPHA, max_extra_len=EXTRA))
  max_lens = [n + EXTRA for n in LENGTHS]
  assert result.tokens.shape == (2, BEAM, WIDTH + EXTRA)
  check_well_formed(result, max_lens)
  for b in range(2):
    assert len({seq for seq, _ in hypotheses(result, b)}) == BEAM  # k distinct hypotheses.
  expected = teacher_forced_log_probs(model, params, inputs, result)
  got = result.scores * np_length_penalty(result.lengths, ALPHA)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mixed_batch_equals_each_sentence_alone(tiny):
  model, params = tiny
  inputs = source_batch(LENGTHS, WIDTH, seed=1)
  together = decode.decode_batch(model, params, inputs, beam_size=BEAM, alpha=ALPHA,
                                 max_extra_len=EXTRA)
  for b, n in enumerate(LENGTHS):
    alone = decode.decode_batch(model, params, inputs[b:b + 1, :n], beam_size=BEAM,
                                alpha=ALPHA, max_extra_len=EXTRA)
    width = alone.tokens.shape[-1]  # n + EXTRA <= the batch's WIDTH + EXTRA.
    np.testing.assert_array_equal(together.tokens[b, :, :width], alone.tokens[0])
    assert np.all(np.asarray(together.tokens[b, :, width:]) == PAD_ID)
    np.testing.assert_array_equal(together.lengths[b], alone.lengths[0])
    np.testing.assert_allclose(together.scores[b], alone.scores[0], rtol=1e-5)


# --- Every device decodes its own rows. ---------------------------------------------------

# Greedy with replicated parameters, beam 4 with parameters split over fsdp pairs (each case
# compiles a search for 1 and for 8 devices: the two cover both searches and both placements).
@pytest.mark.parametrize("beam_size,fsdp", [(1, 1), (4, 2)])
def test_parallel_decoder_splits_rows_over_8_devices_and_equals_one_device(beam_size, fsdp):
  assert jax.device_count() == 8
  model, params = tiny_model()
  rng = np.random.default_rng(3)
  inputs = source_batch(rng.integers(2, WIDTH + 1, size=13), WIDTH, seed=3)  # 13: not 8k.
  one_device = jax.tree.map(np.asarray, decode.decode_batch(
      model, params, inputs, beam_size=beam_size, alpha=ALPHA, max_extra_len=EXTRA))
  mesh = devices_lib.inference_mesh(fsdp)
  placed = devices_lib.place(params, devices_lib.param_shardings(mesh, params))
  if fsdp > 1:  # The parameters stay split as in training; jit gathers them for the search.
    assert not placed["shared_embedding"]["embed"]["embedding"].sharding.is_fully_replicated
  decoder = decode.ParallelDecoder(model, placed, mesh, beam_size=beam_size, alpha=ALPHA,
                                   max_extra_len=EXTRA)

  sharded = decoder.decode_sharded(inputs)
  for x in sharded:  # 13 rows and 3 filler rows: 2 on each of the 8 devices.
    assert x.shape[0] == 16
    assert len(x.sharding.device_set) == 8
    assert sorted(s.index[0].start for s in x.addressable_shards) == list(range(0, 16, 2))
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
  result = decoder(inputs)
  np.testing.assert_array_equal(result.tokens, one_device.tokens)
  np.testing.assert_array_equal(result.lengths, one_device.lengths)
  np.testing.assert_allclose(result.scores, one_device.scores, rtol=1e-5)
  local = decoder.decode_local(inputs)  # One process: its rows are the batch (same shapes).
  np.testing.assert_array_equal(local.tokens, one_device.tokens)


def test_naive_decoder_agrees_with_cached(tiny):
  model, params = tiny
  inputs = source_batch(LENGTHS, WIDTH, seed=2)
  cached = decode.decode_batch(model, params, inputs, beam_size=BEAM, alpha=ALPHA,
                               max_extra_len=EXTRA)
  naive = decode.naive_decode_batch(model, params, inputs, beam_size=BEAM, alpha=ALPHA,
                                    max_extra_len=EXTRA)
  np.testing.assert_array_equal(naive.tokens, cached.tokens)
  np.testing.assert_array_equal(naive.lengths, cached.lengths)
  np.testing.assert_allclose(naive.scores, cached.scores, rtol=1e-5)


def test_output_length_is_source_length_plus_extra_capped_by_max_len(tiny):
  model, params = tiny
  # EOS never matches (id -1), so every hypothesis runs to its sentence's limit.
  inputs = source_batch([14, 3, 9], width=14, seed=3)
  result = decode.decode_batch(model, params, inputs, beam_size=1, alpha=ALPHA,
                               max_extra_len=5, eos_id=-1)
  assert result.tokens.shape[-1] == 16  # min(14 + 5, max_len 16)
  np.testing.assert_array_equal(result.lengths[:, 0], [16, 8, 14])


def test_decode_batch_refuses_inputs_longer_than_max_len(tiny):
  model, params = tiny
  with pytest.raises(InputError, match="max_len=16"):
    decode.decode_batch(model, params, source_batch([17], 17), beam_size=BEAM, alpha=ALPHA,
                        max_extra_len=EXTRA)
