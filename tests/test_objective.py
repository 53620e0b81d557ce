"""Label-smoothed cross entropy and metric sums, against closed forms and optax."""

import jax
import numpy as np
import optax
import pytest

from jaxformer import objective
from jaxformer.tokens import PAD_ID

V = 7


def smoothed_entropy(eps, vocab):
  """Entropy of q = (1 - eps) * one_hot + eps / V, in closed form."""
  on, off = 1 - eps + eps / vocab, eps / vocab
  return -on * np.log(on) - (vocab - 1) * off * np.log(off)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_perfect_prediction_costs_the_smoothed_entropy(eps):
  targets = np.array([[4, 5, 6, PAD_ID]], np.int32)
  q = np.full((1, 4, V), eps / V)
  q[0, np.arange(4), targets[0]] += 1 - eps
  logits = np.log(q).astype(np.float32)   # the model predicts exactly the smoothed target
  sums = objective.compute_metrics(logits, targets, eps)
  assert sums["num_tokens"] == 3
  np.testing.assert_allclose(sums["loss"], 3 * smoothed_entropy(eps, V), rtol=1e-5)
  np.testing.assert_allclose(sums["correct"], 3)


def test_matches_optax_smooth_labels_cross_entropy():
  rng = np.random.RandomState(0)
  eps = 0.1
  logits = rng.randn(2, 5, V).astype(np.float32) * 3
  targets = rng.randint(1, V, size=(2, 5)).astype(np.int32)
  labels = optax.smooth_labels(jax.nn.one_hot(targets, V), eps)
  expected = optax.softmax_cross_entropy(logits, labels)
  loss, nll = objective.smoothed_cross_entropy(logits, targets, eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(nll, -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0],
                             rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_written_out_gradient_matches_autodiff_of_optax(eps):
  """The custom backward pass (p - q) against autodiff of optax's cross entropy, for any mix
  of the loss's and the nll's cotangents."""
  rng = np.random.RandomState(1)
  logits = (rng.randn(2, 5, V) * 3).astype(np.float32)
  targets = rng.randint(1, V, size=(2, 5)).astype(np.int32)
  g_loss, g_nll = rng.rand(2, 5).astype(np.float32), rng.rand(2, 5).astype(np.float32)

  def ours(x):
    loss, nll = objective.smoothed_cross_entropy(x, targets, eps)
    return (g_loss * loss).sum() + (g_nll * nll).sum()

  def reference(x):
    one_hot = jax.nn.one_hot(targets, V)
    loss = optax.softmax_cross_entropy(x, optax.smooth_labels(one_hot, eps))
    nll = optax.softmax_cross_entropy(x, one_hot)
    return (g_loss * loss).sum() + (g_nll * nll).sum()

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)


def test_gradient_keeps_the_logits_dtype():
  logits = jax.numpy.asarray(np.random.RandomState(2).randn(1, 3, V), jax.numpy.bfloat16)
  targets = np.array([[1, 2, 3]], np.int32)
  grad = jax.grad(lambda x: objective.smoothed_cross_entropy(x, targets, 0.1)[0].sum())(logits)
  assert grad.dtype == jax.numpy.bfloat16
  # Each row of p - q sums to zero (both are distributions).
  np.testing.assert_allclose(np.asarray(grad, np.float32).sum(-1), 0.0, atol=2e-2)


def test_pad_tokens_contribute_nothing():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 6, V).astype(np.float32)
  targets = rng.randint(PAD_ID + 1, V, size=(2, 6)).astype(np.int32)
  targets[0, 4:] = PAD_ID
  targets[1, 2:] = PAD_ID
  sums = objective.compute_metrics(logits, targets, 0.1)
  # Whatever the model says at pad positions changes nothing.
  other = logits.copy()
  other[targets == PAD_ID] = rng.randn(int((targets == PAD_ID).sum()), V) * 100
  other_sums = objective.compute_metrics(other, targets, 0.1)
  for key in sums:
    np.testing.assert_allclose(sums[key], other_sums[key], rtol=1e-6)
  # The sums are those of the real tokens alone.
  real = objective.compute_metrics(
      np.concatenate([logits[0, :4], logits[1, :2]])[None], 
      np.concatenate([targets[0, :4], targets[1, :2]])[None], 0.1)
  for key in sums:
    np.testing.assert_allclose(sums[key], real[key], rtol=1e-6)
  assert sums["num_tokens"] == 6
  correct = (logits.argmax(-1) == targets)[targets != PAD_ID].sum()
  assert sums["correct"] == correct


def test_no_smoothing_is_the_negative_log_likelihood():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 4, V).astype(np.float32)
  targets = rng.randint(1, V, size=(3, 4)).astype(np.int32)
  sums = objective.compute_metrics(logits, targets, 0.0)
  np.testing.assert_allclose(sums["loss"], sums["nll"], rtol=1e-6)


