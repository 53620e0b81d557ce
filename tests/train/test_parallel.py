"""The parallel strategies on 8 simulated CPU devices: same updates everywhere, clear errors.

Every expectation is a run of the same math elsewhere: one device is the reference for eight,
and one step on a 4x batch is the reference for 4 accumulated micro-batches.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from jaxformer import devices
from jaxformer.errors import ConfigError
from jaxformer.train import parallel

from tests.train.train_testing import random_batch, tiny_config, worst_relative_error

STEPS = 3
TOLERANCE = 1e-5   # relative, per parameter array: ||a - b|| / ||b||


def equivalence_config(**overrides):
  """The tiny model without attention biases, its gradients clipped at every step.

  Clipping (as the default experiment does) makes the update depend on the global norm of the
  gradients, which under fsdp is computed from the sharded gradients (the norms of the three
  steps are about 1.6, 1.0 and 0.7).

  The gradient of the attention KEY bias is zero in exact arithmetic (adding the same number to
  every score of a softmax changes nothing), so in floats it is rounding noise, which differs
  with the order of the sums. Adam divides by the gradient's own size (eps = 1e-9), turning that
  noise into full-size random steps; such a parameter has no "same update" to compare.
  """
  return tiny_config(**{"model.attention_bias": False, "train.grad_clip_norm": 0.5,
                        **overrides})


def relative_error(a, b) -> float:
  """The largest per-tensor ||a - b|| / ||b|| of two parameter trees."""
  return worst_relative_error(a, b)[1]


@functools.cache
def _cached_strategy(config, devices):
  return parallel.make_strategy(config, devices)


def get_strategy(config, devices=None):
  """make_strategy, but one per (config, devices): tests share their compiled steps."""
  return _cached_strategy(ml_collections.FrozenConfigDict(config),
                          None if devices is None else tuple(devices))


def data(rows=16, steps=STEPS, seed=0):
  """`steps` batches of `rows` rows; the last quarter of the rows hold at most 2 tokens, so
  devices and micro-batches see very different numbers of real tokens."""
  rng = np.random.RandomState(seed)
  batches = [random_batch(rng, rows, min_tokens=3) for _ in range(steps)]
  for batch in batches:
    for x in batch.values():
      x[-rows // 4:, 2:] = 0
  return batches


@functools.cache
def one_device_reference():
  """(initial state, final params, last metrics) of STEPS steps on one device, numpy."""
  config = equivalence_config()
  strategy = get_strategy(config, jax.devices()[:1])
  initial = strategy.state_to_host(strategy.init_state(jax.random.key(config.train.seed)))
  params, metrics = train(config, data(), jax.devices()[:1], initial)
  return initial, params, metrics


def train(config, batches, devices=None, initial=None):
  """Runs len(batches) steps from the host state `initial`; returns (params, last metrics).

  Placing one initial state everywhere (instead of each strategy's own init_state) saves a
  compilation per strategy; init_state itself is checked in other tests.
  """
  strategy = get_strategy(config, devices)
  if initial is None:
    initial = one_device_reference()[0]
  state = strategy.place_state(initial)
  for batch in batches:
    state, metrics = strategy.train_step(state, strategy.shard_batch(batch))
  state = strategy.state_to_host(state)
  assert int(state.step) == len(batches)
  return state.params, jax.device_get(metrics)


def assert_same_training(params, metrics, expected_params, expected_metrics):
  path, error = worst_relative_error(params, expected_params)
  assert error <= TOLERANCE, f"{path} differs by {error:.3g} (relative)"
  for key in ("loss", "accuracy", "perplexity", "num_tokens", "learning_rate", "grad_norm"):
    np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("strategy, fsdp",
                         [("mesh", 1), ("mesh", 2), ("mesh", 4), ("mesh", 8), ("pmap", 1)])
def test_eight_devices_make_the_same_updates_as_one(strategy, fsdp):
  """Data parallel, and parameters split over groups of 2, 4 or all 8 devices (fsdp).

  Only the order of the float32 sums over rows differs from one device (the forward pass is
  the same bit for bit), so every tensor ends within rounding of one device's. Where it does
  not, look for a ReLU input within rounding of 0 (about 1e-7): its sign, and with it one
  token's share of the next gradient, can then differ (benchmarks/RESULTS.md).
  """
  assert jax.device_count() == 8
  initial, expected, expected_metrics = one_device_reference()
  assert relative_error(initial.params, expected) > 1e-3   # training did move the parameters
  config = equivalence_config(**{"parallel.strategy": strategy, "parallel.fsdp": fsdp})
  assert expected_metrics["grad_norm"] > config.train.grad_clip_norm   # the last step clipped
  assert_same_training(*train(config, data()), expected, expected_metrics)


@pytest.mark.parametrize("strategy", ["mesh", "pmap"])
def test_four_accumulated_micro_batches_equal_one_big_batch(strategy):
  """4 micro-batches of 4 rows (on 4 devices) == one step over the 16 rows at once.

  The last micro-batch holds far fewer real tokens than the first, so a mean of
  per-micro-batch means would give a different update.
  """
  counts = [(b != 0).sum() for b in np.split(data()[0]["targets"], 4)]
  assert counts[-1] * 2 < counts[0]
  _, expected, expected_metrics = one_device_reference()   # batch_size 16, no accumulation
  config = equivalence_config(**{"train.batch_size": 4, "train.grad_accum_steps": 4,
                                 "parallel.strategy": strategy})
  assert_same_training(*train(config, data(), jax.devices()[:4]), expected, expected_metrics)


def test_fsdp_shards_parameters_and_optimizer_state():
  strategy = get_strategy(equivalence_config(**{"parallel.fsdp": 4}))
  state = strategy.init_state(jax.random.key(0))
  sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in x.sharding.spec]
  assert len(sharded) > len(jax.tree.leaves(state.params)) // 2
  for x in sharded:
    dim = list(x.sharding.spec).index("fsdp")
    assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // 4
  mu = state.opt_state[1][0].mu   # of (clip, (Adam, schedule)): Adam's mu, split like params
  assert all(jax.tree.leaves(jax.tree.map(lambda m, p: m.sharding == p.sharding, mu,
                                          state.params)))
  # The sharded init is the same as the one-device init.
  host = strategy.state_to_host(state)
  assert relative_error(host.params, one_device_reference()[0].params) == 0.0


def test_mesh_dropout_does_not_depend_on_the_device_count():
  """Under jit the dropout masks are one global random array, split over the devices."""
  config = equivalence_config(**{"model.dropout_rate": 0.3})
  expected, _ = train(config, data(), jax.devices()[:1])
  params, _ = train(config, data())
  assert relative_error(params, expected) <= TOLERANCE
  _, without_dropout, _ = one_device_reference()    # the same run with dropout off
  assert relative_error(without_dropout, expected) > 1e-3   # dropout did change the updates


def test_eval_step_sums_over_all_devices():
  batch = data(steps=1)[0]
  half = {key: x[:12] for key, x in batch.items()}   # shard_eval_batch adds 4 pad rows
  config = equivalence_config()
  initial = one_device_reference()[0]
  results = {}
  for name in ("mesh", "pmap"):
    config.parallel.strategy = name
    strategy = get_strategy(config)
    if name == "pmap":   # (mesh init_state is checked with fsdp above)
      state = strategy.init_state(jax.random.key(config.train.seed))
      assert relative_error(strategy.state_to_host(state).params, initial.params) == 0.0
    else:
      state = strategy.place_state(initial)
    results[name] = jax.device_get(
        strategy.eval_step(state.params, strategy.shard_eval_batch(half)))
  assert results["mesh"]["num_tokens"] == (half["targets"] != 0).sum()
  assert results["mesh"]["loss"] > 0
  for key in results["mesh"]:
    np.testing.assert_allclose(results["pmap"][key], results["mesh"][key], rtol=1e-5,
                               err_msg=key)


@pytest.mark.parametrize("strategy", ["mesh", "pmap"])
def test_indivisible_batch_is_a_config_error(strategy):
  config = tiny_config(**{"train.batch_size": 12, "parallel.strategy": strategy})
  with pytest.raises(ConfigError, match=r"train\.batch_size=12 .* 8 devices"):
    devices.validate_for_devices(config)
  with pytest.raises(ConfigError, match=r"train\.batch_size"):
    parallel.make_strategy(config)
  devices.validate_for_devices(config, jax.devices()[:4])   # 12 rows do fit on 4 devices
