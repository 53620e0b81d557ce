"""Throughput: the training-time window, and the model FLOP count behind MFU.

The FLOP count (jaxformer/train/throughput.py) is checked three independent ways:

1. A hand count from the layer's own parameters: every kernel of a Dense layer costs
   2 x tokens x kernel size FLOPs, where the tokens are those the layer is applied to, and
   attention adds its two [L, L'] products per head.
2. The matrix products JAX actually traces: every `dot_general` of the program's jaxpr (into
   nested jaxprs, scan bodies times their length), 2 x batch x M x N x K each.
3. XLA's own count of the compiled layer (`cost_analysis()['flops']`), which also counts the
   element-wise work that model FLOPs leave out, bounded below.
"""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxformer.config import get_default_config
from jaxformer.model import attention
from jaxformer.model.transformer import DecoderLayer, EncoderLayer, Transformer
from jaxformer.train import throughput

D, H, F, V = 64, 4, 128, 40
S, T, B = 24, 16, 2   # source and target lengths differ, so swapping them cannot pass.


def model_config(**overrides) -> ml_collections.FrozenConfigDict:
  config = get_default_config().model
  config.update(vocab_size=V, num_layers=2, d_model=D, num_heads=H, d_ff=F, max_len=64,
                dropout_rate=0.0)
  config.update(overrides)
  return ml_collections.FrozenConfigDict(config)


def kernel_sizes(params) -> dict[str, int]:
  """{'module/path': kernel size} of every Dense kernel in a layer's parameters."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path[:-1]): int(np.prod(leaf.shape))
          for path, leaf in flat if path[-1].key == "kernel"}


def ids(length: int) -> jnp.ndarray:
  return jnp.full((B, length), 5, jnp.int32)


def encoder_layer(config):
  """(layer, parameter shapes, call arguments) of one encoder layer on B sources of S tokens."""
  x, mask = jnp.ones((B, S, D)), attention.encoder_self_mask(ids(S))
  layer = EncoderLayer(config)
  return layer, jax.eval_shape(layer.init, jax.random.key(0), x, mask)["params"], (x, mask)


def decoder_layer(config):
  """(layer, parameter shapes, call arguments) of one decoder layer: B targets of T tokens
  over B sources of S tokens."""
  x, encoded = jnp.ones((B, T, D)), jnp.ones((B, S, D))
  self_mask = attention.decoder_self_mask(ids(T))
  cross_mask = attention.cross_mask(ids(T), ids(S))
  layer = DecoderLayer(config)
  args = (x, encoded, self_mask, cross_mask)
  return layer, jax.eval_shape(layer.init, jax.random.key(0), *args)["params"], args


# --- 1. Hand counts. ------------------------------------------------------------------------

def test_encoder_layer_matches_a_hand_count():
  _, params, _ = encoder_layer(model_config())
  kernels = kernel_sizes(params)
  assert len(kernels) == 6  # query, key, value, out; feed-forward inner and outer.
  dense = sum(2 * S * size for size in kernels.values())   # every kernel sees the S tokens.
  scores_and_sum = 2 * (2 * S * S * D)                     # Q K^T and weights x V, all heads.
  assert throughput.encoder_layer_flops(D, F, S) == dense + scores_and_sum


def test_decoder_layer_matches_a_hand_count():
  _, params, _ = decoder_layer(model_config())
  kernels = kernel_sizes(params)
  assert len(kernels) == 10
  # The cross-attention keys and values project the S encoder outputs; the rest the T targets.
  on_source = {name for name in kernels if name in ("cross_attention/key", "cross_attention/value")}
  assert len(on_source) == 2
  dense = sum(2 * (S if name in on_source else T) * size for name, size in kernels.items())
  self_attention = 2 * (2 * T * T * D)
  cross_attention = 2 * (2 * T * S * D)
  assert throughput.decoder_layer_flops(D, F, S, T) == dense + self_attention + cross_attention


# --- 2. The matrix products of the traced program. ------------------------------------------

def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def dot_flops(jaxpr) -> int:
  """2 x batch x M x N x K summed over every dot_general of `jaxpr` and the jaxprs inside it."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape  # out: batch x M x N.
      total += 2 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    total += times * sum(dot_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def traced_dot_flops(fn, *args) -> int:
  return dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_layer_counts_equal_the_traced_matrix_products():
  layer, params, args = encoder_layer(model_config())
  traced = traced_dot_flops(lambda p: layer.apply({"params": p}, *args), params)
  assert traced == B * throughput.encoder_layer_flops(D, F, S)
  layer, params, args = decoder_layer(model_config())
  traced = traced_dot_flops(lambda p: layer.apply({"params": p}, *args), params)
  assert traced == B * throughput.decoder_layer_flops(D, F, S, T)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_whole_model_forward_and_train_step_equal_the_traced_matrix_products(scan_layers):
  config = model_config(scan_layers=scan_layers)
  model = Transformer(config)
  inputs, targets = ids(S), ids(T)
  params = jax.eval_shape(model.init, jax.random.key(0), inputs, targets)["params"]

  def loss(p):
    return model.apply({"params": p}, inputs, targets).sum()

  forward = traced_dot_flops(loss, params)
  assert forward == B * throughput.forward_flops(config, S, T)
  # Backward: the gradient of every product with respect to both of its operands, 2x forward.
  assert traced_dot_flops(jax.grad(loss), params) == throughput.TRAIN_FACTOR * forward


def test_train_step_flops_scale_with_the_batch_and_rows():
  config = get_default_config()
  config.model.update(model_config().to_dict())
  config.data.max_len = S
  config.train.batch_size = 8
  expected = throughput.TRAIN_FACTOR * 8 * throughput.forward_flops(config.model, S, S)
  assert throughput.train_step_flops(config) == expected
  assert throughput.train_step_flops(config, batch_size=16) == 2 * expected


# --- 3. XLA's count. --------------------------------------------------------------------------

# Element-wise FLOPs per token per layer, generous upper bounds on what XLA counts beyond the
# matrix products: per attention score (scale, mask select, max, subtract, exp, sum, divide)
# at most ELEMENTWISE_PER_SCORE; per model dimension (biases, two or three LayerNorms, residual
# adds, dropout-free activations) ELEMENTWISE_PER_D; per feed-forward unit (bias, ReLU)
# ELEMENTWISE_PER_F. With these sizes the bound is about 8% of the layer's model FLOPs, while
# leaving out attention (about 25%) or the feed-forward network (over 30%) would exceed it.
ELEMENTWISE_PER_SCORE = 10
ELEMENTWISE_PER_D = 40
ELEMENTWISE_PER_F = 4


def xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):  # Older jax returned one dict per device program.
    analysis = analysis[0]
  return analysis["flops"]


