"""The training state (step, parameters, optimizer state), the optimizer, and parameter counts."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxformer.train.schedule import make_schedule

Params = Any  # A nested dict of float32 arrays, as flax makes it.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as a plain pytree (orbax saves it as it is).

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far (0 before the first).
      It is also optax's update count, so `make_schedule(config)(step)` is the learning rate of
      the next update.
    params: the model parameters, float32.
    opt_state: the optimizer state of `make_optimizer(config)`.
  """
  step: jax.Array
  params: Params
  opt_state: optax.OptState


def frozen(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The config as a FrozenConfigDict (hashable, so it can configure a flax module)."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config
  return ml_collections.FrozenConfigDict(config)


def make_model(config: ml_collections.ConfigDict):
  """The Transformer described by `config.model`."""
  from jaxformer.model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  return Transformer(config=frozen(config).model)


def _decay_mask(params: Params) -> Params:
  """Weight decay applies to matrices (kernels, embeddings), not to biases or LayerNorm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the configured betas, epsilon and schedule; optional clipping and weight decay.

  The chain is: clip the global gradient norm to `train.grad_clip_norm` (when > 0), then Adam
  (`train.adam_b1`, `train.adam_b2`, `train.adam_eps`; the paper's 0.9, 0.98, 1e-9) with the
  learning rate `make_schedule(config)`, with decoupled weight decay `train.weight_decay` (AdamW,
  when > 0) on matrices only.

  Gradient accumulation (`train.grad_accum_steps`) is not done here with optax.MultiSteps but
  inside the train step (jaxformer.train.step): MultiSteps averages the per-micro-batch mean
  gradients, which weighs a token of a short micro-batch more than one of a long micro-batch,
  while the step sums over all micro-batches first and divides once by the token count of the
  whole accumulated batch. One call of the step is then one update, and `TrainState.step`
  counts updates.
  """
  t = config.train
  schedule = make_schedule(config)
  if t.weight_decay > 0:
    adam = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                       weight_decay=t.weight_decay, mask=_decay_mask)
  else:
    adam = optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)
  if t.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adam)
  return adam


def dummy_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(inputs, targets), [1, L] each, only to give `model.init` the shapes of a batch."""
  shape = (1, config.data.max_len)
  return jnp.ones(shape, jnp.int32), jnp.ones(shape, jnp.int32)


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> Params:
  """Fresh float32 model parameters from `rng`."""
  variables = make_model(config).init({"params": rng}, *dummy_inputs(config), deterministic=True)
  return jax.tree.map(lambda p: p.astype(jnp.float32), variables["params"])


def state_from_params(config: ml_collections.ConfigDict, params: Params) -> TrainState:
  """A TrainState at step 0 holding `params`, with the optimizer's initial state.

  The start of fine-tuning (jaxformer.train.finetune): the parameters of another run, and an
  optimizer, step and schedule that start afresh. Pure and traceable, like `init_state`.
  """
  opt_state = make_optimizer(config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """A fresh TrainState: step 0, new parameters from `rng`, the optimizer's initial state.

  Pure and traceable: jaxformer.train.parallel jit-compiles it with output shardings, so that
  parameters are created where they live and never all on one device.
  """
  return state_from_params(config, init_params(config, rng))


def count_parameters_by_module(config: ml_collections.ConfigDict, depth: int = 2
                               ) -> dict[str, int]:
  """Parameters per module, to `depth` levels ('encoder', 'encoder/layers_0', ...), + 'total'.

  Uses jax.eval_shape: only shapes are computed, no memory is allocated, so it is instant even
  for the big model. Modules come in the model's order, each followed by its sub-modules.
  """
  shapes = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
  counts: dict[str, int] = {}

  def visit(tree, prefix: str, level: int) -> int:
    total = 0
    for name, subtree in tree.items():
      path = f"{prefix}/{name}" if prefix else name
      if isinstance(subtree, dict):
        if level < depth:
          counts[path] = 0  # Keeps the parent before its children.
        count = visit(subtree, path, level + 1)
      else:
        count = int(np.prod(subtree.shape))
      if level < depth and isinstance(subtree, dict):
        counts[path] = count
      total += count
    return total

  counts["total"] = visit(shapes, "", 0)
  return counts
