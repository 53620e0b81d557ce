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

`forward_sums` runs the model on one batch (the keys of BATCH_KEYS) and returns those sums: the
train step takes its gradient, the eval steps of training (jaxformer.train.step) and of a
trained run (jaxformer.inference) add them up over a split.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.model.transformer import output_projection
from jaxformer.tokens import PAD_ID

Batch = dict[str, jax.Array]
# The arrays of a batch that the model reads (see jaxformer.data.pipeline), each [B, L] int32.
BATCH_KEYS = ("inputs", "targets", "inputs_positions", "targets_positions",
              "inputs_segment_ids", "targets_segment_ids")


def token_weights(targets: jax.Array) -> jax.Array:
  """1.0 for every real target token, 0.0 for padding. [B, T] int -> [B, T] float32."""
  return (targets != PAD_ID).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array,
                           label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Per-token label-smoothed cross entropy and plain negative log-likelihood, in float32.

  With lse = log sum_v exp(logits_v), -log p(v) = lse - logits_v, so the closed form of the
  module docstring is

      loss = lse - (1 - eps) * logits[target] - eps * mean_v(logits_v)
      nll  = lse - logits[target]

  Its gradient is written out too (`_cross_entropy_backward`): d loss / d logits = p - q, the
  predicted distribution minus the smoothed target, in one pass over the [B, T, V] logits
  (what autodiff would derive takes several; the vocabulary path dominates a large model's
  element-wise work).

  Args:
    logits: [B, T, V] unnormalized scores (any float dtype; upcast to float32).
    targets: [B, T] int token ids.
    label_smoothing: eps in [0, 1); 0 gives the plain cross entropy.

  Returns:
    (loss, nll), both [B, T] float32 and unweighted (pad positions included).
  """
  (loss, nll), _ = _cross_entropy_forward(logits, targets, label_smoothing)
  return loss, nll


def _cross_entropy_forward(logits, targets, label_smoothing):
  """(loss, nll) and what the backward pass needs: the logits and lse [B, T]."""
  scores = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(scores, axis=-1)                                   # [B, T]
  target_score = jnp.take_along_axis(scores, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_score
  loss = nll - label_smoothing * (jnp.mean(scores, axis=-1) - target_score)
  return (loss, nll), (logits, targets, lse)


def _cross_entropy_backward(label_smoothing, residuals, cotangents):
  """d/d logits of  g_loss * loss + g_nll * nll  =  g_loss * (p - q) + g_nll * (p - onehot).

  p = softmax(logits) = exp(logits - lse); q = (1 - eps) * onehot + eps / V.
  """
  logits, targets, lse = residuals
  g_loss, g_nll = cotangents                                                # [B, T] each
  vocab = logits.shape[-1]
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])              # [B, T, V]
  is_target = jnp.arange(vocab) == targets[..., None]                       # [B, T, V]
  target_weight = (1.0 - label_smoothing) * g_loss + g_nll
  grad = ((g_loss + g_nll)[..., None] * probs
          - jnp.where(is_target, target_weight[..., None], 0.0)
          - (label_smoothing / vocab * g_loss)[..., None])
  return grad.astype(logits.dtype), None                                    # no gradient for ids


smoothed_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def compute_metrics(logits: jax.Array, targets: jax.Array,
                    label_smoothing: float) -> dict[str, jax.Array]:
  """Sums over the real target tokens of a batch (float32 scalars).

  Returns a dict with
    loss:       sum of the label-smoothed cross entropy (what the gradient is taken of),
    nll:        sum of -log p(target) (no smoothing; gives the perplexity),
    correct:    number of tokens whose target has the highest score (the argmax prediction;
                a tie with another token counts as correct, which float scores make rare),
    num_tokens: number of real (non-pad) target tokens.
  Divide by the GLOBAL `num_tokens` (see `normalize_metrics`) after summing over devices.
  """
  weights = token_weights(targets)
  loss, nll = smoothed_cross_entropy(logits, targets, label_smoothing)
  # "target score == max score" rather than argmax: a plain max reduction, which XLA fuses;
  # argmax's index-carrying reduction over a 37000-token vocabulary costs 3% of a base step.
  target_score = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_score >= jnp.max(logits, axis=-1)).astype(jnp.float32)
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


# Where the training loss projects the vocabulary block by block (`projected_loss_sums`): on
# CPU the whole [B, T, V] float32 logits and their gradient do not fit in cache and each pass
# over them runs at memory speed. Accelerators fuse the whole-logits path in fast memory, and
# under data parallelism each block's table gradient would be summed over devices on its own
# (one all-reduce a block instead of one a step): they keep it.
BLOCKED_LOSS_BACKENDS = ("cpu",)

# The least bytes of float32 scores [B, t, V] that `projected_loss_sums` makes per block. Each
# block re-reads the [V, D] table (twice) and adds to its [V, D] gradient, so a block's scores
# are made at least as large as the table too: smaller blocks spend more on that traffic than
# they save.
BLOCK_BYTES = 4 << 20


def block_length(batch: int, length: int, vocab: int, block_bytes: int) -> int:
  """The positions t per block: the largest divisor of `length` whose [batch, t, vocab] float32
  scores fit in `block_bytes` (at least 1)."""
  fitting = [t for t in range(1, length + 1)
             if length % t == 0 and batch * t * vocab * 4 <= block_bytes]
  return max(fitting, default=1)


def _block_scores(hidden, table, bias):
  """One block's scores as the model's output projection computes them (in the hidden states'
  compute dtype, then float32): [B, t, D], [V, D], [V] or None -> [B, t, V]."""
  dtype = hidden.dtype
  scores = jnp.einsum("btd,vd->btv", hidden, table.astype(dtype))
  if bias is not None:
    scores = scores + bias.astype(dtype)
  return scores.astype(jnp.float32)


def _scan_blocks(hidden, table, bias, targets, label_smoothing, block, with_grad):
  """The metric sums over all blocks of `block` positions and, `with_grad`, the gradient of the
  loss sum with respect to (hidden, table, bias), each block's gradient made beside its loss.

  The blocks split the T axis, not B, so that a batch sharded over devices stays sharded.
  Returns ((loss, nll, correct) float32 sums, (d_hidden, d_table, d_bias) or None).
  """
  batch, length, d_model = hidden.shape
  to_blocks = lambda a: jnp.moveaxis(a.reshape(batch, length // block, block, *a.shape[2:]), 1, 0)
  zeros = (jnp.zeros(table.shape, jnp.float32),
           None if bias is None else jnp.zeros(bias.shape, jnp.float32))

  def one_block(carry, xs):
    x, y = xs                                                               # [B, t, D], [B, t]
    scores = _block_scores(x, table, bias)                                  # [B, t, V]
    (loss, nll), (_, _, lse) = _cross_entropy_forward(scores, y, label_smoothing)
    target_score = jnp.take_along_axis(scores, y[..., None], axis=-1)[..., 0]
    correct = (target_score >= jnp.max(scores, axis=-1)).astype(jnp.float32)
    weights = token_weights(y)
    sums = jnp.stack([jnp.sum(loss * weights), jnp.sum(nll * weights), jnp.sum(correct * weights)])
    if not with_grad:
      return carry, (sums, None)
    # d (sum of weights * loss) / d scores = weights * (p - q), as smoothed_cross_entropy's.
    g, _ = _cross_entropy_backward(label_smoothing, (scores, y, lse),
                                   (weights, jnp.zeros_like(weights)))
    g = g.astype(x.dtype)
    d_x = jnp.einsum("btv,vd->btd", g, table.astype(x.dtype))
    d_table = carry[0] + jnp.einsum("btv,btd->vd", g, x, preferred_element_type=jnp.float32)
    d_bias = None if bias is None else carry[1] + jnp.sum(g, axis=(0, 1), dtype=jnp.float32)
    return (d_table, d_bias), (sums, d_x)

  (d_table, d_bias), (sums, d_x) = jax.lax.scan(one_block, zeros,
                                                (to_blocks(hidden), to_blocks(targets)))
  loss, nll, correct = jnp.sum(sums, axis=0)
  if not with_grad:
    return (loss, nll, correct), None
  d_hidden = jnp.moveaxis(d_x, 0, 1).reshape(batch, length, d_model)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  return (loss, nll, correct), (d_hidden, d_table.astype(table.dtype), d_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _projected_sums(hidden, table, bias, targets, label_smoothing, block):
  return _scan_blocks(hidden, table, bias, targets, label_smoothing, block, False)[0]


def _projected_sums_forward(hidden, table, bias, targets, label_smoothing, block):
  # The cotangent of the loss sum is one scalar, so the gradient can be made in the forward
  # pass, while each block's scores are at hand, and the backward pass only scales it.
  return _scan_blocks(hidden, table, bias, targets, label_smoothing, block, True)


def _projected_sums_backward(label_smoothing, block, grads, cotangents):
  del label_smoothing, block
  g_loss = cotangents[0]  # nll and correct are metrics: projected_loss_sums stops their gradient
  d_hidden, d_table, d_bias = jax.tree.map(lambda d: (g_loss * d).astype(d.dtype), grads)
  return d_hidden, d_table, d_bias, None


_projected_sums.defvjp(_projected_sums_forward, _projected_sums_backward)


def projected_loss_sums(hidden: jax.Array, table: jax.Array, bias: jax.Array | None,
                        targets: jax.Array, label_smoothing: float,
                        block_bytes: int | None = None) -> dict[str, jax.Array]:
  """`compute_metrics` of the logits hidden @ table.T + bias, without the [B, T, V] logits.

  The T positions are cut into blocks of [B, t, V] scores (`block_length`); each block's
  scores, probabilities and gradient are made and consumed while they are in cache, instead of
  writing and re-reading the whole float32 [B, T, V] logits and their gradient several times.
  The same formulas as `smoothed_cross_entropy` and `compute_metrics`; only the order of the
  sums over tokens differs. Only the loss has a gradient (nll and correct are metrics).

  Args:
    hidden: [B, T, D] the decoder's last hidden states (its compute dtype sets the matmuls').
    table: [V, D] the output projection (jaxformer.model.transformer.output_projection).
    bias: [V] or None.
    targets: [B, T] int token ids; PAD_ID positions count nothing.
    label_smoothing: eps in [0, 1).
    block_bytes: the budget of one block's scores (None: the larger of BLOCK_BYTES and the
      float32 table's bytes).

  Returns:
    The sums of `compute_metrics`: loss, nll, correct, num_tokens (float32 scalars).
  """
  batch, length, _ = hidden.shape
  budget = block_bytes or max(BLOCK_BYTES, table.size * 4)
  block = block_length(batch, length, table.shape[0], budget)
  loss, nll, correct = _projected_sums(hidden, table, bias, targets, label_smoothing, block)
  return {
      "loss": loss,
      "nll": jax.lax.stop_gradient(nll),
      "correct": jax.lax.stop_gradient(correct),
      "num_tokens": jnp.sum(token_weights(targets)),
  }


def _apply(params: Any, batch: Batch, model, dropout_rng: jax.Array | None,
           method: str | None = None) -> jax.Array:
  """The model on a batch: its logits [B, T, V], or with method='hidden_states' its last
  hidden states [B, T, D]. Deterministic (no dropout) when `dropout_rng` is None."""
  return model.apply(
      {"params": params}, batch["inputs"], batch["targets"],
      inputs_positions=batch["inputs_positions"],
      targets_positions=batch["targets_positions"],
      inputs_segment_ids=batch["inputs_segment_ids"],
      targets_segment_ids=batch["targets_segment_ids"],
      deterministic=dropout_rng is None,
      rngs=None if dropout_rng is None else {"dropout": dropout_rng},
      method=method)


def forward_sums(params: Any, batch: Batch, *, model, label_smoothing: float,
                 dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
  """Runs `model` (the flax Transformer) on one batch and returns the sums of `compute_metrics`.

  `batch` holds the BATCH_KEYS arrays, [B, L] each. `dropout_rng=None` runs the model
  deterministically (no dropout), as in evaluation. On the backends of BLOCKED_LOSS_BACKENDS
  the model stops at its last hidden states and `projected_loss_sums` applies the output
  projection block by block; elsewhere the loss reads the model's whole logits.
  """
  if jax.default_backend() not in BLOCKED_LOSS_BACKENDS:
    return compute_metrics(_apply(params, batch, model, dropout_rng), batch["targets"],
                           label_smoothing)
  hidden = _apply(params, batch, model, dropout_rng, method="hidden_states")
  table, bias = output_projection(params, model.config)
  return projected_loss_sums(hidden, table, bias, batch["targets"], label_smoothing)
