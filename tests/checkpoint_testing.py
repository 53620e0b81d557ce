"""Helpers of the checkpoint and inference tests: a stand-in train state, a grain iterator, and
the checkpoint written by older code (tests/fixtures/checkpoint_v0).

(A plain module, not conftest.py, so that tests import it by a name no other test uses.)

The train state here is a stand-in built like jaxformer's TrainState (a flax struct dataclass
with step, params and an optax Adam state), so the tests that use it do not depend on the model.
"""

import hashlib
import json
import os
import pathlib
import shutil

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib

NUM_EXAMPLES = 40
BATCH = 4

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# A whole workdir whose checkpoint the code before the checkpoint/inference split wrote
# (tests/fixtures/make_checkpoint_v0.py), and what was saved in it.
CHECKPOINT_V0 = os.path.join(FIXTURES, "checkpoint_v0")
CHECKPOINT_V0_EXPECTED = os.path.join(FIXTURES, "checkpoint_v0.json")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_state(seed: int, num_updates: int = 2, large: bool = False) -> TrainState:
  """A small state whose params and Adam moments are all different, non-trivial numbers.

  The optimizer clips before Adam, as train.grad_clip_norm > 0 does: its state then holds
  empty nodes (optax's EmptyState), which the checkpoint code must handle. With `large`, the
  params have one more array, `large.kernel` [32, 32], big enough for orbax to store its chunk
  apart (see `flip_four_bytes`)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {
      "embed": {"embedding": jax.random.normal(keys[0], (16, 8))},
      "dense": {"kernel": jax.random.normal(keys[1], (8, 24)), "bias": jnp.zeros(24)},
  }
  if large:
    params["large"] = {"kernel": jax.random.normal(keys[2], (32, 32))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  opt_state = tx.init(params)
  for i in range(num_updates):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.5)), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return TrainState(step=jnp.array(num_updates, jnp.int32), params=params, opt_state=opt_state)


def make_iterator():
  """The same seeded, shuffled, batched grain pipeline every time it is called (also the one
  of the checkpoint_v0 fixture)."""
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


def save_steps(workdir, steps, every_steps=1, keep=10, seeds=None, large=False, keep_best="",
               scores=None):
  """Saves make_state(seed, large=large) at each step; returns {step: state}. With `keep_best`,
  `scores` gives the validation value of that metric at each step (None: not evaluated)."""
  states, scores = {}, scores or {}
  iterator = make_iterator()
  with checkpoint.Checkpointer(workdir, every_steps=every_steps, keep=keep,
                               keep_best=keep_best) as ckpt:
    for i, step in enumerate(steps):
      next(iterator)
      states[step] = make_state(seeds[i] if seeds else step, large=large)
      score = scores.get(step)
      assert ckpt.save(step, states[step], iterator,
                       metrics=None if score is None else {keep_best: score})
  return states


def save_fsdp_state(workdir, step=2):
  """Saves make_state(1) sharded over 8 devices (the first axis, when 8 divides it); returns
  the state."""
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
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=3) as ckpt:
    ckpt.save(step, sharded, iterator)
  return state


def write_config(workdir, **overrides):
  config = config_lib.get_default_config()
  config_lib.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
  workdir_lib.write_run_config(str(workdir), config)
  return config


# --- Damage that orbax does not see. ----------------------------------------------------------

# The first bytes of an OCDBT b-tree node. Nodes carry a crc32c: a flipped byte in one is a read
# error. Values of up to 1024 bytes lie inside them; larger array chunks in data files apart
# (several to a file), each a zstd frame, compressed without a checksum.
OCDBT_NODE_MAGIC = bytes.fromhex("0cdb20de")
ZSTD_MAGIC = bytes.fromhex("28b52ffd")


def _frame_middles(data: bytes) -> list[int]:
  """The middle of every zstd frame of a data file (the frames follow each other)."""
  starts, at = [], data.find(ZSTD_MAGIC)
  while at >= 0:
    starts.append(at)
    at = data.find(ZSTD_MAGIC, at + 1)
  return [(a + b) // 2 for a, b in zip(starts, starts[1:] + [len(data)]) if b - a > 1024]


def read_params_unverified(ckpt_dir) -> dict[str, np.ndarray]:
  """{'params.dense.kernel': array, ...}: the params in `ckpt_dir` as orbax alone reads them
  (no checksums checked), in host memory."""
  state_dir = epath.Path(ckpt_dir) / checkpoint.STATE_ITEM
  tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree[checkpoint.PARAMS_KEY]
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      state_dir, args=ocp.args.PyTreeRestore(item={"params": shapes},
                                             restore_args={"params": restore_args},
                                             partial_restore=True))
  return {"params." + ".".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(restored["params"])[0]}


def flip_four_bytes(ckpt_dir) -> list[str]:
  """Flips (xor 0xFF) four bytes of a compressed array chunk of the params in `ckpt_dir`, at a
  place where orbax still reads the chunk without an error, to other numbers. Returns the flat
  keys of the params that changed (those of that chunk).

  A flipped byte inside a zstd frame mostly decodes to other numbers (Huffman-coded bytes fall
  back into step after a few symbols), but it could also break the decompression: then the
  next place is tried. A frame that reads back with no parameter changed holds optimizer state:
  it is put back and the next frame is tried."""
  before = read_params_unverified(ckpt_dir)
  files = sorted(p for p in pathlib.Path(ckpt_dir, checkpoint.STATE_ITEM).rglob("*")
                 if p.parent.name == "d" and p.read_bytes()[:4] != OCDBT_NODE_MAGIC)
  for path in files:
    original = path.read_bytes()
    for middle in _frame_middles(original):
      for offset in range(middle, middle + 8 * 61, 61):
        damaged = bytearray(original)
        damaged[offset:offset + 4] = bytes(b ^ 0xFF for b in original[offset:offset + 4])
        path.write_bytes(bytes(damaged))
        try:
          after = read_params_unverified(ckpt_dir)
        except Exception:  # The frame does not decompress any more: another place.
          continue
        changed = [k for k in before if not np.array_equal(before[k], after[k])]
        if changed:
          return changed
        break  # Read, and no parameter changed: a frame of the optimizer state.
    path.write_bytes(original)
  raise AssertionError(f"no place in the array chunks of {ckpt_dir} reads back as other "
                       "numbers without an error")


# --- The checkpoint written by older code. -----------------------------------------------------

def copy_checkpoint_v0(target) -> str:
  """A copy of the checkpoint_v0 workdir at `target` (tests must not change the fixture)."""
  return shutil.copytree(CHECKPOINT_V0, str(target))


def checkpoint_v0_expected() -> dict:
  with open(CHECKPOINT_V0_EXPECTED) as f:
    return json.load(f)


def digest(tree):
  """As make_checkpoint_v0.py recorded it: ({'path': {shape, dtype, sha256, sum}} of every
  leaf, the sha256 of all leaves' bytes in order)."""
  leaves = {}
  whole = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(np.asarray(leaf))
    whole.update(x.tobytes())
    leaves[jax.tree_util.keystr(path)] = {
        "shape": list(x.shape), "dtype": str(x.dtype),
        "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "sum": float(np.sum(x, dtype=np.float64))}
  return leaves, whole.hexdigest()
