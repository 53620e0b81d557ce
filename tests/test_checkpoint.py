"""Checkpoints: exact round trip, restore across device layouts, damage, averaging, preemption.

The train state here is a stand-in built like jaxformer's TrainState (a flax struct dataclass
with step, params and an optax Adam state), so these tests do not depend on the model.
"""

import json
import os

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError
from jaxformer.train import jax_internals

NUM_EXAMPLES = 40
BATCH = 4


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_state(seed: int, num_updates: int = 2) -> TrainState:
  """A small state whose params and Adam moments are all different, non-trivial numbers.

  The optimizer clips before Adam, as train.grad_clip_norm > 0 does: its state then holds
  empty nodes (optax's EmptyState), which the checkpoint code must handle."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {
      "embed": {"embedding": jax.random.normal(keys[0], (16, 8))},
      "dense": {"kernel": jax.random.normal(keys[1], (8, 24)), "bias": jnp.zeros(24)},
  }
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  opt_state = tx.init(params)
  for i in range(num_updates):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.5)), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return TrainState(step=jnp.array(num_updates, jnp.int32), params=params, opt_state=opt_state)


def make_iterator():
  """The same seeded, shuffled, batched grain pipeline every time it is called."""
  return iter(grain.MapDataset.range(NUM_EXAMPLES).shuffle(seed=7).batch(BATCH)
              .to_iter_dataset())


def abstract(state, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def one_device():
  return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P())


def assert_trees_identical(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y)


def save_steps(workdir, steps, every_steps=1, keep=10, seeds=None):
  """Saves make_state(seed) at each step; returns {step: state}."""
  states = {}
  iterator = make_iterator()
  with checkpoint.Checkpointer(workdir, every_steps=every_steps, keep=keep) as ckpt:
    for i, step in enumerate(steps):
      next(iterator)
      states[step] = make_state(seeds[i] if seeds else step)
      assert ckpt.save(step, states[step], iterator)
  return states


def write_config(workdir, **overrides):
  config = config_lib.get_default_config()
  config_lib.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
  workdir_lib.write_run_config(str(workdir), config)
  return config


def test_round_trip_is_bit_identical_and_the_iterator_continues(tmp_path):
  state = make_state(0)
  iterator = make_iterator()
  for _ in range(3):
    next(iterator)
  on_device = jax.tree.map(jnp.copy, state)
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    assert not ckpt.save(3, on_device, iterator)  # Not due: 3 is not a multiple of every_steps.
    assert ckpt.save(3, on_device, iterator, force=True)
    for leaf in jax.tree.leaves(on_device):
      leaf.delete()  # As donating the state to the next train step would, while it writes.
    expected_batches = [next(iterator) for _ in range(2)]  # What the run takes after saving.
    ckpt.wait()
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3

  fresh = make_iterator()
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    restored = ckpt.restore(3, abstract(state, one_device()), fresh)
  assert isinstance(restored, TrainState)
  assert_trees_identical(restored, state)
  for expected in expected_batches:
    np.testing.assert_array_equal(next(fresh), expected)


def test_fsdp_state_on_8_devices_restores_onto_1_device(tmp_path):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))

  def fsdp_sharding(x):  # Shard the first axis over the 8 devices when it divides evenly.
    spec = P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()
    return NamedSharding(mesh, spec)

  state = make_state(1)
  sharded = jax.tree.map(lambda x: jax.device_put(x, fsdp_sharding(x)), state)
  kernel = sharded.params["dense"]["kernel"]
  assert len({s.device for s in kernel.addressable_shards}) == 8
  assert kernel.addressable_shards[0].data.shape == (1, 24)  # Really split, one row per device.
  iterator = make_iterator()
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    ckpt.save(2, sharded, iterator)

  target = one_device()
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    restored = ckpt.restore(2, abstract(state, target), make_iterator())
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == target
  assert_trees_identical(restored, state)

  # Inference: the params alone, on one device, whatever the training layout was.
  write_config(tmp_path)
  params, step, _ = checkpoint.load_params(str(tmp_path), sharding=target)
  assert step == 2
  assert_trees_identical(params, state.params)
  assert all(leaf.sharding == target for leaf in jax.tree.leaves(params))


def test_load_params_replicates_on_local_devices_without_optimizer_state(tmp_path):
  states = save_steps(str(tmp_path), [1, 2])
  config = write_config(tmp_path, **{"model.d_model": 64})
  params, step, loaded_config = checkpoint.load_params(str(tmp_path), step=1)
  assert step == 1 and loaded_config.model.d_model == config.model.d_model == 64
  assert set(params) == {"embed", "dense"}  # Params only: no step, no optimizer moments.
  assert_trees_identical(params, states[1].params)
  kernel = params["dense"]["kernel"]
  assert len(kernel.sharding.device_set) == jax.local_device_count()
  assert kernel.sharding.is_fully_replicated
  newest, newest_step, _ = checkpoint.load_params(str(tmp_path))
  assert newest_step == 2
  assert_trees_identical(newest, states[2].params)


def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path):
  workdir = str(tmp_path)
  states = save_steps(workdir, [10, 20, 30])
  write_config(tmp_path)
  path = checkpoint.average_checkpoints(workdir, 2)
  assert path == os.path.join(workdir, "averaged", "last2_20-30")
  assert checkpoint.averaged_checkpoints(workdir) == ["last2_20-30"]

  averaged, label, _ = checkpoint.load_params(workdir, step="last2_20-30")
  assert label == "last2_20-30"
  expected = jax.tree.map(
      lambda a, b: ((np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2).astype(a.dtype),
      states[20].params, states[30].params)
  assert_trees_identical(averaged, expected)
  assert not np.array_equal(expected["dense"]["kernel"], states[30].params["dense"]["kernel"])

  for step in (10, 20, 30):  # The originals are unchanged.
    params, _, _ = checkpoint.load_params(workdir, step=step)
    assert_trees_identical(params, states[step].params)

  with pytest.raises(CheckpointError, match=r"last2_20-30 already exists; it is never overwritten"):
    checkpoint.average_checkpoints(workdir, 2)
  with pytest.raises(CheckpointError, match=r"cannot average the last 4 checkpoints: .* has 3 "
                                            r"\(steps: 10, 20, 30\)"):
    checkpoint.average_checkpoints(workdir, 4)


@pytest.mark.parametrize("damage", ["delete_metadata", "delete_array_data", "truncate_array_data",
                                    "delete_data_state"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys, damage):
  jax_internals.hide_closed_event_loop_noise()  # As the entry points do (pytest replaced it).
  workdir = str(tmp_path)
  states = save_steps(workdir, [1, 2])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  newest = os.path.join(ckpt_dir, "2")
  if damage == "delete_metadata":
    os.remove(os.path.join(newest, "state", "_METADATA"))
  elif damage in ("delete_array_data", "truncate_array_data"):  # The OCDBT data files.
    for root, _, files in os.walk(os.path.join(newest, "state")):
      for name in files:
        if os.path.basename(root) == "d":
          path = os.path.join(root, name)
          if damage == "delete_array_data":
            os.remove(path)
          else:
            with open(path, "rb") as f:
              data = f.read()
            with open(path, "wb") as f:
              f.write(data[:len(data) // 2])
  else:
    os.remove(os.path.join(newest, "data", "process_0-of-1.json"))
  # A save that never finished, as a process killed while writing leaves it.
  os.makedirs(os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp"))

  state = make_state(0)
  iterator = make_iterator()
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=10) as ckpt:
    restored, step = ckpt.restore_or_none(abstract(state, one_device()), iterator)
    assert ckpt.all_steps() == [1]
  assert step == 1
  assert_trees_identical(restored, states[1])
  err = capsys.readouterr().err
  reason = {"delete_metadata": "missing state/_METADATA",
            "delete_array_data": "missing file state/d/",
            "truncate_array_data": "truncated file state/d/",
            "delete_data_state": "missing data/process_0-of-1.json"}[damage]
  assert f"checkpoint at step 2 in {ckpt_dir} is damaged ({reason}" in err
  assert "; falling back to step 1 (" in err
  assert "3.orbax-checkpoint-tmp: a save that never finished" in err
  moved = os.path.join(workdir, "damaged", "2")
  assert moved in err and os.path.isdir(moved)  # Moved aside, not deleted.
  # The iterator continues after the first batch, where step 1 was saved.
  reference = make_iterator()
  next(reference)
  np.testing.assert_array_equal(next(iterator), next(reference))


def test_restore_step_that_does_not_exist_lists_the_steps(tmp_path):
  save_steps(str(tmp_path), [5, 10])
  state = make_state(0)
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 in .*; available steps: "
                                              r"5, 10$"):
      ckpt.restore_or_none(abstract(state, one_device()), make_iterator(), restore_step=7)
    restored, step = ckpt.restore_or_none(abstract(state, one_device()), make_iterator(),
                                          restore_step=5)
  assert step == 5 and int(restored.step) == 2


def test_resuming_with_another_number_of_processes_is_refused_not_skipped(tmp_path):
  save_steps(str(tmp_path), [1])
  data_dir = os.path.join(str(tmp_path), "checkpoints", "1", "data")
  os.rename(os.path.join(data_dir, "process_0-of-1.json"),
            os.path.join(data_dir, "process_0-of-2.json"))  # As a 2-process run saves it.
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    with pytest.raises(CheckpointError, match=r"holds the data iterator of 2 processes, this "
                                              r"run has 1"):
      ckpt.restore_or_none(abstract(make_state(0), one_device()), make_iterator())
    assert ckpt.all_steps() == [1]  # Not taken for damage: nothing moved.


def test_restore_onto_a_model_of_another_shape_names_the_leaf(tmp_path):
  save_steps(str(tmp_path), [1])
  other = make_state(0).replace(params={"embed": {"embedding": jnp.zeros((16, 4))},
                                        "dense": make_state(0).params["dense"]})
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*params\.embed\."
                                              r"embedding is \(16, 8\) in the checkpoint, "
                                              r"\(16, 4\) in the model"):
      ckpt.restore(1, abstract(other, one_device()), make_iterator())


def test_no_checkpoints_means_a_fresh_start(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    assert ckpt.restore_or_none(abstract(make_state(0), one_device()), make_iterator()) is None


def test_keep_policy_keeps_the_newest_and_the_best(tmp_path):
  iterator = make_iterator()
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.8}
  config = config_lib.get_default_config()
  config.checkpoint.update(every_steps=1, keep=2, keep_best="loss")
  with checkpoint.Checkpointer.from_config(str(tmp_path), config) as ckpt:
    for step, loss in losses.items():
      ckpt.save(step, make_state(step), iterator, metrics={"loss": loss, "accuracy": 0.5})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]  # The 2 newest, and step 2 with the lowest loss.
    assert ckpt.best_step() == 2


def test_check_compatible_names_breaking_keys_and_allows_harmless_ones():
  saved = config_lib.get_default_config()
  harmless = config_lib.get_default_config()
  harmless.train.steps = saved.train.steps * 2
  harmless.model.dropout_rate = 0.3
  harmless.checkpoint.keep = 7
  assert workdir_lib.check_compatible(saved, harmless) == [
      "checkpoint.keep", "model.dropout_rate", "train.steps"]

  changed = config_lib.get_default_config()
  changed.model.d_model = 256
  changed.train.steps = 5
  with pytest.raises(CheckpointError, match=r"model\.d_model \(512 -> 256\)") as info:
    workdir_lib.check_compatible(saved, changed)
  assert "train.steps" not in str(info.value)

  learned = config_lib.get_default_config()
  learned.model.pos_encoding = "learned"
  longer = config_lib.get_default_config()
  longer.model.pos_encoding = "learned"
  longer.model.max_len = 512
  with pytest.raises(CheckpointError, match=r"model\.max_len \(256 -> 512\)"):
    workdir_lib.check_compatible(learned, longer)
  sinusoidal_longer = config_lib.get_default_config()
  sinusoidal_longer.model.max_len = 512  # Sinusoidal positions have no parameters.
  assert workdir_lib.check_compatible(saved, sinusoidal_longer) == ["model.max_len"]


def test_write_run_files_keeps_history_and_refuses_incompatible_configs(tmp_path):
  workdir = str(tmp_path)
  write_config(tmp_path, **{"train.steps": 100})
  config_path = os.path.join(workdir, "config.json")
  assert json.load(open(config_path))["train"]["steps"] == 100
  write_config(tmp_path, **{"train.steps": 100})  # Same config: nothing to record.
  assert not os.path.exists(os.path.join(workdir, "config.1.json"))

  write_config(tmp_path, **{"train.steps": 200})
  assert json.load(open(config_path))["train"]["steps"] == 200
  assert json.load(open(os.path.join(workdir, "config.1.json")))["train"]["steps"] == 100

  before = open(config_path).read()
  with pytest.raises(CheckpointError, match=r"model\.num_layers \(6 -> 2\)"):
    write_config(tmp_path, **{"train.steps": 200, "model.num_layers": 2})
  assert open(config_path).read() == before
  assert workdir_lib.read_run_config(workdir).train.steps == 200


def test_load_params_without_checkpoints_is_a_clear_error(tmp_path):
  write_config(tmp_path)
  with pytest.raises(CheckpointError, match=r"no checkpoints in .*checkpoints; train first"):
    checkpoint.load_params(str(tmp_path))
  with pytest.raises(CheckpointError, match=r"does not exist"):
    checkpoint.load_params(str(tmp_path / "missing"))


def test_load_params_of_a_missing_step_lists_the_available_ones(tmp_path):
  save_steps(str(tmp_path), [3, 6])
  write_config(tmp_path)
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 4 .*available steps: 3, 6$"):
    checkpoint.load_params(str(tmp_path), step=4)
  with pytest.raises(CheckpointError, match=r"no averaged checkpoint 'last9_1-2'"):
    checkpoint.load_params(str(tmp_path), step="last9_1-2")


def test_should_save_says_when_a_save_is_due_without_saving(tmp_path):
  state = make_state(0)
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [5, 10]
    assert ckpt.all_steps() == []
    assert ckpt.save(5, state, make_iterator(), force=True)
    ckpt.wait()
    assert not ckpt.should_save(5)  # On disk already.
    assert ckpt.should_save(10)
