"""The GPU and TPU programs, built on this CPU machine: `jax.export` lowers the bfloat16 train
step (8 devices, with the mesh strategy's shardings) and the beam search for 'cuda' and 'tpu',
so a change that breaks either program fails here, without an accelerator. Lowering only:
nothing is compiled or run, so each export takes about a second.

Why some of these take a detour:
- The attention kernel is chosen while tracing, from `jax.default_backend()` (model/attention.py
  `use_fused_kernel`): 'auto' runs cuDNN's fused kernel on a GPU only, so an export traced here
  with 'auto' holds the einsums. The tests of the GPU path ask for the kernel by name,
  `model.attention_kernel='cudnn'`, which is what 'auto' picks on a GPU for these shapes
  (bfloat16, head size 8).
- jax checks while tracing that cuDNN is installed (its CUDA plugin reports the version); this
  machine has none, so those tests pretend it has (the `cudnn_installed` fixture).
- cuDNN's custom calls carry no compatibility guarantee, so jax.export refuses them unless told
  to expect them (`DisabledSafetyCheck.custom_call`).
- Under jit over several devices, jax wraps cuDNN attention in `custom_partitioning`, whose
  partitioner is a Python callback that XLA calls while compiling; jax.export cannot serialise
  it ("serialization of host_callbacks is not yet implemented"). The cuDNN train step is
  therefore exported on 1 device and only lowered on 8. Inside `shard_map` every mesh axis is
  manual and jax emits the cuDNN call itself, so the beam search exports on 8 devices.
"""

import collections
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer import decode
from jaxformer import devices as devices_lib
from jaxformer.config import get_default_config
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID
from jaxformer.train import jax_internals, parallel

from tests.train.train_testing import LENGTH, tiny_config

ACCELERATORS = ("cuda", "tpu")
# Per layer: encoder self-attention, decoder self-attention, cross-attention.
ATTENTIONS = 3
# jax's cuDNN calls for attention with a bias (our boolean masks become one), no dropout.
CUDNN_FORWARD = "__cudnn$fmhaScaleBiasSoftmax"
CUDNN_BACKWARD = "__cudnn$fmhaScaleBiasSoftmaxBackward"
EXPECT_CUDNN = [jax.export.DisabledSafetyCheck.custom_call(name)
                for name in (CUDNN_FORWARD, CUDNN_BACKWARD)]
# Any cuDNN 9 that jax accepts: the version feeds trace-time checks only, never the lowering.
PRETEND_CUDNN_VERSION = 91000
BEAM, EXTRA, ROWS, WIDTH = 4, 3, 16, 7


@pytest.fixture
def cudnn_installed():
  """jax's cuDNN attention traces here as on a GPU machine (see the module docstring)."""
  with jax_internals.cudnn_version_assumed(PRETEND_CUDNN_VERSION):
    yield


def custom_calls(module: str) -> collections.Counter:
  """How often each custom call target occurs in a StableHLO module's text."""
  return collections.Counter(re.findall(r"stablehlo\.custom_call @([^(]+)\(", module))


def function_bodies(module: str) -> dict[str, str]:
  """Each function of a StableHLO module's text, by name: {name: its text}."""
  pieces = re.split(r"^\s*func\.func (?:public |private )?@([^(]+)\(", module, flags=re.M)
  return dict(zip(pieces[1::2], pieces[2::2]))


def same_shardings(got, expected, avals) -> bool:
  """Whether an export's shardings (None: unspecified) lay out each array as `expected` does."""
  return all(g is not None and g.is_equivalent_to(e, aval.ndim)
             for g, e, aval in zip(got, expected, avals, strict=True))


# --- The train step. ---------------------------------------------------------------------------

def bf16_strategy(devices=None, **overrides) -> parallel.MeshStrategy:
  """The mesh strategy of a tiny bfloat16 model with dropout (so the step draws random bits)."""
  config = tiny_config(**{"model.dtype": "bfloat16", "model.dropout_rate": 0.1, **overrides})
  return parallel.make_strategy(config, devices)


@pytest.fixture(scope="module", params=[1, 2], ids=["fsdp1", "fsdp2"])
def strategy(request):
  return bf16_strategy(**{"parallel.fsdp": request.param})


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_the_bf16_train_step_exports_with_its_shardings(strategy, platform):
  step, state, batch = strategy.lowerable_train_step(LENGTH)
  exported = jax.export.export(step, platforms=[platform])(state, batch)

  assert exported.platforms == (platform,)
  assert exported.nr_devices == 8
  state_shardings = jax.tree.leaves(strategy.state_sharding)
  expected_in = state_shardings + [strategy.train_batch_sharding] * len(batch)
  assert same_shardings(exported.in_shardings_jax(strategy.mesh), expected_in,
                        exported.in_avals)
  metrics = len(exported.out_avals) - len(jax.tree.leaves(state))
  expected_out = state_shardings + [strategy.replicated] * metrics
  assert same_shardings(exported.out_shardings_jax(strategy.mesh), expected_out,
                        exported.out_avals)
  if strategy.config.parallel.fsdp > 1:  # Else every parameter is replicated.
    assert any("fsdp" in str(s.spec) for s in exported.in_shardings_jax(strategy.mesh))
  module = exported.mlir_module()
  assert "xbf16>" in module  # The compute dtype (the parameters are float32).
  # jax_internals swaps in its own threefry lowering for CPU only: on an accelerator JAX's
  # straight-line rounds stay, and no threefry function of the step has a loop.
  threefry = [body for name, body in function_bodies(module).items()
              if name.startswith("threefry2x32")]
  assert threefry, "no threefry2x32 function: no dropout, or JAX names it otherwise"
  assert not any("stablehlo.while" in body for body in threefry)


