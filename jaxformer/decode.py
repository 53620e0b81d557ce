"""Greedy search and beam search over the cached decoder, all inside jit.

The file has two layers.

1. The search algorithms (`greedy_search`, `beam_search`) know nothing about the Transformer.
   They drive a step function

       step_fn(token_ids [R, 1], state) -> (logits [R, V], state)

   over R = B * n rows, where row b * n + j holds hypothesis j of sentence b (n = 1 for greedy,
   the beam size for beam search). `step_fn` returns logits or log-probabilities (they are
   normalized here either way). Beam search keeps the state in step with its hypotheses through
   a reorder rule, `reorder_state(state, rows [R]) -> state`: row i of the new state is row
   rows[i] of the old one. The same rule tiles the initial state from B rows to B * n (rows =
   [0, 0, .., 1, 1, ..]). Each search is one `lax.while_loop`, so it compiles into one program
   that stops as soon as every sentence has finished (for beam search: as soon as no live
   hypothesis of any sentence can still enter its k best finished ones).

2. The binding to the Transformer (`decode_batch`, `naive_decode_batch`, `ParallelDecoder`):
   the encoder runs once per sentence and the cross-attention keys and values are computed
   once, by `init_cache`; they stay at batch B, shared by the n hypotheses of each sentence.
   The self-attention keys and values stay where each step wrote them, too: the one entry the
   search tiles and reorders is the decoder's table of where each hypothesis's history lies
   (`cache_slot`, a few integers per hypothesis; see jaxformer.model.attention). Text in and
   text out is jaxformer.inference's (`translate`).

Conventions shared by both layers:
- A hypothesis's length counts its tokens, the closing EOS included. A sentence's hypotheses
  may grow to `max_lens[b]` tokens; one that reaches it without EOS ends there (truncated).
  For the Transformer, max_lens[b] = the sentence's source length (its non-PAD tokens, EOS
  included) + max_extra_len, capped by the model's max_len.
- Scores are length-normalized log-probabilities, log P(y) / lp(|y|), with GNMT's length penalty
  lp(L) = ((5 + L) / 6) ** alpha (Wu et al. 2016), as the Transformer paper uses (alpha 0.6).
  alpha = 0 ranks by plain log-probability. `score * lp(length)` is the model's log P(y).
- Outputs are `DecodeResult(tokens [B, n, L], scores [B, n], lengths [B, n])`, best first, with
  PAD after each hypothesis. PAD and BOS are never generated (their log-probabilities are set to
  -inf, the others are not renormalized, so scores stay the model's log-probabilities).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer import devices as devices_lib
from jaxformer.errors import InputError
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID

State = Any  # any pytree of arrays: the decoder's cache, or a toy model's hidden state.
StepFn = Callable[[jax.Array, State], tuple[jax.Array, State]]
ReorderFn = Callable[[State, jax.Array], State]

LENGTH_PENALTY_BASE = 5.0  # GNMT: lp(L) = ((BASE + L) / (BASE + 1)) ** alpha.
NEVER_GENERATED = (PAD_ID, BOS_ID)  # tokens a decoder must not output.
NAIVE_FILLER = EOS_ID  # naive_decode_batch's placeholder for targets not generated yet.


class DecodeResult(NamedTuple):
  """The n best hypotheses of each of B sentences, best first."""
  tokens: jax.Array  # [B, n, L] int32: token ids, EOS included, PAD after the end.
  scores: jax.Array  # [B, n] float32: log P(y) / lp(length); -inf for an empty slot.
  lengths: jax.Array  # [B, n] int32: tokens in each hypothesis, EOS included.


def length_penalty(length: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """GNMT's length penalty ((5 + L) / 6) ** alpha, float32, of the same shape as `length`."""
  length = jnp.asarray(length, jnp.float32)
  return ((LENGTH_PENALTY_BASE + length) / (LENGTH_PENALTY_BASE + 1.0)) ** alpha


# How the searches index rows and hypotheses: their indices are always in range, and 'clip'
# compiles to a plain gather, where jnp.take's default ('fill') adds a select over every
# gathered element (on CPU a fifth of beam search's time, in reordering the cache).
IN_RANGE = "clip"


