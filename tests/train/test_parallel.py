"""The parallel strategies on 8 simulated CPU devices: same updates everywhere, clear errors.

Every expectation is a run of the same math elsewhere: one device is the reference for eight,
and one step on a 4x batch is the reference for 4 accumulated micro-batches.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_testing import random_batch, tiny_config

from jaxformer.errors import ConfigError
from jaxformer.train import parallel

STEPS = 3
TOLERANCE = 1e-5   # relative, per parameter array: ||a - b|| / ||b||


def relative_error(a, b) -> float:
  errors = jax.tree.map(lambda x, y: np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12),
                        a, b)
  return max(jax.tree.leaves(errors))


@functools.cache
def _cached_strategy(config, devices):
  return parallel.make_strategy(config, devices)


def get_strategy(config, devices=None):
  """make_strategy, but one per (config, devices): tests share their compiled steps."""
  return _cached_strategy(ml_collections.FrozenConfigDict(config),
                          None if devices is None else tuple(devices))


def train(config, batches, devices=None):
  """Runs len(batches) steps from train.seed; returns (params on the host, last metrics)."""
  strategy = get_strategy(config, devices)
  state = strategy.init_state(jax.random.key(config.train.seed))
  for batch in batches:
    state, metrics = strategy.train_step(state, strategy.shard_batch(batch))
  assert int(strategy.state_to_host(state).step) == len(batches)
  return strategy.state_to_host(state).params, jax.device_get(metrics)


def data(rows, steps=STEPS, seed=0):
  rng = np.random.RandomState(seed)
  return [random_batch(rng, rows) for _ in range(steps)]


@functools.cache
def one_device_reference():
  config = tiny_config()
  initial = get_strategy(config, jax.devices()[:1]).init_state(jax.random.key(0))
  params, metrics = train(config, data(config.train.batch_size), jax.devices()[:1])
  return jax.device_get(initial.params), params, metrics


@pytest.mark.parametrize("strategy, fsdp", [("mesh", 1), ("mesh", 4), ("pmap", 1)])
def test_eight_devices_make_the_same_updates_as_one(strategy, fsdp):
  assert jax.device_count() == 8
  initial, expected, expected_metrics = one_device_reference()
  assert relative_error(initial, expected) > 1e-3        # training did move the parameters
  config = tiny_config(**{"parallel.strategy": strategy, "parallel.fsdp": fsdp})
  params, metrics = train(config, data(config.train.batch_size))
  assert relative_error(params, expected) <= TOLERANCE
  for key in ("loss", "accuracy", "num_tokens", "learning_rate", "grad_norm"):
    np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)


def test_fsdp_shards_parameters_and_optimizer_state():
  config = tiny_config(**{"parallel.fsdp": 4})
  strategy = parallel.make_strategy(config)
  state = strategy.init_state(jax.random.key(0))
  sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in x.sharding.spec]
  assert sharded, "no parameter is sharded over fsdp"
  for x in sharded:
    dim = list(x.sharding.spec).index("fsdp")
    assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // 4
  mu = state.opt_state[0].mu   # Adam's first moment mirrors the parameters' shardings
  assert jax.tree.map(lambda m, p: m.sharding.spec == p.sharding.spec, mu, state.params)


def test_fsdp_partition_spec_picks_the_largest_divisible_dimension():
  assert parallel.fsdp_partition_spec((6, 8), 4) == P(None, "fsdp")
  assert parallel.fsdp_partition_spec((8, 8), 4) == P("fsdp", None)
  assert parallel.fsdp_partition_spec((12, 6), 4) == P("fsdp", None)
  assert parallel.fsdp_partition_spec((3, 5), 4) == P()
  assert parallel.fsdp_partition_spec((), 4) == P()
  assert parallel.fsdp_partition_spec((8, 8), 1) == P()


@pytest.mark.parametrize("strategy", ["mesh", "pmap"])
def test_four_accumulated_micro_batches_equal_one_big_batch(strategy):
  """One step over 4 micro-batches of 8 rows == one step over the 32 rows at once.

  The micro-batches hold very different numbers of real tokens (the last ones are mostly
  padding), so a mean of per-micro-batch means would give a different update.
  """
  rng = np.random.RandomState(1)
  micro_batches = [random_batch(rng, 8, min_tokens=tokens) for tokens in (8, 4, 1, 1)]
  for batch in micro_batches[2:]:
    for key in batch:
      batch[key][:, 2:] = 0
  big = {key: np.concatenate([b[key] for b in micro_batches]) for key in micro_batches[0]}
  counts = [(b["targets"] != 0).sum() for b in micro_batches]
  assert max(counts) > 2 * min(counts)

  reference = tiny_config(**{"train.batch_size": 32})
  expected, expected_metrics = train(reference, [big, big], jax.devices()[:1])
  config = tiny_config(**{"train.batch_size": 8, "train.grad_accum_steps": 4,
                          "parallel.strategy": strategy})
  params, metrics = train(config, [big, big])
  assert relative_error(params, expected) <= TOLERANCE
  for key in ("loss", "accuracy", "num_tokens", "grad_norm"):
    np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)


def test_mesh_dropout_does_not_depend_on_the_device_count():
  """Under jit the dropout masks are one global random array, split over the devices."""
  config = tiny_config(**{"model.dropout_rate": 0.3})
  batches = data(config.train.batch_size)
  expected, _ = train(config, batches, jax.devices()[:1])
  params, _ = train(config, batches)
  assert relative_error(params, expected) <= TOLERANCE
  _, without_dropout, _ = one_device_reference()    # the same run with dropout off
  assert relative_error(without_dropout, expected) > 1e-3   # dropout did change the updates


def test_eval_step_sums_over_all_devices():
  config = tiny_config()
  batch = data(config.eval.batch_size, steps=1)[0]
  results = {}
  for name, devices in (("mesh", jax.devices()[:1]), ("mesh", None), ("pmap", None)):
    config.parallel.strategy = name
    strategy = get_strategy(config, devices)
    state = strategy.init_state(jax.random.key(0))
    half = {key: x[:12] for key, x in batch.items()}   # 4 pad rows are added
    results[name, devices is None] = jax.device_get(
        strategy.eval_step(state.params, strategy.shard_eval_batch(half)))
  expected = results["mesh", False]
  assert expected["num_tokens"] == (batch["targets"][:12] != 0).sum()
  for key, value in results.items():
    for name in expected:
      np.testing.assert_allclose(value[name], expected[name], rtol=1e-5, err_msg=f"{key} {name}")


@pytest.mark.parametrize("strategy", ["mesh", "pmap"])
def test_indivisible_batch_is_a_config_error(strategy):
  config = tiny_config(**{"train.batch_size": 12, "parallel.strategy": strategy})
  with pytest.raises(ConfigError, match=r"train\.batch_size=12 .* 8 devices"):
    parallel.validate_for_devices(config)
  with pytest.raises(ConfigError, match=r"train\.batch_size"):
    parallel.make_strategy(config)
  parallel.validate_for_devices(config, jax.devices()[:4])   # 12 rows do fit on 4 devices


def test_fsdp_must_divide_the_devices_and_needs_mesh():
  with pytest.raises(ConfigError, match=r"parallel\.fsdp=3"):
    parallel.validate_for_devices(tiny_config(**{"parallel.fsdp": 3}))
  with pytest.raises(ConfigError, match=r"parallel\.fsdp=2 needs parallel\.strategy='mesh'"):
    parallel.validate_for_devices(tiny_config(**{"parallel.fsdp": 2,
                                                 "parallel.strategy": "pmap"}))
  with pytest.raises(ConfigError, match=r"eval\.batch_size=4"):
    parallel.validate_for_devices(tiny_config(**{"eval.batch_size": 4}))
