"""TrainState, the optimizer chain (clipping, weight decay) and parameter counting."""

import functools

import jax
import numpy as np

from jaxformer.train import state as state_lib

from tests.train.train_testing import tiny_config


def test_init_state_and_parameter_counts():
  config = tiny_config()
  state = jax.jit(functools.partial(state_lib.init_state, config))(jax.random.key(0))
  assert state.step.dtype == np.int32 and int(state.step) == 0
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(state.params))
  # A pure pytree: step, every parameter and the optimizer's arrays are its leaves.
  assert len(jax.tree.leaves(state)) == 1 + len(jax.tree.leaves(state.params)) + len(
      jax.tree.leaves(state.opt_state))
  # The shape-only count agrees with the real parameters, module by module.
  counts = state_lib.count_parameters_by_module(config, depth=1)
  assert set(counts) == set(state.params) | {"total"}
  for name, subtree in state.params.items():
    assert counts[name] == sum(p.size for p in jax.tree.leaves(subtree))
  assert counts["total"] == sum(p.size for p in jax.tree.leaves(state.params))


def test_count_is_shape_only_for_the_paper_base_model():
  """The base model (about 65M parameters in the paper) is counted without allocating it."""
  config = tiny_config(**{"model.vocab_size": 37000, "model.d_model": 512, "model.d_ff": 2048,
                          "model.num_heads": 8, "model.num_layers": 6, "model.max_len": 256})
  total = state_lib.count_parameters_by_module(config)["total"]
  assert 55e6 < total < 75e6


def test_clipping_bounds_the_global_gradient_norm():
  # With a large Adam epsilon the update is lr * g / (|g| + eps), so it shows the clipped g.
  config = tiny_config(**{"train.schedule": "constant", "train.warmup_steps": 0,
                          "train.learning_rate": 0.1, "train.adam_eps": 1.0,
                          "train.grad_clip_norm": 1.0})
  grads = {"w": np.array([3.0, 4.0], np.float32)}          # global norm 5
  params = {"w": np.zeros(2, np.float32)}
  optimizer = state_lib.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  clipped = grads["w"] / 5.0
  np.testing.assert_allclose(updates["w"], -0.1 * clipped / (np.abs(clipped) + 1.0), rtol=1e-5)
  config.train.grad_clip_norm = 0.0
  optimizer = state_lib.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * grads["w"] / (grads["w"] + 1.0), rtol=1e-5)


def test_weight_decay_shrinks_matrices_only():
  config = tiny_config(**{"train.schedule": "constant", "train.warmup_steps": 0,
                          "train.learning_rate": 0.1, "train.weight_decay": 0.5})
  params = {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.full(2, 2.0, np.float32)}
  grads = jax.tree.map(np.zeros_like, params)
  optimizer = state_lib.make_optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], 0.0)
