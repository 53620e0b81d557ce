"""Devices and parallel strategies: where the state lives and how a step runs on many devices.

Two strategies share one interface (`Strategy`), so the training loop does not care which runs:

- 'mesh' (default): one `jax.jit` program over a `Mesh` of all devices with axes
  ('data', 'fsdp'). The batch is split over both axes (every device gets different rows);
  parameters and optimizer state are replicated when `parallel.fsdp` is 1, and with
  `parallel.fsdp` = F > 1 each array is split over the F devices of an 'fsdp' group along its
  largest dimension that F divides (replicated if none does). There are no hand-written
  collectives: from the shardings, XLA inserts the all-gathers of parameters and the
  reductions of gradients.
- 'pmap': classic replicated data parallelism. `jax.pmap` runs the step on each local device
  with a copy of the whole state; gradient and metric sums are added over all devices (of
  every host) with `lax.psum`, then divided by the global token count.

Batches. Every host feeds its own rows, `[rows, L]` numpy arrays from the data pipeline, and
`shard_batch` assembles the global batch from them:
  train: `host_batch_size` = grad_accum_steps * batch_size / process_count rows per host; rows
         [a * b, (a + 1) * b) of a host form its part of micro-batch a (b = batch_size /
         process_count). The loop may also concatenate `grad_accum_steps` pipeline batches.
  eval:  `eval_host_batch_size` = eval.batch_size / process_count rows per host; a shorter last
         batch is padded with pad rows, which count for nothing.

Multi-host. Only `jax.devices()`, `jax.local_devices()` and `jax.process_index()` are used to
find this host's devices; every host must call the same methods in the same order. Starting the
distributed runtime (jaxformer.devices.initialize_distributed) is done before any of this.

Where a host's rows go. Both strategies keep the order of `jax.devices()`, which lists the
devices process by process, and give device d the d-th slice of the global batch; so process p's
rows become rows [p * b, (p + 1) * b) of every global micro-batch. The data pipeline deals its
shuffled pairs to the processes in blocks of b (pipeline.train_shard), so process p's rows are
exactly those rows of what one process alone would read: 2 processes x 2 devices train on the
same global batches, in the same row order (hence with the same dropout masks), as 1 process x
4 devices. (On a TPU pod, `jax.make_mesh` may order the chips by their physical layout; the
global batch then holds the same pairs with the hosts' blocks in another order.)
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Sequence

import flax.jax_utils
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import devices as devices_lib
from jaxformer import objective
from jaxformer.tokens import PAD_ID
from jaxformer.train import state as state_lib
from jaxformer.train import step as step_lib
from jaxformer.train.state import Params, TrainState

PMAP_AXIS = "devices"          # the axis name of the pmapped steps.

HostBatch = dict[str, np.ndarray]
Batch = dict[str, jax.Array]


def _check_rows(host_batch: HostBatch, rows: int, what: str) -> None:
  for key in objective.BATCH_KEYS:
    if key not in host_batch:
      raise ValueError(f"{what} batch has no {key!r}; it needs {objective.BATCH_KEYS}")
    if host_batch[key].shape[0] != rows:
      raise ValueError(f"{what} batch {key!r} has {host_batch[key].shape[0]} rows; this host "
                       f"feeds {rows} rows per step")


def _pad_rows(host_batch: HostBatch, rows: int) -> HostBatch:
  """Appends pad rows (all PAD_ID: no real target token, so they count for nothing)."""
  def pad(x):
    x = np.asarray(x, np.int32)
    if x.shape[0] > rows:
      raise ValueError(f"eval batch has {x.shape[0]} rows; this host feeds at most {rows}")
    return np.concatenate([x, np.full((rows - x.shape[0],) + x.shape[1:], PAD_ID, np.int32)])
  return {key: pad(host_batch[key]) for key in objective.BATCH_KEYS}


# --- The interface. ----------------------------------------------------------------------------

class Strategy(abc.ABC):
  """Places the state and batches on devices and runs compiled train and eval steps.

  Attributes:
    config: the run's config.
    devices: every device taking part (of all hosts), in order.
    local_devices: those of this host (process).
    host_batch_size: rows this host feeds to each `shard_batch` (all micro-batches).
    eval_host_batch_size: rows this host feeds to each `shard_eval_batch`.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None):
    devices_lib.validate_for_devices(config, devices)
    self.config = state_lib.frozen(config)
    self.devices = list(jax.devices() if devices is None else devices)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    # This host's share of every batch: its devices' rows.
    local, total = len(self.local_devices), len(self.devices)
    self.micro_batch_rows = config.train.batch_size * local // total
    self.host_batch_size = config.train.grad_accum_steps * self.micro_batch_rows
    self.eval_host_batch_size = config.eval.batch_size * local // total
    self.model = state_lib.make_model(self.config)
    self.optimizer = state_lib.make_optimizer(self.config)

  def _micro_batches(self, host_batch: HostBatch) -> HostBatch:
    """This host's rows, [A * b, L] -> [A, b, L] (micro-batch a = rows [a * b, (a + 1) * b))."""
    _check_rows(host_batch, self.host_batch_size, "train")
    accum = self.config.train.grad_accum_steps
    return {key: np.asarray(host_batch[key], np.int32).reshape(
        (accum, self.micro_batch_rows) + host_batch[key].shape[1:])
            for key in objective.BATCH_KEYS}

  @abc.abstractmethod
  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh TrainState from `rng` (the same on every host), placed on the devices."""

  @abc.abstractmethod
  def shard_batch(self, host_batch: HostBatch) -> Batch:
    """This host's `host_batch_size` training rows -> the global training batch on devices."""

  @abc.abstractmethod
  def shard_eval_batch(self, host_batch: HostBatch) -> Batch:
    """This host's (at most) `eval_host_batch_size` rows -> the global eval batch on devices."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One update (compiled; `state` is donated: use only the returned one).

    Returns the new state and scalar metrics of the whole global batch (see step.train_step).
    """

  @abc.abstractmethod
  def eval_step(self, params: Params, batch: Batch) -> dict[str, Any]:
    """Global metric sums of one eval batch (see step.eval_step).

    `params` is `state.params` as this strategy holds it (replicated per device under pmap).
    """

  @abc.abstractmethod
  def state_to_host(self, state: TrainState) -> TrainState:
    """The whole state as numpy arrays on this host (a collective: every host must call it)."""

  @abc.abstractmethod
  def place_state(self, state: TrainState) -> TrainState:
    """The inverse of state_to_host: any state with the right shapes, placed on the devices.

    Every host must pass the same values (e.g. all restored from one checkpoint).
    """

  @abc.abstractmethod
  def abstract_state(self) -> TrainState:
    """The state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), as a target for
    restoring a checkpoint directly onto devices; feed what is restored to `place_state`."""

  def checkpoint_state(self, state: TrainState) -> TrainState:
    """The state as a checkpoint stores it: one copy, whatever the device count."""
    return state

  @abc.abstractmethod
  def inference_params(self, state: TrainState) -> Params:
    """Parameters that an ordinary jit-compiled function (the attention picture) can take, on
    this host's devices only (a collective when other hosts hold parts of them)."""

  @abc.abstractmethod
  def decoding_params(self, state: TrainState) -> tuple[Params, Mesh]:
    """(parameters, mesh) for decode.ParallelDecoder: every device of every process decodes
    its own rows of the validation batches, with the parameters as training holds them."""

  def state_shapes(self) -> TrainState:
    """Shapes and dtypes of the (single, unreplicated) state, computed without allocating it."""
    return jax.eval_shape(functools.partial(state_lib.init_state, self.config),
                          jax.random.key(0))