def elementwise_bound(tokens: int, scores_per_token: int) -> int:
  return tokens * (ELEMENTWISE_PER_SCORE * scores_per_token + ELEMENTWISE_PER_D * D
                   + ELEMENTWISE_PER_F * F)


def test_layer_counts_agree_with_xla_cost_analysis():
  layer, params, args = encoder_layer(model_config())
  counted = B * throughput.encoder_layer_flops(D, F, S)
  xla = xla_flops(lambda p: layer.apply({"params": p}, *args), params)
  assert counted <= xla <= counted + elementwise_bound(B * S, H * S)

  layer, params, args = decoder_layer(model_config())
  counted = B * throughput.decoder_layer_flops(D, F, S, T)
  xla = xla_flops(lambda p: layer.apply({"params": p}, *args), params)
  assert counted <= xla <= counted + elementwise_bound(B * T, H * (T + S))


# --- The throughput window. ---------------------------------------------------------------

class FakeClock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_throughput_counts_training_time_only():
  clock = FakeClock()
  meter = throughput.Throughput(clock)
  for tokens, data_wait in ((10, 0.5), (20, 0.0), (30, 0.25)):
    clock.now += 1.0
    meter.add_step(tokens, data_wait)
  with meter.paused():  # e.g. an evaluation: 5 s that are not training.
    clock.now += 5.0
  clock.now += 1.0
  meter.add_step(40, 0.25)

  report = meter.report(num_processes=2)
  assert report["step_time"] == pytest.approx(4.0 / 4)
  assert report["tokens_per_second"] == pytest.approx(2 * 100 / 4.0)
  assert report["data_wait_fraction"] == pytest.approx(1.0 / 4.0)

  # The next window starts empty, at the report.
  clock.now += 2.0
  meter.add_step(8, 0.0)
  report = meter.report()
  assert report["step_time"] == pytest.approx(2.0)
  assert report["tokens_per_second"] == pytest.approx(4.0)


