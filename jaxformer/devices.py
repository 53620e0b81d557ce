"""The devices of a run: joining the processes of a pod, checking a config against the devices,
the device mesh's axes and how an array is split over them, and copying arrays to the host.

Used by training (jaxformer.train.parallel) and by using a trained run (jaxformer.inference).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxformer.errors import ConfigError

MESH_AXES = ("data", "fsdp")   # batch over both; parameters over 'fsdp'.


# --- Several processes (hosts). ------------------------------------------------------------------

COORDINATOR_ENV = "JAXFORMER_COORDINATOR_ADDRESS"   # host:port of process 0's coordinator
NUM_PROCESSES_ENV = "JAXFORMER_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXFORMER_PROCESS_ID"
AUTO_ENV = "JAXFORMER_DISTRIBUTED"                  # 'auto': TPU VMs and clusters JAX detects


def initialize_distributed() -> None:
  """Joins this process to a multi-process run, when the environment says it is one.

  - `JAXFORMER_COORDINATOR_ADDRESS`, `JAXFORMER_NUM_PROCESSES` and `JAXFORMER_PROCESS_ID` set
    (by `launch.sh --processes`, or by hand / a scheduler on a GPU cluster): join them.
  - `JAXFORMER_DISTRIBUTED=auto` (set by `launch.sh --tpu`): `jax.distributed.initialize()`
    with no arguments, which finds the peers itself on TPU VMs, SLURM and other clusters.
  - neither: a single-process run; nothing to do.
  On CPU the collectives between processes go through gloo. Call before any other jax work.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if env.get(COORDINATOR_ENV):
    try:
      num_processes, process_id = int(env[NUM_PROCESSES_ENV]), int(env[PROCESS_ID_ENV])
    except (KeyError, ValueError):
      raise ConfigError(f"{COORDINATOR_ENV} is set, so {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} "
                        "must be set to whole numbers too") from None
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env[COORDINATOR_ENV],
                               num_processes=num_processes, process_id=process_id)
  elif env.get(AUTO_ENV) == "auto":
    jax.distributed.initialize()


def is_first_process() -> bool:
  """Whether this is process 0, the one that writes what a multi-process run produces once."""
  return jax.process_index() == 0


# --- Checks that need to know the devices. ----------------------------------------------------

def validate_for_devices(config: ml_collections.ConfigDict,
                         devices: Sequence[jax.Device] | None = None) -> None:
  """Raises ConfigError when the config cannot run on `devices` (default: all of jax.devices()).

  Only the checks that need the devices: `config` has passed `jaxformer.config.validate`, which
  checks the values themselves. Cheap and side-effect free: the CLI calls it before anything is
  written to the workdir.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  num_processes = len({d.process_index for d in devices})
  fsdp = config.parallel.fsdp
  if num_devices % fsdp:
    divisors = [k for k in range(1, num_devices + 1) if num_devices % k == 0]
    raise ConfigError(f"parallel.fsdp={fsdp} does not divide the {num_devices} devices; "
                      f"choose one of {divisors}")
  for key, batch_size in (("train.batch_size", config.train.batch_size),
                          ("eval.batch_size", config.eval.batch_size)):
    if batch_size % num_devices or batch_size % num_processes:
      raise ConfigError(f"{key}={batch_size} is not divisible by the {num_devices} devices "
                        f"({num_processes} processes); use a multiple of {num_devices}")


def make_mesh(devices: Sequence[jax.Device], fsdp: int = 1) -> Mesh:
  """The ('data', 'fsdp') mesh of `devices`: groups of `fsdp` devices share the parameters'
  shards, and the batch is split over both axes."""
  return jax.make_mesh((len(devices) // fsdp, fsdp), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def fsdp_partition_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """How one parameter (or optimizer-state) array of `shape` is split over the 'fsdp' axis.

  The largest dimension that `fsdp` divides is split (the first of equal ones); an array with
  no such dimension (scalars, odd sizes) is replicated.
  """
  if fsdp > 1:
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if shape[dim] % fsdp == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return P(*spec)
  return P()


def inference_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh that uses a trained run: every device (of every process), with the run's fsdp
  groups when `fsdp` divides the devices (else none: the parameters are then replicated)."""
  devices = list(jax.devices() if devices is None else devices)
  return make_mesh(devices, fsdp if len(devices) % fsdp == 0 else 1)


def param_shardings(mesh: Mesh, shapes: Any) -> Any:
  """Where each parameter of `shapes` (a pytree of arrays or ShapeDtypeStructs) lies on `mesh`:
  split over its 'fsdp' axis as in training (fsdp_partition_spec), replicated without one."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_partition_spec(x.shape, fsdp)), shapes)


def place(tree: Any, shardings: Any) -> Any:
  """`tree`'s arrays (NumPy, or jax arrays this process holds whole) onto `shardings` (a pytree
  of them, or one for every leaf), on one process or many: each process supplies the parts its
  devices hold, so the value must be the same on every process."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


# --- Arrays to the host. --------------------------------------------------------------------

def to_host(x: jax.Array) -> np.ndarray:
  """The whole array in host memory (a collective when other hosts hold parts of it)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:  # Every host has all of it.
    return np.asarray(x.addressable_data(0))
  return multihost_utils.process_allgather(x, tiled=True)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of `x`, an array split by rows (axis 0) over devices: its shards in row
  order, each row once (the same rows on several devices are taken once)."""
  shards = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])