# --- 'mesh': jit with a device mesh and named shardings. ----------------------------------------

class MeshStrategy(Strategy):
  """jax.jit over a ('data', 'fsdp') Mesh; the whole global batch is one program."""

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None):
    super().__init__(config, devices)
    fsdp = self.config.parallel.fsdp
    self.mesh = devices_lib.make_mesh(self.devices, fsdp)
    self.replicated = NamedSharding(self.mesh, P())
    axes = devices_lib.MESH_AXES
    self.eval_batch_sharding = NamedSharding(self.mesh, P(axes))        # [B, L]
    self.train_batch_sharding = NamedSharding(self.mesh, P(None, axes))  # [A, B, L]
    self.state_sharding = jax.tree.map(
        lambda leaf: NamedSharding(self.mesh,
                                   devices_lib.fsdp_partition_spec(leaf.shape, fsdp)),
        self.state_shapes())

    self._init = jax.jit(functools.partial(state_lib.init_state, self.config),
                         out_shardings=self.state_sharding)
    self._train_step = jax.jit(
        functools.partial(step_lib.train_step, model=self.model, optimizer=self.optimizer,
                          config=self.config),
        in_shardings=(self.state_sharding, self.train_batch_sharding),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=0)
    self._eval_step = jax.jit(
        functools.partial(step_lib.eval_step, model=self.model, config=self.config),
        in_shardings=(self.state_sharding.params, self.eval_batch_sharding),
        out_shardings=self.replicated)

  def init_state(self, rng: jax.Array) -> TrainState:
    return self._init(rng)

  def _global_batch(self, local: HostBatch, sharding: NamedSharding, batch_axis: int) -> Batch:
    def assemble(x):
      global_shape = list(x.shape)
      global_shape[batch_axis] = x.shape[batch_axis] * len(self.devices) // len(
          self.local_devices)
      return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return {key: assemble(x) for key, x in local.items()}

  def shard_batch(self, host_batch: HostBatch) -> Batch:
    return self._global_batch(self._micro_batches(host_batch), self.train_batch_sharding, 1)

  def shard_eval_batch(self, host_batch: HostBatch) -> Batch:
    return self._global_batch(_pad_rows(host_batch, self.eval_host_batch_size),
                              self.eval_batch_sharding, 0)

  def train_step(self, state, batch):
    return self._train_step(state, batch)

  def lowerable_train_step(self, length: int) -> tuple[Any, TrainState, Batch]:
    """(the jitted train step, its abstract state, its abstract global batch): the arguments
    are jax.ShapeDtypeStruct leaves with this strategy's shardings, the batch `[A, B, length]`
    int32 (A = train.grad_accum_steps, B = train.batch_size), as
    `jax.export.export(step, platforms=...)(state, batch)` takes them to build the program of
    another platform (a GPU's, a TPU's) on this machine, without running or compiling it."""
    shape = (self.config.train.grad_accum_steps, self.config.train.batch_size, length)
    batch = {key: jax.ShapeDtypeStruct(shape, np.int32, sharding=self.train_batch_sharding)
             for key in objective.BATCH_KEYS}
    return self._train_step, self.abstract_state(), batch

  def eval_step(self, params, batch):
    return self._eval_step(params, batch)

  def state_to_host(self, state):
    return jax.tree.map(devices_lib.to_host, state)

  def place_state(self, state):
    def place(x, sharding):
      if isinstance(x, jax.Array):   # already on devices (e.g. restored by orbax): reshard
        return jax.device_put(x, sharding)
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(place, state, self.state_sharding)

  def abstract_state(self):
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        self.state_shapes(), self.state_sharding)

  def decoding_params(self, state):
    return state.params, self.mesh  # Replicated or fsdp-sharded: the decoder gathers them.

  def inference_params(self, state):
    if all(x.is_fully_addressable for x in jax.tree.leaves(state.params)):
      return state.params
    # Several hosts: each decodes its own sentences, and their decoding loops may run different
    # numbers of steps, so no collective between hosts may happen inside them. Every host gets
    # the whole parameters on its own devices.
    local = NamedSharding(Mesh(np.array(self.local_devices), ("local",)), P())
    return jax.device_put(jax.tree.map(devices_lib.to_host, state.params), local)