def test_packing_efficiency_is_the_real_share_of_the_window_s_token_slots():
  clock = FakeClock()
  meter = throughput.Throughput(clock)
  assert "packing_efficiency" not in meter.report()  # Nothing counted: not reported.
  for non_pad, slots in ((30, 40), (10, 40)):
    clock.now += 1.0
    meter.add_step(5, 0.0, non_pad=non_pad, slots=slots)
  assert meter.report()["packing_efficiency"] == pytest.approx(40 / 80)


def test_restart_drops_what_came_before():
  clock = FakeClock()
  meter = throughput.Throughput(clock)
  clock.now += 30.0  # The first step, compiling.
  meter.add_step(10, 0.0)
  meter.restart()
  clock.now += 1.0
  meter.add_step(10, 0.0)
  assert meter.report()["tokens_per_second"] == pytest.approx(10.0)


# --- MFU never above 1. ------------------------------------------------------------------------

class LoadedThenIdle:
  """A peak measurement that reads low the first time (a busy machine), then `later`."""

  def __init__(self, first: float, later: float):
    self.readings, self.calls = [first, later], 0

  def __call__(self, dtype: str) -> float:
    self.calls += 1
    return self.readings[min(self.calls, 2) - 1]


def test_mfu_stays_at_most_1_when_the_peak_was_measured_on_a_loaded_machine():
  measure = LoadedThenIdle(first=1e9, later=5e9)
  peak = throughput.PeakFlops(0.0, "float32", measure=measure)
  assert measure.calls == 1 and peak.value == 1e9
  assert peak.mfu(5e8) == (0.5, None)  # Below the peak: nothing happens.
  mfu, note = peak.mfu(2.6e9)  # Would be 2.6: measured again, and 5e9 holds.
  assert mfu == pytest.approx(2.6e9 / 5e9) and measure.calls == 2
  assert "2.6" in note and "measured again: 5e+09" in note and "at most 1" in note
  # Faster than both measurements: the speed seen is the peak from now on; said once only.
  assert peak.mfu(6e9) == (1.0, None)
  assert peak.mfu(3e9) == (0.5, None) and measure.calls == 2


def test_a_configured_peak_is_raised_to_the_speed_seen_without_measuring():
  def measure(dtype):
    raise AssertionError("train.peak_flops was given: nothing to measure")
  peak = throughput.PeakFlops(1e9, "bfloat16", measure=measure)
  mfu, note = peak.mfu(2e9)
  assert mfu == 1.0 and "train.peak_flops=1e+09" in note
  assert peak.mfu(4e9) == (1.0, None) and peak.mfu(1e9) == (0.25, None)


def test_the_loop_logs_an_mfu_of_at_most_1_and_says_why_once(monkeypatch, capsys):
  """loop._log_train over a peak measured low at start (throughput.measure_peak_flops
  patched), with a step that would give MFU 2.6."""
  from jaxformer.train import loop
  measure = LoadedThenIdle(first=1.0, later=2.0)
  monkeypatch.setattr(throughput, "measure_peak_flops", measure)
  config = ml_collections.ConfigDict(get_default_config())
  step_flops = throughput.train_step_flops(config) / jax.device_count()  # per device
  peak = throughput.PeakFlops(config.train.peak_flops, config.model.dtype)
  written = []
  run = types.SimpleNamespace(config=config, writer=types.SimpleNamespace(
      write=lambda step, split, metrics: written.append(metrics)))
  for step_time in (1 / 2.6, 1 / 2.6, 1.0):
    meter = types.SimpleNamespace(report=lambda n, t=step_time: {"step_time": t * step_flops})
    loop._log_train(run, 1, {"loss": jnp.float32(1.0)}, meter, peak, bar=None)
  assert [m["mfu"] for m in written] == pytest.approx([1.0, 1.0, 1 / 2.6])
  notes = [line for line in capsys.readouterr().err.splitlines() if "MFU came out at" in line]
  assert len(notes) == 1 and "measured again: 2" in notes[0]
