"""jaxformer/devices.py: how arrays are split over the fsdp axis, the checks against the
devices, copying arrays to the host."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer import devices
from jaxformer.errors import ConfigError

from tests.train.train_testing import tiny_config


def test_fsdp_partition_spec_picks_the_largest_divisible_dimension():
  assert devices.fsdp_partition_spec((6, 8), 4) == P(None, "fsdp")
  assert devices.fsdp_partition_spec((8, 8), 4) == P("fsdp", None)
  assert devices.fsdp_partition_spec((12, 6), 4) == P("fsdp", None)
  assert devices.fsdp_partition_spec((3, 5), 4) == P()
  assert devices.fsdp_partition_spec((), 4) == P()
  assert devices.fsdp_partition_spec((8, 8), 1) == P()


def test_fsdp_and_eval_batch_must_divide_the_devices():
  with pytest.raises(ConfigError, match=r"parallel\.fsdp=3"):
    devices.validate_for_devices(tiny_config(**{"parallel.fsdp": 3}))
  with pytest.raises(ConfigError, match=r"eval\.batch_size=4"):
    devices.validate_for_devices(tiny_config(**{"eval.batch_size": 4}))


def test_to_host_copies_a_sharded_array_whole():
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
  x = np.arange(32, dtype=np.float32).reshape(8, 4)
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  assert len(sharded.addressable_shards) == 8
  host = devices.to_host(sharded)
  assert isinstance(host, np.ndarray)
  np.testing.assert_array_equal(host, x)
