"""Tests of jaxformer/checkpoint.py: exact round trip, restore across device layouts, damage
(including damage only the checksums see), the checksums themselves, the keep policy, and a
checkpoint written by older code.

The train state here is a stand-in built like jaxformer's TrainState (checkpoint_testing), so
these tests do not depend on the model; only the older checkpoint holds the real TrainState.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.checkpoint import DamagedCheckpointError
from jaxformer.errors import CheckpointError
from jaxformer.train import jax_internals
from jaxformer.train import state as state_lib

from tests import checkpoint_testing
from tests.checkpoint_testing import (TrainState, abstract, assert_trees_identical,
                                      make_iterator, make_state, one_device, save_steps)


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
    saved_position = iterator.get_state()
    expected_batches = [next(iterator) for _ in range(2)]  # What the run takes after saving.
    ckpt.wait()
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3

  # Beside the step: the checksum of every array and of the iterator's position.
  checksums = read_checksums(os.path.join(str(tmp_path), "checkpoints", "3"))
  assert checksums["arrays"] == checkpoint.array_checksums(state)
  assert list(checksums["arrays"]) == list(checkpoint.flat_shapes(state))
  assert checksums["data"] == {"0": checkpoint.iterator_state_digest(saved_position)}

  fresh = make_iterator()
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    restored = ckpt.restore(3, abstract(state, one_device()), fresh)
  assert isinstance(restored, TrainState)
  assert_trees_identical(restored, state)
  # grain gives the state back as it was set: its digest is the saved one.
  assert checkpoint.iterator_state_digest(fresh.get_state()) == checksums["data"]["0"]
  for expected in expected_batches:
    np.testing.assert_array_equal(next(fresh), expected)


def test_fsdp_state_on_8_devices_restores_onto_1_device(tmp_path):
  state = checkpoint_testing.save_fsdp_state(str(tmp_path), step=2)

  target = one_device()
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    restored = ckpt.restore(2, abstract(state, target), make_iterator())
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == target
  assert_trees_identical(restored, state)


def read_checksums(step_dir):
  return ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / checkpoint.CHECKSUMS_ITEM)


def change_data_state(step_dir):
  """Moves the saved iterator position one example on: still a valid grain state."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path) as f:
    state = json.load(f)
  state["next_index"] += 1
  with open(path, "w") as f:
    json.dump(state, f, indent=4)