def test_the_cuda_train_step_runs_cudnn_attention(cudnn_installed):
  """On 1 device: exported, every attention's forward and backward are cuDNN calls."""
  strategy = bf16_strategy(jax.devices()[:1], **{"model.attention_kernel": "cudnn"})
  step, state, batch = strategy.lowerable_train_step(LENGTH)
  export = jax.export.export(step, platforms=["cuda"], disabled_checks=EXPECT_CUDNN)
  exported = export(state, batch)
  attentions = ATTENTIONS * strategy.config.model.num_layers
  assert custom_calls(exported.mlir_module()) == {CUDNN_FORWARD: attentions,
                                                  CUDNN_BACKWARD: attentions}


def test_the_8_device_cuda_train_step_lowers_with_cudnn_attention(cudnn_installed):
  """On 8 devices: lowered, not exported (see the module docstring). Each attention's forward
  and backward are jax's custom_partitioning calls, which become cuDNN calls when XLA
  partitions the program for the GPUs."""
  strategy = bf16_strategy(**{"model.attention_kernel": "cudnn"})
  step, state, batch = strategy.lowerable_train_step(LENGTH)
  lowered = step.trace(state, batch).lower(lowering_platforms=("cuda",))
  attentions = ATTENTIONS * strategy.config.model.num_layers
  assert custom_calls(lowered.as_text()) == {"CustomSPMDPartitioning": 2 * attentions}


# --- The beam search. --------------------------------------------------------------------------

def bf16_model(**overrides) -> tuple[Transformer, dict]:
  """A tiny bfloat16 Transformer and its parameters' shapes (24-token vocabulary)."""
  config = get_default_config().model
  config.update(vocab_size=24, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=16,
                dropout_rate=0.0, dtype="bfloat16", **overrides)
  model = Transformer(ml_collections.FrozenConfigDict(config))
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  return model, jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]


def export_parallel_search(model, shapes, mesh, platform, disabled_checks=()):
  """ParallelDecoder's compiled search over `mesh`, exported for `platform`, with the
  parameters placed as in training and ROWS source rows of WIDTH tokens split over the mesh."""
  search = decode._parallel_search(model, mesh, BEAM, EXTRA, model.config.max_len, EOS_ID)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, devices_lib.param_shardings(mesh, shapes))
  rows = NamedSharding(mesh, P(mesh.axis_names))
  inputs = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.int32, sharding=rows)
  alpha = jax.ShapeDtypeStruct((), jnp.float32)
  exported = jax.export.export(search, platforms=[platform], disabled_checks=disabled_checks)(
      params, inputs, alpha)
  return exported, params, rows


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("devices,fsdp", [(8, 1), (8, 2), (1, 1)])
def test_the_beam_search_exports(platform, devices, fsdp):
  model, shapes = bf16_model()
  mesh = devices_lib.make_mesh(jax.devices()[:devices], fsdp)
  exported, params, rows = export_parallel_search(model, shapes, mesh, platform)

  assert exported.platforms == (platform,)
  assert exported.nr_devices == devices
  expected_in = [x.sharding for x in jax.tree.leaves(params)] + [rows]  # alpha: unplaced.
  assert same_shardings(exported.in_shardings_jax(mesh)[:-1], expected_in,
                        exported.in_avals[:-1])
  length = WIDTH + EXTRA
  assert [a.shape for a in exported.out_avals] == [(ROWS, BEAM, length), (ROWS, BEAM),
                                                   (ROWS, BEAM)]
  module = exported.mlir_module()
  if devices > 1:  # Each device searches its own rows in its own loop (shard_map), alone.
    assert "sdy.manual_computation" in module
  assert "stablehlo.while" in module and "xbf16>" in module


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_the_single_device_decode_exports(platform):
  model, shapes = bf16_model()
  inputs = jax.ShapeDtypeStruct((2, WIDTH), jnp.int32)
  exported = jax.export.export(decode._decode, platforms=[platform])(
      model, shapes, inputs, jax.ShapeDtypeStruct((), jnp.float32), cached=True,
      beam_size=BEAM, max_extra_len=EXTRA, max_len=model.config.max_len, eos_id=EOS_ID)
  assert exported.platforms == (platform,)
  assert exported.nr_devices == 1
  assert exported.out_avals[0].shape == (2, BEAM, WIDTH + EXTRA)
  assert "stablehlo.while" in exported.mlir_module()


def test_the_cuda_beam_search_runs_cudnn_attention_in_the_encoder(cudnn_installed):
  """On 8 devices: the encoder's self-attention is a cuDNN call; decoding steps attend over
  the cache with the einsums (one query each, nothing for a fused kernel to gain)."""
  model, shapes = bf16_model(attention_kernel="cudnn")
  mesh = devices_lib.make_mesh(jax.devices())
  exported, _, _ = export_parallel_search(model, shapes, mesh, "cuda", EXPECT_CUDNN)
  assert exported.nr_devices == 8
  assert custom_calls(exported.mlir_module()) == {CUDNN_FORWARD: model.config.num_layers}