def test_normalize_divides_by_the_token_count():
  sums = {"loss": 12.0, "nll": 6.0, "correct": 3.0, "num_tokens": 4.0}
  metrics = objective.normalize_metrics(sums)
  np.testing.assert_allclose(metrics["loss"], 3.0)
  np.testing.assert_allclose(metrics["accuracy"], 0.75)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(1.5), rtol=1e-6)
  empty = objective.normalize_metrics({k: 0.0 for k in sums})
  assert np.isfinite(empty["loss"]) and empty["perplexity"] == 1.0


@pytest.mark.parametrize("bias", [False, True])
def test_projected_loss_sums_match_the_metrics_of_the_whole_logits(bias):
  """Block by block (here 3 blocks of 2 positions) gives compute_metrics' sums of the logits
  hidden @ table.T + bias, and the loss's gradient with respect to all three."""
  rng = np.random.RandomState(3)
  hidden = rng.randn(2, 6, 5).astype(np.float32)
  table = rng.randn(V, 5).astype(np.float32)
  bias_value = rng.randn(V).astype(np.float32) if bias else None
  targets = rng.randint(1, V, size=(2, 6)).astype(np.int32)
  targets[1, 3:] = PAD_ID

  def blocked(h, w, b):
    return objective.projected_loss_sums(h, w, b, targets, 0.1, block_bytes=2 * 2 * V * 4)

  def whole(h, w, b):
    logits = h @ w.T + (0.0 if b is None else b)
    return objective.compute_metrics(logits, targets, 0.1)

  ours, reference = blocked(hidden, table, bias_value), whole(hidden, table, bias_value)
  for key in reference:
    np.testing.assert_allclose(ours[key], reference[key], rtol=1e-6)
  grad = lambda f: jax.grad(lambda *a: f(*a)["loss"], argnums=(0, 1, 2))(
      hidden, table, bias_value)
  for got, want in zip(jax.tree.leaves(grad(blocked)), jax.tree.leaves(grad(whole))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def packed_padded_batch(vocab_size: int) -> dict:
  """Three rows of 8: one sequence with 2 pads, one full sequence, two packed sequences."""
  rng = np.random.RandomState(4)
  ids = rng.randint(4, vocab_size, size=(3, 8))
  ids[0, 6:] = PAD_ID
  segments = np.array([[1] * 6 + [0] * 2, [1] * 8, [1] * 3 + [2] * 5])
  positions = np.array([list(range(6)) + [0, 0], list(range(8)), [0, 1, 2, 0, 1, 2, 3, 4]])
  arrays = dict(inputs=ids, targets=np.roll(ids, 1, axis=1) * (segments > 0),
                inputs_positions=positions, targets_positions=positions,
                inputs_segment_ids=segments, targets_segment_ids=segments)
  return {k: jax.numpy.asarray(v, jax.numpy.int32) for k, v in arrays.items()}


# Every pair of settings once (4 of the 8 combinations; each case compiles two train steps).
@pytest.mark.parametrize("tie_output, norm, pos_encoding, final_logits_bias", [
    (True, "post", "sinusoidal", False), (False, "pre", "sinusoidal", False),
    (True, "pre", "learned", True), (False, "post", "learned", False)])
def test_train_step_gradients_equal_those_of_the_whole_logits(tie_output, norm, pos_encoding,
                                                              final_logits_bias, monkeypatch):
  """jaxformer.train.step's loss and gradients (hidden states, then projected_loss_sums in 4
  blocks) equal those of the model's logits through compute_metrics, to 1e-5 of each tensor's
  largest entry. The attention key biases, whose gradient is 0 (softmax ignores a shift of
  every score), are compared with 1e-7 absolute instead."""
  from jaxformer.model.transformer import Transformer
  from jaxformer.train import step as step_lib
  from tests.model.model_testing import random_params, tiny_config

  cfg = tiny_config(tie_output=tie_output, norm=norm, pos_encoding=pos_encoding, num_layers=1,
                    final_logits_bias=final_logits_bias)
  monkeypatch.setattr(objective, "block_length", lambda *_: 2)  # 4 blocks of 2 positions
  monkeypatch.setattr(objective, "BLOCKED_LOSS_BACKENDS", (jax.default_backend(),))
  model, params, batch = Transformer(cfg), random_params(cfg), packed_padded_batch(cfg.vocab_size)
  rng = jax.random.PRNGKey(0)
  grads, sums = jax.jit(lambda p: step_lib.gradient_sums(
      p, jax.tree.map(lambda x: x[None], batch), model=model, label_smoothing=0.1, rng=rng))(params)

  def whole(p):
    logits = model.apply({"params": p}, *(batch[k] for k in objective.BATCH_KEYS),
                         deterministic=False, rngs={"dropout": jax.random.fold_in(rng, 0)})
    reference = objective.compute_metrics(logits, batch["targets"], 0.1)
    return reference["loss"], reference
  want_grads, want = jax.jit(jax.grad(whole, has_aux=True))(params)
  for key in want:
    np.testing.assert_allclose(sums[key], want[key], rtol=1e-6)
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads),
                                   jax.tree.leaves(want_grads)):
    if "'key']['bias']" in jax.tree_util.keystr(path):
      np.testing.assert_allclose(got, expected, atol=1e-7)
    else:
      np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
