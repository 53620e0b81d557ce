"""Pure train and eval steps: `(state, batch) -> (state, metrics)`.

These functions know nothing about devices. jaxformer.train.parallel compiles them: under `jit`
with a device mesh they see the whole global batch at once; under `pmap` each device sees its
own slice and `axis_name` names the device axis over which sums are taken.

Batches are dicts of int32 arrays with the keys of objective.BATCH_KEYS (see
jaxformer.data.pipeline), which objective.forward_sums runs the model on. The train step takes
them with a leading micro-batch axis, `[A, B, L]` for A = `train.grad_accum_steps` micro-batches
of B rows; the eval step takes `[B, L]`.

Normalization. Gradients and metrics are first SUMMED over every real target token of every
micro-batch (and, under pmap, of every device), then divided once by that total token count.
So the update equals the one of a single step on the whole accumulated global batch, whatever
the number of devices or micro-batches.

Equal up to float32 rounding. The forward pass of a row is the same bit for bit on any device
layout; only the order of the sums over rows (the gradients, the clipping norm) differs, by
about 1e-7 relative. Later steps keep that size, except where a ReLU input lies within
rounding of 0: its sign may then differ between two runs, and with it one token's share of one
unit's gradient, which leaves the small tensors (biases and LayerNorm offsets, which start at
0) 1e-5 to 1e-3 apart. That is float32 arithmetic, not the placement: one device, fsdp and
pmap alike are hit, each run by chance (benchmarks/RESULTS.md has the measurements).

Dropout randomness. The key of a step is derived from the seed and the step only:

    key = fold_in(fold_in(PRNGKey(train.seed), step), device_index)   # pmap: each device
    key = fold_in(PRNGKey(train.seed), step)                          # jit: the whole batch
    micro-batch a uses fold_in(key, a)

Under jit the global batch is one program and its dropout masks are drawn as one global array;
JAX's partitionable threefry RNG (the default) gives each device its own slice of that array, so
masks differ per device and per host and the result does not depend on the number of devices.
Under pmap each device draws its own masks from its own key; `device_index` is the device's
position in `jax.devices()` (global over hosts), so a run on N devices is reproducible, but
differs from a run on a different number of devices.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxformer import objective
from jaxformer.train.schedule import make_schedule
from jaxformer.train.state import Params, TrainState

Batch = dict[str, jax.Array]


def dropout_key(seed: int, step: jax.Array, device_index: jax.Array | None = None) -> jax.Array:
  """The dropout key of one step (and, under pmap, one device). See the module docstring."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  if device_index is not None:
    key = jax.random.fold_in(key, device_index)
  return key


def gradient_sums(params: Params, micro_batches: Batch, *, model, label_smoothing: float,
                  rng: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
  """Gradient of the SUMMED loss, and the metric sums, over all micro-batches.

  Args:
    micro_batches: arrays [A, B, L]; micro-batches are processed one after another (lax.scan),
      so only one micro-batch's activations are alive at a time.
    rng: the step's dropout key; micro-batch a uses fold_in(rng, a).

  Returns:
    (grads, sums): the gradient of the sum of the token losses (not yet divided by the token
    count) and the summed metrics.
  """

  def one_micro_batch(a, batch):
    def loss_sum(p):
      sums = objective.forward_sums(p, batch, model=model, label_smoothing=label_smoothing,
                                    dropout_rng=jax.random.fold_in(rng, a))
      return sums["loss"], sums
    return jax.grad(loss_sum, has_aux=True)(params)

  num_micro_batches = micro_batches["targets"].shape[0]
  if num_micro_batches == 1:
    return one_micro_batch(0, jax.tree.map(lambda x: x[0], micro_batches))

  def accumulate(carry, xs):
    a, batch = xs
    grads, sums = one_micro_batch(a, batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.tree.map(jnp.zeros_like,
                       jax.eval_shape(one_micro_batch, 0,
                                      jax.tree.map(lambda x: x[0], micro_batches)))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                  (jnp.arange(num_micro_batches), micro_batches))
  return grads, sums


def train_step(state: TrainState, batch: Batch, *, model, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, axis_name: Hashable | None = None,
               device_index: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a (micro-batched) batch.

  Args:
    state: the current TrainState.
    batch: arrays [A, B, L] (A micro-batches of B rows; under pmap, this device's rows).
    model: the flax Transformer.
    optimizer: make_optimizer(config).
    config: the run's config (train.seed and train.label_smoothing are read).
    axis_name: under pmap, the device axis; gradient and metric sums are psum-med over it.
    device_index: under pmap, this device's global index (see dropout_key).

  Returns:
    (new_state, metrics) with the global per-token loss, accuracy and perplexity, the
    learning_rate of this update, the grad_norm (before clipping) and num_tokens (real target
    tokens in the whole global batch).
  """
  rng = dropout_key(config.train.seed, state.step, device_index)
  grads, sums = gradient_sums(state.params, batch, model=model,
                              label_smoothing=config.train.label_smoothing, rng=rng)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  num_tokens = jnp.maximum(sums["num_tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / num_tokens, grads)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  metrics = objective.normalize_metrics(sums)
  metrics["learning_rate"] = make_schedule(config)(state.step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return new_state, metrics


def eval_step(params: Params, batch: Batch, *, model, config: ml_collections.ConfigDict,
              axis_name: Hashable | None = None) -> dict[str, Any]:
  """Metric sums (loss, nll, correct, num_tokens) of one [B, L] batch, without dropout.

  Sum them over the batches of a split and call objective.normalize_metrics once at the end.
  The loss is label-smoothed like the training loss, so the two can be compared.
  """
  sums = objective.forward_sums(params, batch, model=model,
                                label_smoothing=config.train.label_smoothing, dropout_rng=None)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
