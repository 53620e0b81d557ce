"""The training objective: label-smoothed cross entropy over the real target tokens, and metrics.

Label smoothing (Szegedy et al. 2016, which the paper cites, eps = 0.1): the model is trained
towards the distribution

    q(v) = (1 - eps) * [v == target] + eps / V        for every token v of the V in the vocab,

the one-hot target mixed with the uniform distribution. This is `optax.smooth_labels`; the
target keeps 1 - eps + eps / V and every other token gets eps / V. The loss per token is the
cross entropy H(q, p) = -sum_v q(v) log p(v), which in closed form is

    (1 - eps) * (-log p(target)) + eps * mean_v(-log p(v)),

computed that way below so the [B, T, V] smoothed labels never exist in memory. Its minimum,
reached when p = q, is the entropy of q, not 0.

Every function returns SUMS over the real target tokens (`targets != PAD_ID`); pad tokens add
nothing. The caller divides by the token count of the whole global batch, so that one device and
64 devices make the same update (not a mean of per-device means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.data.tokenizer import PAD_ID


def token_weights(targets: jax.Array) -> jax.Array:
  """1.0 for every real target token, 0.0 for padding. [B, T] int -> [B, T] float32."""
  return (targets != PAD_ID).astype(jnp.float32)


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array,
                           label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Per-token label-smoothed cross entropy and plain negative log-likelihood, in float32.

  Args:
    logits: [B, T, V] unnormalized scores (any float dtype; upcast to float32).
    targets: [B, T] int token ids.
    label_smoothing: eps in [0, 1); 0 gives the plain cross entropy.

  Returns:
    (loss, nll), both [B, T] float32 and unweighted (pad positions included).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  uniform_nll = -jnp.mean(log_probs, axis=-1)
  loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform_nll
  return loss, nll


def compute_metrics(logits: jax.Array, targets: jax.Array,
                    label_smoothing: float) -> dict[str, jax.Array]:
  """Sums over the real target tokens of a batch (float32 scalars).

  Returns a dict with
    loss:       sum of the label-smoothed cross entropy (what the gradient is taken of),
    nll:        sum of -log p(target) (no smoothing; gives the perplexity),
    correct:    number of tokens whose argmax prediction is the target,
    num_tokens: number of real (non-pad) target tokens.
  Divide by the GLOBAL `num_tokens` (see `normalize_metrics`) after summing over devices.
  """
  weights = token_weights(targets)
  loss, nll = smoothed_cross_entropy(logits, targets, label_smoothing)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "loss": jnp.sum(loss * weights),
      "nll": jnp.sum(nll * weights),
      "correct": jnp.sum(correct * weights),
      "num_tokens": jnp.sum(weights),
  }


def normalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-token loss, accuracy and perplexity from the (global) sums of `compute_metrics`.

  A batch without any real token gives loss 0, accuracy 0 and perplexity 1 instead of NaN.
  """
  num_tokens = jnp.maximum(sums["num_tokens"], 1.0)
  return {
      "loss": sums["loss"] / num_tokens,
      "accuracy": sums["correct"] / num_tokens,
      "perplexity": jnp.exp(sums["nll"] / num_tokens),
      "num_tokens": sums["num_tokens"],
  }
