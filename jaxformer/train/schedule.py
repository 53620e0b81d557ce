"""Learning-rate schedules: the paper's inverse-square-root warmup, cosine, and constant.

Step numbering. optax calls a schedule with `count`, the number of updates already applied
(0 for the first update); `TrainState.step` holds the same number. The paper numbers updates
from 1. Every schedule here is written in the paper's numbering, `step = count + 1`: the first
update uses step 1, and update number `warmup_steps` is the last one of the warmup. With
gradient accumulation a step is one optimizer update (all its micro-batches together).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def rsqrt_warmup(step, *, d_model: int, warmup_steps: int, scale: float = 1.0):
  """The paper's schedule: scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

  It rises linearly for `warmup_steps` steps, peaks at step = warmup_steps, then decays as the
  inverse square root of the step. `step` counts from 1 (step 0 would divide by zero).
  """
  step = jnp.asarray(step, jnp.float32)
  return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)


def _from_update_count(schedule: optax.Schedule) -> optax.Schedule:
  """Turns a schedule of the 1-based step into one of optax's 0-based update count."""
  return lambda count: schedule(count + 1)


def _rsqrt_warmup(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  return lambda step: rsqrt_warmup(step, d_model=config.model.d_model,
                                   warmup_steps=t.warmup_steps, scale=t.learning_rate)


def _cosine(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=0.0)


def _constant(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  if t.warmup_steps > 0:
    return optax.linear_schedule(init_value=0.0, end_value=t.learning_rate,
                                 transition_steps=t.warmup_steps)
  return optax.constant_schedule(t.learning_rate)


# Each `train.schedule` choice, as a function of the 1-based step.
SCHEDULES = {"rsqrt_warmup": _rsqrt_warmup, "cosine": _cosine, "constant": _constant}


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning-rate schedule named by `train.schedule`, as a function of optax's count.

  - 'rsqrt_warmup': `rsqrt_warmup` above, scaled by `train.learning_rate` (1.0 is the paper).
  - 'cosine': linear warmup from 0 to `train.learning_rate` over `train.warmup_steps`, then
    cosine decay to 0 at step `train.steps`.
  - 'constant': linear warmup from 0 to `train.learning_rate`, then constant.

  `config` has passed `jaxformer.config.validate` (which refuses e.g. 'rsqrt_warmup' without
  warmup, or 'cosine' with no steps after the warmup); nothing is checked here.
  """
  return _from_update_count(SCHEDULES[config.train.schedule](config))