@pytest.mark.parametrize("damage", ["delete_metadata", "delete_array_data", "truncate_array_data",
                                    "delete_data_state", "flip_array_bytes",
                                    "change_data_state", "mangle_checksums"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys, damage):
  jax_internals.hide_closed_event_loop_noise()  # As the entry points do (pytest replaced it).
  workdir = str(tmp_path)
  states = save_steps(workdir, [1, 2], large=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  newest = os.path.join(ckpt_dir, "2")
  reason = {"delete_metadata": "missing state/_METADATA",
            "delete_array_data": "missing file state/d/",
            "truncate_array_data": "truncated file state/d/",
            "delete_data_state": "missing data/process_0-of-1.json",
            "change_data_state": "data/process_0-of-1.json does not match its checksum)",
            "mangle_checksums": "unreadable checksums: "}.get(damage)
  if damage == "flip_array_bytes":  # Orbax reads other numbers, without an error.
    changed = checkpoint_testing.flip_four_bytes(newest)
    reason = f"{changed[0]} does not match its checksum)"
  elif damage == "change_data_state":
    change_data_state(newest)
  elif damage == "mangle_checksums":
    with open(os.path.join(newest, "checksums", "metadata"), "w") as f:
      f.write('{"format": 1, "arr')
  elif damage == "delete_metadata":
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

  state = make_state(0, large=True)
  iterator = make_iterator()
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=10) as ckpt:
    restored, step = ckpt.restore_or_none(abstract(state, one_device()), iterator)
    assert ckpt.all_steps() == [1]
  assert step == 1
  assert_trees_identical(restored, states[1])
  err = capsys.readouterr().err
  assert f"checkpoint at step 2 in {ckpt_dir} is damaged ({reason}" in err
  assert "; falling back to step 1 (" in err
  assert "3.orbax-checkpoint-tmp: a save that never finished" in err
  moved = os.path.join(workdir, "damaged", "2")
  assert moved in err and os.path.isdir(moved)  # Moved aside, not deleted.
  # The iterator continues after the first batch, where step 1 was saved.
  reference = make_iterator()
  next(reference)
  np.testing.assert_array_equal(next(iterator), next(reference))


@pytest.mark.parametrize("sharding", ["host", "one_device"])
def test_restore_params_refuses_params_that_do_not_match_their_checksums(tmp_path, sharding):
  workdir = str(tmp_path)
  states = save_steps(workdir, [1, 2], large=True)
  target = None if sharding == "host" else one_device()
  step_dir, _ = checkpoint.checkpoint_dir(workdir, 2)
  intact = checkpoint.restore_params(step_dir, 2, workdir, target)  # Checked, and intact.
  assert_trees_identical(intact, states[2].params)
  changed = checkpoint_testing.flip_four_bytes(step_dir)
  with pytest.raises(DamagedCheckpointError,
                     match=rf"^checkpoint at step 2 in {re.escape(workdir)} is damaged "
                           rf"\({changed[0]} does not match its checksum\)$"):
    checkpoint.restore_params(step_dir, 2, workdir, target)


def test_an_averaged_checkpoint_is_checked_too(tmp_path):
  params = make_state(1, large=True).params
  out = checkpoint.averaged_path(str(tmp_path), [1, 2])
  checkpoint.save_averaged(out, jax.device_get(params), [1, 2], source="somewhere")
  assert_trees_identical(checkpoint.restore_params(out, out.name, str(tmp_path)), params)
  changed = checkpoint_testing.flip_four_bytes(out)
  with pytest.raises(DamagedCheckpointError, match=rf"\({changed[0]} does not match its "):
    checkpoint.restore_params(out, out.name, str(tmp_path))


# --- The checksums. ------------------------------------------------------------------------------

def checksum_examples():
  """Arrays of every kind a state holds: float32, bfloat16, int32, uint8, bool, a typed PRNG key
  array and a scalar."""
  x = jax.random.normal(jax.random.key(3), (16, 24))
  return {"float32": x, "bfloat16": x.astype(jnp.bfloat16),
          "int32": jnp.arange(16 * 24, dtype=jnp.int32).reshape(16, 24) * 7919,
          "uint8": (jnp.arange(16 * 24) % 251).astype(jnp.uint8).reshape(16, 24),
          "bool": (x > 0), "keys": jax.random.split(jax.random.key(4), 16),
          "scalar": jnp.array(12345, jnp.int32)}


def test_the_checksum_is_the_same_whatever_the_sharding_and_on_the_host():
  arrays = checksum_examples()
  on_one = checkpoint.array_checksums(jax.device_put(arrays, one_device()))
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  layouts = {"fsdp over 8": P("fsdp"), "2 x 4": P("data", "fsdp"), "columns": P(None, "fsdp"),
             "replicated": P()}
  for name, spec in layouts.items():
    placed = {k: jax.device_put(x, NamedSharding(mesh, spec if x.ndim >= len(spec) else P()))
              for k, x in arrays.items()}
    assert checkpoint.array_checksums(placed) == on_one, name
  assert len(placed["float32"].sharding.device_set) == 8
  host = {k: np.asarray(x) for k, x in arrays.items() if k != "keys"}  # NumPy has no key type.
  host["keys"] = np.asarray(jax.random.key_data(arrays["keys"]))
  assert checkpoint.array_checksums(host) == on_one
  # Summed where each shard lies: no device gathers the array.
  fsdp = jax.device_put(arrays["float32"], NamedSharding(mesh, P(("data", "fsdp"))))
  hlo = checkpoint._device_checksum.lower(fsdp).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo


def test_any_changed_word_changes_the_checksum():
  x = np.asarray(checksum_examples()["float32"])
  reference = checkpoint.array_checksums({"x": x})["x"]
  for index in [(0, 0), (7, 13), (15, 23)]:
    for bit in (0, 22, 31):
      changed = x.copy()
      changed.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checkpoint.array_checksums({"x": changed})["x"] != reference, (index, bit)
  swapped = x.copy()
  swapped[[2, 9]] = swapped[[9, 2]]  # Same words, other places: only the weighted sum sees it.
  plain, weighted = checkpoint.array_checksums({"x": swapped})["x"]
  assert plain == reference[0] and weighted != reference[1]


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


def test_readers_see_only_finished_steps_while_a_save_is_under_way(tmp_path):
  """evaluate, translate and average run beside a trainer: they must not pick a step orbax is
  still writing (it renames `<step>.orbax-checkpoint-tmp-<time>` into place when complete)."""
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(ckpt_dir, "2"),  # Every file there, but not yet renamed.
                  os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp-1767225600123456"))
  os.makedirs(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp"))
  assert checkpoint.saved_steps(workdir) == [1, 2]
  assert checkpoint.checkpoint_dir(workdir, None) == (
      workdir_lib.path(workdir, "checkpoints", "2"), 2)
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 3 .*available steps: 1, 2"):
    checkpoint.checkpoint_dir(workdir, 3)


def test_no_checkpoints_means_a_fresh_start(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=3) as ckpt:
    assert ckpt.restore_or_none(abstract(make_state(0), one_device()), make_iterator()) is None


def best_step(ckpt):
  """The step with the lowest recorded loss, from the metrics orbax keeps beside each step (what
  the keep_best policy chooses by)."""
  recorded = {}
  for step in ckpt.all_steps():
    with open(os.path.join(ckpt.directory, str(step), "metrics", "metrics")) as f:
      recorded[step] = json.load(f)["loss"]
  return min(recorded, key=recorded.get)


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
    assert best_step(ckpt) == 2


def every_file(directory):
  """{path: (size, mtime)} of every file and directory under `directory`."""
  return {os.path.join(d, name): (os.stat(os.path.join(d, name)).st_size,
                                  os.stat(os.path.join(d, name)).st_mtime_ns)
          for d, dirs, files in os.walk(directory) for name in dirs + files}


# Validation scores by step (None: saved without an evaluation); the best is step 2 either way,
# and reading the order the wrong way round would pick step 1.
SCORES = {"loss": {1: 3.0, 2: 1.0, 3: None, 4: 2.5, 5: None},
          "accuracy": {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: None}}


@pytest.mark.parametrize("keep_best", ["loss", "accuracy"])
def test_step_best_is_the_best_recorded_step_read_without_writing(tmp_path, keep_best):
  workdir = str(tmp_path)
  checkpoint_testing.save_steps(workdir, [1, 2, 3, 4, 5], keep_best=keep_best,
                                scores=SCORES[keep_best])
  checkpoint_testing.write_config(tmp_path, **{"checkpoint.keep_best": keep_best})
  before = every_file(workdir)
  assert checkpoint.best_step(workdir) == 2
  assert checkpoint.checkpoint_dir(workdir, "best") == (
      workdir_lib.path(workdir, "checkpoints", "2"), 2)
  assert every_file(workdir) == before  # Nothing created, written or deleted.


def test_step_best_of_a_run_that_kept_none_says_what_to_do(tmp_path):
  without = str(tmp_path / "without")
  checkpoint_testing.save_steps(without, [1, 2])
  checkpoint_testing.write_config(without)
  with pytest.raises(CheckpointError, match=(
      r"^--step best: the run in .*without kept no best checkpoint \(checkpoint.keep_best is "
      r"not set; train with --config.checkpoint.keep_best=loss, .*\); choose a step with "
      r"--step N \(available steps: 1, 2\)$")):
    checkpoint.checkpoint_dir(without, "best")

  unscored = str(tmp_path / "unscored")  # keep_best set, but no step saved at an evaluation.
  checkpoint_testing.save_steps(unscored, [1, 2], keep_best="bleu", scores={})
  checkpoint_testing.write_config(unscored, **{"checkpoint.keep_best": "bleu"})
  with pytest.raises(CheckpointError, match=(
      r"^--step best: no saved step of the run in .*unscored has a validation bleu .*; choose "
      r"a step with --step N \(available steps: 1, 2\)$")):
    checkpoint.best_step(unscored)

  os.remove(os.path.join(unscored, workdir_lib.CONFIG_FILE))
  with pytest.raises(CheckpointError, match=r"config.json is missing, so which metric"):
    checkpoint.best_step(unscored)


def test_should_save_says_when_a_save_is_due_without_saving(tmp_path):
  state = make_state(0)
  with checkpoint.Checkpointer(str(tmp_path), every_steps=5, keep=3) as ckpt:
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [5, 10]
    assert ckpt.all_steps() == []
    assert ckpt.save(5, state, make_iterator(), force=True)
    ckpt.wait()
    assert not ckpt.should_save(5)  # On disk already.
    assert ckpt.should_save(10)


def test_a_checkpoint_written_by_older_code_restores_bit_for_bit(tmp_path):
  workdir = checkpoint_testing.copy_checkpoint_v0(tmp_path / "v0")
  expected = checkpoint_testing.checkpoint_v0_expected()
  step_dir = os.path.join(workdir, "checkpoints", str(expected["step"]))
  assert not os.path.exists(os.path.join(step_dir, "checksums"))  # Restored unverified.
  config = workdir_lib.read_run_config(workdir)
  shapes = jax.eval_shape(lambda rng: state_lib.init_state(config, rng), jax.random.key(0))
  iterator = make_iterator()
  with checkpoint.Checkpointer.from_config(workdir, config) as ckpt:
    assert ckpt.all_steps() == [expected["step"]]
    restored, step = ckpt.restore_or_none(abstract(shapes, one_device()), iterator)
  assert step == expected["step"] and int(restored.step) == expected["step"]
  params, params_digest = checkpoint_testing.digest(restored.params)
  assert params == expected["params"]
  assert params_digest == expected["params_sha256"]
  assert checkpoint_testing.digest(restored)[1] == expected["state_sha256"]  # Adam moments too.
  for batch in expected["next_batches"]:  # The iterator continues where the run left it.
    assert next(iterator).tolist() == batch
