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