# --- 'pmap': replicated data parallelism. --------------------------------------------------------

class PmapStrategy(Strategy):
  """jax.pmap over this host's devices, state replicated, sums psum-med over all devices."""

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device] | None = None):
    super().__init__(config, devices)
    self._local_sharding = NamedSharding(Mesh(np.array(self.local_devices), (PMAP_AXIS,)),
                                         P(PMAP_AXIS))
    # Each device's position in the global device list: the last ingredient of its dropout key.
    self._device_index = jax.device_put(
        np.array([self.devices.index(d) for d in self.local_devices], np.int32),
        self._local_sharding)
    pmap = functools.partial(jax.pmap, axis_name=PMAP_AXIS,
                             devices=None if devices is None else self.devices)

    def train_step(state, batch, device_index):
      return step_lib.train_step(state, batch, model=self.model, optimizer=self.optimizer,
                                 config=self.config, axis_name=PMAP_AXIS,
                                 device_index=device_index)

    def eval_step(params, batch):
      return step_lib.eval_step(params, batch, model=self.model, config=self.config,
                                axis_name=PMAP_AXIS)

    self._train_step = pmap(train_step, donate_argnums=0)
    self._eval_step = pmap(eval_step)
    self._init = jax.jit(functools.partial(state_lib.init_state, self.config))

  def init_state(self, rng: jax.Array) -> TrainState:
    return self._replicate(self._init(rng))

  def _replicate(self, tree):
    """One copy of every array per local device, [n, ...], laid out as pmap lays out its
    outputs (so the second step does not compile again). Built from host numpy: replicating
    device arrays would compile a stack per array shape."""
    n = len(self.local_devices)
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (n,) + x.shape), self._local_sharding),
        jax.device_get(tree))

  def _split_over_devices(self, local: HostBatch, batch_axis: int) -> Batch:
    """[..., n * b, ...] -> [n, ..., b, ...] with one slice per local device, placed there."""
    n = len(self.local_devices)
    def split(x):
      shape = x.shape[:batch_axis] + (n, x.shape[batch_axis] // n) + x.shape[batch_axis + 1:]
      x = np.moveaxis(x.reshape(shape), batch_axis, 0)
      return jax.device_put(x, self._local_sharding)
    return {key: split(x) for key, x in local.items()}

  def shard_batch(self, host_batch: HostBatch) -> Batch:
    return self._split_over_devices(self._micro_batches(host_batch), 1)  # [n, A, b/n, L]

  def shard_eval_batch(self, host_batch: HostBatch) -> Batch:
    return self._split_over_devices(_pad_rows(host_batch, self.eval_host_batch_size), 0)

  def train_step(self, state, batch):
    state, metrics = self._train_step(state, batch, self._device_index)
    return state, flax.jax_utils.unreplicate(metrics)

  def eval_step(self, params, batch):
    return flax.jax_utils.unreplicate(self._eval_step(params, batch))

  def state_to_host(self, state):
    return jax.device_get(flax.jax_utils.unreplicate(state))

  def place_state(self, state):
    return self._replicate(jax.tree.map(np.asarray, state))

  def abstract_state(self):
    replicated = NamedSharding(Mesh(np.array(self.devices), (PMAP_AXIS,)), P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        self.state_shapes())

  def checkpoint_state(self, state):
    return self.state_to_host(state)

  def inference_params(self, state):
    return flax.jax_utils.unreplicate(state.params)

  def decoding_params(self, state):
    # pmap's replicas, one per device, become one global array replicated over a mesh.
    mesh = devices_lib.make_mesh(self.devices)
    params = jax.device_get(flax.jax_utils.unreplicate(state.params))
    return devices_lib.place(params, NamedSharding(mesh, P())), mesh


STRATEGIES = {"mesh": MeshStrategy, "pmap": PmapStrategy}


def make_strategy(config: ml_collections.ConfigDict,
                  devices: Sequence[jax.Device] | None = None) -> Strategy:
  """The strategy named by `parallel.strategy`, over `devices` (default: jax.devices()).

  Raises ConfigError (before any work) when the batch sizes or `parallel.fsdp` do not fit the
  devices. A subset of devices (e.g. `jax.devices()[:1]`) is for tests and benchmarks.
  """
  return STRATEGIES[config.parallel.strategy](config, devices)