def _take(x: jax.Array, rows: jax.Array) -> jax.Array:
  return x if x.ndim == 0 else jnp.take(x, rows, axis=0, mode=IN_RANGE)


def take_rows(state: State, rows: jax.Array) -> State:
  """The default reorder rule: row i of every array in `state` becomes row rows[i] of it."""
  return jax.tree_util.tree_map(lambda x: _take(x, rows), state)


# On these backends `top_k` of a wide row goes through the maxima of its chunks of TOP_K_CHUNK
# entries: XLA:CPU's TopK ranks each row on one thread, about five times slower at the beam's
# [B*k, V] than a max over chunks and two small top-ks (benchmarks/RESULTS.md). Rows with fewer
# than TOP_K_MIN_CHUNKS chunks per wanted entry take lax.top_k as it is.
CHUNKED_TOP_K_BACKENDS = ("cpu",)
TOP_K_CHUNK = 64
TOP_K_MIN_CHUNKS = 4


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k(x, k) of rows `x` [R, V]: (values [R, k], indices [R, k]), the same results,
  ties to the lowest index included.

  Wide rows go through their chunks' maxima: the k largest entries lie in the k chunks of
  largest maxima (a chunk left out has k chunks whose maxima rank above its own: k entries
  that rank above any of its entries). Those k chunks, put back in their order in the row,
  are then ranked whole, so equal values still go to the lowest index.
  """
  rows, width = x.shape
  if (jax.default_backend() not in CHUNKED_TOP_K_BACKENDS
      or width % TOP_K_CHUNK or width < k * TOP_K_CHUNK * TOP_K_MIN_CHUNKS):
    return jax.lax.top_k(x, k)
  chunks = x.reshape(rows, width // TOP_K_CHUNK, TOP_K_CHUNK)
  _, best_chunks = jax.lax.top_k(jnp.max(chunks, axis=-1), k)         # [R, k]
  best_chunks = jnp.sort(best_chunks, axis=-1)  # row order: ties go to the lowest index
  candidates = jnp.take_along_axis(chunks, best_chunks[:, :, None], axis=1, mode=IN_RANGE)
  values, at = jax.lax.top_k(candidates.reshape(rows, k * TOP_K_CHUNK), k)
  chunk = jnp.take_along_axis(best_chunks, at // TOP_K_CHUNK, axis=1, mode=IN_RANGE)
  return values, chunk * TOP_K_CHUNK + at % TOP_K_CHUNK


def _top_tokens(logits: jax.Array, banned_ids: Sequence[int],
                k: int) -> tuple[jax.Array, jax.Array]:
  """The k most probable next tokens of each row: logits `[R, V]` -> (their log-probabilities
  `[R, k]` float32, their ids `[R, k]`), best first; `banned_ids` are never among them.

  The log-probabilities are log_softmax's (the banned tokens' probability stays in the
  normalizer: the others are not renormalized), but only the k chosen ones are computed: the
  normalizer is one shift per row, which keeps the order, so the logits are ranked as they
  are and the [R, V] log-probabilities are never written out.
  """
  logits = logits.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [R, 1]
  if banned_ids:
    logits = logits.at[:, jnp.asarray(banned_ids)].set(-jnp.inf)
  top, ids = top_k(logits, min(k, logits.shape[-1]))
  return top - log_normalizer, ids


# --- Greedy search. ------------------------------------------------------------------------

class _GreedyCarry(NamedTuple):
  step: jax.Array  # [] tokens generated so far (the loop counter t).
  last: jax.Array  # [B] the token fed at this step: BOS, then the argmax (PAD once finished).
  tokens: jax.Array  # [B, L]
  log_prob: jax.Array  # [B] log P of the tokens so far.
  length: jax.Array  # [B]
  done: jax.Array  # [B] bool
  state: State


def greedy_search(step_fn: StepFn, init_state: State, max_lens: jax.Array, *,
                  max_decode_len: int, alpha: float | jax.Array = 0.0, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                  banned_ids: Sequence[int] = NEVER_GENERATED) -> DecodeResult:
  """The most likely next token at every step, until EOS or `max_lens` ([B] int).

  `init_state` has batch B; `max_decode_len` (static) bounds every entry of `max_lens`.
  `alpha` only scales the returned scores (so that they compare with beam search's).
  Returns a DecodeResult with n = 1.
  """
  batch = max_lens.shape[0]

  def not_finished(c: _GreedyCarry) -> jax.Array:
    return (c.step < max_decode_len) & ~jnp.all(c.done)

  def step(c: _GreedyCarry) -> _GreedyCarry:
    logits, state = step_fn(c.last[:, None], c.state)
    best_log_prob, best = _top_tokens(logits, banned_ids, 1)  # [B, 1] each
    live = ~c.done
    token = jnp.where(live, best[:, 0], pad_id)
    token_log_prob = best_log_prob[:, 0]
    ended = live & ((token == eos_id) | (c.step + 1 >= max_lens))
    return _GreedyCarry(
        step=c.step + 1,
        last=token,
        tokens=c.tokens.at[:, c.step].set(token),
        log_prob=c.log_prob + jnp.where(live, token_log_prob, 0.0),
        length=jnp.where(ended, c.step + 1, c.length),
        done=c.done | ended,
        state=state)

  init = _GreedyCarry(
      step=jnp.array(0, jnp.int32),
      last=jnp.full((batch,), bos_id, jnp.int32),
      tokens=jnp.full((batch, max_decode_len), pad_id, jnp.int32),
      log_prob=jnp.zeros((batch,), jnp.float32),
      length=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      state=init_state)
  final = jax.lax.while_loop(not_finished, step, init)
  scores = final.log_prob / length_penalty(final.length, alpha)
  return DecodeResult(final.tokens[:, None], scores[:, None], final.length[:, None])


# --- Beam search. --------------------------------------------------------------------------

class _BeamCarry(NamedTuple):
  step: jax.Array  # [] tokens generated so far (the loop counter t).
  live_tokens: jax.Array  # [B, k, L] the hypotheses still growing.
  live_log_probs: jax.Array  # [B, k] their log P; -inf for an empty slot.
  finished_tokens: jax.Array  # [B, k, L] the k best ended hypotheses so far.
  finished_scores: jax.Array  # [B, k] their log P / lp(length), best first; -inf = empty.
  finished_lengths: jax.Array  # [B, k]
  done: jax.Array  # [B] bool: the sentence's finished hypotheses can no longer change.
  state: State  # batch B * k, row b * k + j = live hypothesis j of sentence b.


def _best_possible_score(best_live_log_prob: jax.Array, step: jax.Array, max_lens: jax.Array,
                         alpha: float | jax.Array) -> jax.Array:
  """[B] the highest score any live hypothesis can still reach (the flax wmt example's rule).

  Extending a hypothesis only lowers its log-probability, so one with `step` tokens and log P
  = p ends with a score <= p / lp(L) for some length L in [step + 1, max_len]. The penalty is
  monotonic in L, so the bound is at one end of that range: at the maximum length for
  alpha >= 0 (the usual case), at the next length for alpha < 0.
  """
  at_next = best_live_log_prob / length_penalty(step + 1, alpha)
  at_max = best_live_log_prob / length_penalty(max_lens, alpha)
  return jnp.maximum(at_next, at_max)


def _initial_beams(init_state: State, batch: int, k: int, length: int, pad_id: int,
                   reorder_state: ReorderFn) -> _BeamCarry:
  """Before the first step: one live beam per sentence at log P 0 (the other k - 1 at -inf, so
  that the first step's k extensions are distinct), nothing finished, the state tiled to B * k."""
  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf).astype(jnp.float32)
  return _BeamCarry(
      step=jnp.array(0, jnp.int32),
      live_tokens=jnp.full((batch, k, length), pad_id, jnp.int32),
      live_log_probs=jnp.broadcast_to(first_beam_only, (batch, k)),
      finished_tokens=jnp.full((batch, k, length), pad_id, jnp.int32),
      finished_scores=jnp.full((batch, k), -jnp.inf, jnp.float32),
      finished_lengths=jnp.zeros((batch, k), jnp.int32),
      done=jnp.zeros((batch,), bool),
      state=reorder_state(init_state, jnp.repeat(jnp.arange(batch), k)))


def _best_extensions(c: _BeamCarry, row_log_probs: jax.Array, row_tokens: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Every (live hypothesis, next token) pair scored by log P, of which the k best are kept.

  Each of the k best pairs is among the k best tokens of its own hypothesis (fewer than k
  pairs beat it), so only those are ranked: `row_log_probs` and `row_tokens` `[B * k, k]`, the
  k most probable next tokens of each live row (`_top_tokens`). Returns the extensions' log P
  [B, k], the live hypothesis each extends (`parent`, [B, k]), the token it adds [B, k] and
  its tokens [B, k, L] (the parent's, then that token at step t).
  """
  batch, width = c.live_log_probs.shape[0], row_tokens.shape[-1]
  candidates = c.live_log_probs[:, :, None] + row_log_probs.reshape(batch, k, width)
  top_log_probs, top_index = jax.lax.top_k(candidates.reshape(batch, k * width), k)  # [B, k]
  parent = top_index // width
  token = jnp.take_along_axis(row_tokens.reshape(batch, k * width), top_index, axis=1,
                              mode=IN_RANGE)
  tokens = jnp.take_along_axis(c.live_tokens, parent[:, :, None], axis=1, mode=IN_RANGE)
  return top_log_probs, parent, token, tokens.at[:, :, c.step].set(token)


def _merge_finished(c: _BeamCarry, tokens: jax.Array, log_probs: jax.Array, ends: jax.Array,
                    alpha: float | jax.Array, pad_id: int,
                    k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k best of the finished pool and of the extensions that end at this step.

  `tokens` [B, k, L] and `log_probs` [B, k] are the extensions, `ends` [B, k] marks those that
  end. Returns the pool's (scores [B, k] best first, tokens [B, k, L], lengths [B, k]).
  """
  length = c.step + 1
  new_scores = jnp.where(ends, log_probs / length_penalty(length, alpha), -jnp.inf)
  pool_scores = jnp.concatenate([c.finished_scores, new_scores], axis=1)  # [B, 2k]
  pool_tokens = jnp.concatenate([c.finished_tokens,
                                 jnp.where(ends[:, :, None], tokens, pad_id)], axis=1)
  pool_lengths = jnp.concatenate([c.finished_lengths, jnp.where(ends, length, 0)], axis=1)
  finished_scores, best = jax.lax.top_k(pool_scores, k)
  finished_tokens = jnp.take_along_axis(pool_tokens, best[:, :, None], axis=1, mode=IN_RANGE)
  return finished_scores, finished_tokens, jnp.take_along_axis(pool_lengths, best, axis=1,
                                                               mode=IN_RANGE)


def _still_live(c: _BeamCarry, log_probs: jax.Array, ends: jax.Array,
                finished_scores: jax.Array, max_lens: jax.Array,
                alpha: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """The extensions that did not end stay live, unless their sentence is now done: nothing is
  live, or no live hypothesis can still beat the worst of the k finished ones.

  Returns the live log P [B, k] (-inf where not live) and `done` [B].
  """
  live_log_probs = jnp.where(ends, -jnp.inf, log_probs)
  best_live = jnp.max(live_log_probs, axis=1)
  nothing_live = best_live == -jnp.inf
  cannot_win = finished_scores[:, -1] >= _best_possible_score(best_live, c.step + 1, max_lens,
                                                              alpha)
  done = c.done | nothing_live | cannot_win
  return jnp.where(done[:, None], -jnp.inf, live_log_probs), done


def beam_search(step_fn: StepFn, init_state: State, max_lens: jax.Array, *, beam_size: int,
                max_decode_len: int, alpha: float | jax.Array, bos_id: int = BOS_ID,
                eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                banned_ids: Sequence[int] = NEVER_GENERATED,
                reorder_state: ReorderFn = take_rows) -> DecodeResult:
  """The `beam_size` best hypotheses of each sentence under the length-penalized score.

  At each step every live hypothesis is extended by every token; the k = beam_size most
  probable extensions are kept. Those ending in EOS, or reaching the sentence's `max_lens[b]`,
  join the sentence's pool of k best finished hypotheses; the others stay live. A sentence is
  done when nothing is live or no live hypothesis can still beat the worst of a full pool
  (`_best_possible_score`); the loop ends when every sentence is done. With k = 1 this is
  exactly greedy search. At the first step only one beam is live (the others are at -inf), so
  the k hypotheses are distinct.

  `init_state` has batch B (it is tiled to B * k by `reorder_state`); `max_lens` is [B] int,
  each at most the static `max_decode_len`. Returns a DecodeResult with n = k; slots that no
  hypothesis filled (a vocabulary smaller than the beam) have score -inf and length 0.
  """
  batch, k, length = max_lens.shape[0], beam_size, max_decode_len

  def not_finished(c: _BeamCarry) -> jax.Array:
    return (c.step < length) & ~jnp.all(c.done)

  def step(c: _BeamCarry) -> _BeamCarry:
    t = c.step
    last = jnp.where(t == 0, bos_id,
                     jax.lax.dynamic_index_in_dim(c.live_tokens, jnp.maximum(t - 1, 0), axis=2,
                                                  keepdims=False))  # [B, k]
    logits, state = step_fn(last.reshape(batch * k, 1), c.state)
    log_probs, parent, token, tokens = _best_extensions(c, *_top_tokens(logits, banned_ids, k),
                                                        k)
    ends = (log_probs > -jnp.inf) & ((token == eos_id) | (t + 1 >= max_lens[:, None]))
    finished_scores, finished_tokens, finished_lengths = _merge_finished(
        c, tokens, log_probs, ends, alpha, pad_id, k)
    live_log_probs, done = _still_live(c, log_probs, ends, finished_scores, max_lens, alpha)
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(batch * k)
    return _BeamCarry(step=t + 1, live_tokens=tokens, live_log_probs=live_log_probs,
                      finished_tokens=finished_tokens, finished_scores=finished_scores,
                      finished_lengths=finished_lengths, done=done,
                      state=reorder_state(state, rows))

  init = _initial_beams(init_state, batch, k, length, pad_id, reorder_state)
  final = jax.lax.while_loop(not_finished, step, init)
  return DecodeResult(final.finished_tokens, final.finished_scores, final.finished_lengths)


# --- The Transformer binding. --------------------------------------------------------------

# The decoder's cache entries with one row per hypothesis, tiled and reordered by beam search.
# Every other entry (keys and values, of self- and cross-attention; the step's position) is
# shared by a sentence's hypotheses and never moves.
HYPOTHESIS_CACHE = ("cache_slot",)


def reorder_decoder_cache(cache: State, rows: jax.Array) -> State:
  """The Transformer's reorder rule: take `rows` of the per-hypothesis entries only."""
  def reorder(path, x):
    if getattr(path[-1], "key", None) in HYPOTHESIS_CACHE:
      return _take(x, rows)
    return x
  return jax.tree_util.tree_map_with_path(reorder, cache)


def output_max_lens(inputs: jax.Array, max_extra_len: int, max_len: int) -> jax.Array:
  """[B] int32: each sentence's output length limit, its source length + max_extra_len, capped
  by the model's max_len. The source length counts the non-PAD tokens of `inputs` [B, S]."""
  source_lens = jnp.sum(inputs != PAD_ID, axis=1, dtype=jnp.int32)
  return jnp.clip(source_lens + max_extra_len, 1, max_len)


def _cached_decoder(model: nn.Module, params: Any, inputs: jax.Array, beam_size: int,
                    max_decode_len: int) -> tuple[StepFn, State, ReorderFn]:
  """decode_batch's step function over the decoder's cache, the initial cache and its reorder
  rule. The encoder runs here, once, and `init_cache` computes the cross-attention keys and
  values once; the self-attention caches have room for `beam_size` hypotheses per sentence,
  and beam search tiles and reorders only the decoder's slot table."""
  encoded = model.apply({"params": params}, inputs, method="encode")  # [B, S, D]
  _, variables = model.apply({"params": params}, encoded, inputs, max_decode_len, beam_size,
                             method="init_cache", mutable=["cache"])

  def step_fn(token_ids, cache):
    logits, variables = model.apply({"params": params, "cache": cache}, token_ids, inputs,
                                    method="decode_step", mutable=["cache"])
    return logits[:, 0], variables["cache"]

  return step_fn, variables["cache"], reorder_decoder_cache


def _naive_decoder(model: nn.Module, params: Any, inputs: jax.Array, beam_size: int,
                   max_decode_len: int) -> tuple[StepFn, State, ReorderFn]:
  """naive_decode_batch's step function, which re-runs the whole teacher-forced model, and its
  initial state (the step, and the targets so far [B, L]) with the plain reorder rule."""
  inputs_per_row = jnp.repeat(inputs, beam_size, axis=0)  # [B * n, S]

  def step_fn(token_ids, state):
    # targets [B * n, L]: the tokens generated so far, then NAIVE_FILLER. The model's
    # shift-right feeds target t-1 at position t only where target t is not PAD, so the filler
    # is not PAD; the causal mask keeps it from influencing the positions before it.
    step, targets = state
    targets = jnp.where(step > 0, targets.at[:, jnp.maximum(step - 1, 0)].set(token_ids[:, 0]),
                        targets)
    logits = model.apply({"params": params}, inputs_per_row, targets)  # [B * n, L, V]
    return jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False), (step + 1,
                                                                                  targets)

  state = (jnp.array(0, jnp.int32),
           jnp.full((inputs.shape[0], max_decode_len), NAIVE_FILLER, jnp.int32))
  return step_fn, state, take_rows


def _search(model: nn.Module, params: Any, inputs: jax.Array, alpha: jax.Array, *,
            cached: bool, beam_size: int, max_extra_len: int, max_len: int,
            eos_id: int) -> DecodeResult:
  """decode_batch (`cached`) or naive_decode_batch of `inputs` [B, S], traced inside jit (one
  device: `_decode`; each device of a mesh on its own rows: `ParallelDecoder`).

  Greedy search for beam_size 1, beam search otherwise.
  """
  max_decode_len = min(inputs.shape[1] + max_extra_len, max_len)
  decoder = _cached_decoder if cached else _naive_decoder
  step_fn, state, reorder_state = decoder(model, params, inputs, beam_size, max_decode_len)
  max_lens = output_max_lens(inputs, max_extra_len, max_len)
  if beam_size == 1:
    return greedy_search(step_fn, state, max_lens, max_decode_len=max_decode_len, alpha=alpha,
                         eos_id=eos_id)
  return beam_search(step_fn, state, max_lens, beam_size=beam_size,
                     max_decode_len=max_decode_len, alpha=alpha, eos_id=eos_id,
                     reorder_state=reorder_state)


# decode_batch and naive_decode_batch: compiled once per input shape and setting.
_decode = jax.jit(_search, static_argnames=("model", "cached", "beam_size", "max_extra_len",
                                            "max_len", "eos_id"))


def _check_decode_args(model: nn.Module, inputs: Any, beam_size: int, max_extra_len: int,
                       max_len: int | None) -> int:
  """Raises InputError for arguments that cannot be decoded; returns the resolved max_len."""
  if max_len is None:
    max_len = model.config.max_len
  if beam_size < 1:
    raise InputError(f"beam_size={beam_size} must be at least 1 (1 = greedy search)")
  if max_extra_len < 0:
    raise InputError(f"max_extra_len={max_extra_len} must be >= 0")
  if np.ndim(inputs) != 2:
    raise InputError(f"inputs must be token ids of shape [batch, length], got shape "
                     f"{np.shape(inputs)}")
  if np.shape(inputs)[1] > max_len:
    raise InputError(f"inputs have {np.shape(inputs)[1]} positions, more than max_len="
                     f"{max_len}; truncate them (translate --truncate does)")
  return max_len


def decode_batch(model: nn.Module, params: Any, inputs: jax.Array, *, beam_size: int,
                 alpha: float, max_extra_len: int, max_len: int | None = None,
                 eos_id: int = EOS_ID) -> DecodeResult:
  """Translates a batch of token ids `inputs` [B, S] (EOS-terminated, PAD-padded).

  The encoder runs once and the cache is built once; then greedy search (beam_size 1) or beam
  search runs over the cached decoder, all in one compiled function (one compile per input
  shape and setting). Each sentence's output is at most its source length + max_extra_len
  tokens, capped by max_len (default: the model's). Returns DecodeResult(tokens [B, n, L],
  scores [B, n], lengths [B, n]) with n = beam_size, best first, L = min(S + max_extra_len,
  max_len).
  """
  max_len = _check_decode_args(model, inputs, beam_size, max_extra_len, max_len)
  return _decode(model, params, jnp.asarray(inputs, jnp.int32), jnp.float32(alpha), cached=True,
                 beam_size=beam_size, max_extra_len=max_extra_len, max_len=max_len,
                 eos_id=eos_id)


def naive_decode_batch(model: nn.Module, params: Any, inputs: jax.Array, *, beam_size: int,
                       alpha: float, max_extra_len: int, max_len: int | None = None,
                       eos_id: int = EOS_ID) -> DecodeResult:
  """decode_batch without a cache, the baseline of benchmarks/decode_throughput.py.

  Each step re-runs the whole teacher-forced model (encoder included) on every hypothesis's
  prefix padded to the full output length, and reads the logits at the current position: the
  same search and results as decode_batch, at about L times the cost.
  """
  max_len = _check_decode_args(model, inputs, beam_size, max_extra_len, max_len)
  return _decode(model, params, jnp.asarray(inputs, jnp.int32), jnp.float32(alpha), cached=False,
                 beam_size=beam_size, max_extra_len=max_extra_len, max_len=max_len,
                 eos_id=eos_id)


# --- The source widths translate pads to. -----------------------------------------------

MIN_LENGTH_BUCKET = 8  # sources are padded to power-of-two widths from here up to max_len.


def power_of_two(n: int, smallest: int, largest: int) -> int:
  """The smallest power of two >= n (and >= smallest), capped at largest."""
  size = smallest
  while size < n:
    size *= 2
  return min(size, largest)


def length_buckets(max_len: int) -> list[int]:
  """Every source width jaxformer.inference.translate pads a batch to: the powers of two from
  MIN_LENGTH_BUCKET up, the last capped at max_len ([8, 16, 32, 64, 128, 256] for 256)."""
  return sorted({power_of_two(n, MIN_LENGTH_BUCKET, max_len) for n in range(1, max_len + 1)})


# --- Every device decodes its own rows. ----------------------------------------------------

def padded_rows(rows: int, multiple: int) -> int:
  """`rows` rounded up to a multiple of `multiple` (the devices that share a batch)."""
  return -(-rows // multiple) * multiple


def _with_filler_rows(inputs: np.ndarray, rows: int) -> np.ndarray:
  """`inputs` [B, S] followed by rows - B filler rows, each an empty sentence (EOS only): they
  end at the first step and are dropped from the results."""
  padded = np.full((rows, inputs.shape[1]), PAD_ID, np.int32)
  padded[:len(inputs)] = inputs
  padded[len(inputs):, 0] = EOS_ID
  return padded


@functools.lru_cache(maxsize=None)
def _parallel_search(model: nn.Module, mesh: jax.sharding.Mesh, beam_size: int,
                     max_extra_len: int, max_len: int, eos_id: int) -> Callable:
  """The compiled search of ParallelDecoder, (params, inputs [B, S] split by rows over `mesh`,
  alpha) -> DecodeResult split alike: one per model and setting, so that every decoder of the
  same settings (one per evaluation of a training run, one per translate call) shares its
  compiled programs instead of compiling its own."""
  rows = P(mesh.axis_names)  # [B, ...]: rows over every axis of the mesh.
  search = functools.partial(_search, model, cached=True, beam_size=beam_size,
                             max_extra_len=max_extra_len, max_len=max_len, eos_id=eos_id)
  # check_vma off: the search's loop carries start as constants and become per-device values;
  # the search knows nothing of devices (no collective in it), so there is nothing to check.
  return jax.jit(jax.shard_map(search, mesh=mesh, in_specs=(P(), rows, P()), out_specs=rows,
                               check_vma=False))


class ParallelDecoder:
  """decode_batch on every device of `mesh`: the rows of a batch are split over all the mesh's
  devices (of every process, on a pod), and each device searches its own rows.

  The search runs inside `jax.shard_map`, one compiled program per input shape: each device's
  `lax.while_loop` ends when its own sentences are done, and nothing in it waits for another
  device. The parameters stay where they are, replicated or fsdp-sharded over `mesh` as in
  training (jit gathers them, once per batch, before the search). A batch whose rows do not
  divide by the devices gets filler rows, dropped from the results. Per row, the results are
  those of decode_batch on one device.

  Every process calls every method with the same settings, in the same order (a pod runs one
  program). `params` must lie on `mesh` (jaxformer.devices.place_params).
  """

  def __init__(self, model: nn.Module, params: Any, mesh: jax.sharding.Mesh, *, beam_size: int,
               alpha: float, max_extra_len: int, max_len: int | None = None,
               eos_id: int = EOS_ID):
    self.max_len = _check_decode_args(model, np.zeros((1, 1), np.int32), beam_size,
                                      max_extra_len, max_len)
    self.model, self.params, self.mesh = model, params, mesh
    self.beam_size, self.alpha, self.max_extra_len = beam_size, alpha, max_extra_len
    self.row_sharding = NamedSharding(mesh, P(mesh.axis_names))
    self._search = _parallel_search(model, mesh, beam_size, max_extra_len, self.max_len, eos_id)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def decode_sharded(self, inputs: np.ndarray) -> DecodeResult:
    """DecodeResult of `inputs` [B, S] (the same on every process) as arrays split by rows over
    the mesh: [R, n, L] with R = B rounded up to a multiple of the devices (filler after B)."""
    inputs = np.asarray(inputs, np.int32)
    _check_decode_args(self.model, inputs, self.beam_size, self.max_extra_len, self.max_len)
    padded = _with_filler_rows(inputs, padded_rows(len(inputs), self.num_devices))
    sharded = jax.make_array_from_callback(padded.shape, self.row_sharding,
                                           lambda index: padded[index])
    return self._search(self.params, sharded, jnp.float32(self.alpha))

  def __call__(self, inputs: np.ndarray) -> DecodeResult:
    """DecodeResult of `inputs` [B, S] (the same on every process), as NumPy arrays [B, n, L]
    on every process."""
    result = self.decode_sharded(inputs)
    return DecodeResult(*(devices_lib.to_host(x)[:len(inputs)] for x in result))

  def decode_local(self, local_inputs: np.ndarray) -> DecodeResult:
    """DecodeResult of this process's rows `local_inputs` [b, S] (each process its own, b the
    same on all), as NumPy arrays [b, n, L]: this process's rows only."""
    local_inputs = np.asarray(local_inputs, np.int32)
    _check_decode_args(self.model, local_inputs, self.beam_size, self.max_extra_len,
                       self.max_len)
    processes = len({d.process_index for d in self.mesh.devices.flat})
    padded = _with_filler_rows(local_inputs, padded_rows(len(local_inputs),
                                                         self.num_devices // processes))
    sharded = jax.make_array_from_process_local_data(
        self.row_sharding, padded, (len(padded) * processes,) + padded.shape[1:])
    result = self._search(self.params, sharded, jnp.float32(self.alpha))
    return DecodeResult(*(devices_lib.local_rows(x)[:len(local_inputs)] for x in result))
