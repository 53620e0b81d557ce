"""The learning-rate schedules, against the paper's formula computed here independently."""

import numpy as np
import pytest

from jaxformer.train.schedule import make_schedule
from jaxformer.train.state import make_optimizer

from tests.train.train_testing import tiny_config


def paper_rate(step, d_model, warmup):
  """Vaswani et al. 2017, eq. (3): lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
  return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_rsqrt_warmup_matches_the_paper(scale):
  config = tiny_config(**{"model.d_model": 512, "train.warmup_steps": 4000,
                          "train.learning_rate": scale})
  schedule = make_schedule(config)
  for step in (1, 4000, 40000):
    # optax counts updates from 0: update number `step` (1-based, as the paper) has count step-1.
    np.testing.assert_allclose(schedule(step - 1), scale * paper_rate(step, 512, 4000),
                               rtol=1e-6)
  # Peak at the end of the warmup.
  assert schedule(3998) < schedule(3999) > schedule(4000)


def test_first_update_uses_step_one():
  """Adam's first step moves each parameter by about lr (m / sqrt(v) = sign(g))."""
  config = tiny_config(**{"train.warmup_steps": 10})
  optimizer = make_optimizer(config)
  params = {"w": np.zeros(3, np.float32)}
  grads = {"w": np.array([1.0, -2.0, 3.0], np.float32)}
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  expected = paper_rate(1, config.model.d_model, 10)
  np.testing.assert_allclose(updates["w"], -expected * np.sign(grads["w"]), rtol=1e-5)


def test_cosine_warms_up_then_decays_to_zero():
  config = tiny_config(**{"train.schedule": "cosine", "train.warmup_steps": 10,
                          "train.steps": 110, "train.learning_rate": 0.5})
  schedule = make_schedule(config)
  np.testing.assert_allclose(schedule(0), 0.5 * 1 / 10, rtol=1e-6)      # step 1
  np.testing.assert_allclose(schedule(9), 0.5, rtol=1e-6)               # step 10 = warmup
  np.testing.assert_allclose(schedule(59), 0.5 * 0.5 * (1 + np.cos(np.pi * 50 / 100)),
                             rtol=1e-5)                                 # step 60: halfway
  np.testing.assert_allclose(schedule(109), 0.0, atol=1e-7)             # step 110 = last


def test_constant_with_and_without_warmup():
  config = tiny_config(**{"train.schedule": "constant", "train.warmup_steps": 4,
                          "train.learning_rate": 0.1})
  schedule = make_schedule(config)
  np.testing.assert_allclose([schedule(c) for c in range(6)],
                             [0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)
  config.train.warmup_steps = 0
  schedule = make_schedule(config)
  np.testing.assert_allclose([schedule(c) for c in (0, 1000)], [0.1, 0.1])
