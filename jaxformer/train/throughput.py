"""How fast training runs: step time, tokens per second, data wait, and MFU.

MFU (model FLOPs utilisation) = the model FLOPs of a step / step time / the devices' peak FLOP/s.
The three pieces are here: `Throughput` times a window of steps, `PeakFlops` holds the peak of
a device (`train.peak_flops`, or a matmul that `measure_peak_flops` times at start, raised when
the devices prove faster, so that MFU never exceeds 1), and `train_step_flops` counts the model
FLOPs of a step.

The FLOP count is the usual "model FLOPs" (MaxText, PaLM appendix B): 2 FLOPs per multiply-add
of every matrix product in the forward pass, attention scores and their weighted sums included,
and a backward pass costing twice the forward (3x in all). Element-wise work (softmax, LayerNorm,
activations, dropout) is left out, and so is rematerialisation: MFU measures useful work.

For one sequence pair of S source and T target tokens (D = d_model, F = d_ff, V = vocab):
- encoder layer, per source token: Q, K, V and output projections 4 * 2*D*D; scores QK^T and
  the weighted sum of values 2 * 2*S*D; feed-forward 2 * 2*D*F.
- decoder layer, per target token: self-attention as the encoder's with T for S; cross-attention
  queries and output 2 * 2*D*D, scores and weighted sum 2 * 2*S*D; feed-forward 2 * 2*D*F;
  plus the cross-attention keys and values of each source token, 2 * 2*D*D per source token.
- the output projection, per target token: 2*D*V.
Attention over padding and the causal mask's unused half are counted as computed (they are).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import jax
import jax.numpy as jnp

TRAIN_FACTOR = 3  # forward + backward (gradients w.r.t. activations and weights).


def encoder_layer_flops(d_model: int, d_ff: int, src_len: int) -> int:
  """Forward FLOPs of one encoder layer over one source sequence of `src_len` tokens."""
  per_token = 4 * 2 * d_model * d_model + 2 * 2 * src_len * d_model + 2 * 2 * d_model * d_ff
  return src_len * per_token


def decoder_layer_flops(d_model: int, d_ff: int, src_len: int, tgt_len: int) -> int:
  """Forward FLOPs of one decoder layer over one target sequence, attending to one source."""
  self_attention = 4 * 2 * d_model * d_model + 2 * 2 * tgt_len * d_model
  cross_attention = 2 * 2 * d_model * d_model + 2 * 2 * src_len * d_model
  feed_forward = 2 * 2 * d_model * d_ff
  cross_keys_values = src_len * 2 * 2 * d_model * d_model
  return tgt_len * (self_attention + cross_attention + feed_forward) + cross_keys_values


def forward_flops(model_config, src_len: int, tgt_len: int) -> int:
  """Forward FLOPs of the whole Transformer for one (source, target) pair of rows."""
  m = model_config
  encoder = m.num_layers * encoder_layer_flops(m.d_model, m.d_ff, src_len)
  decoder = m.num_layers * decoder_layer_flops(m.d_model, m.d_ff, src_len, tgt_len)
  output = tgt_len * 2 * m.d_model * m.vocab_size
  return encoder + decoder + output


def train_step_flops(config, batch_size: int | None = None) -> int:
  """FLOPs of one training step on a global batch of rows of data.max_len tokens."""
  batch_size = config.train.batch_size if batch_size is None else batch_size
  length = config.data.max_len
  return TRAIN_FACTOR * batch_size * forward_flops(config.model, length, length)


# --- Timing. ---------------------------------------------------------------------------------

def measure_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large matmul on the first device: the denominator of MFU when not configured."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return repeats * 2 * size ** 3 / (time.perf_counter() - start)


class PeakFlops:
  """The denominator of MFU: the peak FLOP/s of one device, `train.peak_flops` or measured.

  A matmul timed at start-up on a loaded machine reads low, and MFU then comes out above 1 (2.6
  was seen). When it would, a measured peak is measured once more, and from then on the best
  peak seen is kept, the model FLOP/s a device achieved included (it did at least that much):
  MFU stays <= 1. A configured peak is not measured (the user chose not to); it is raised to the
  speed achieved the same way. `mfu` says so, once.
  """

  def __init__(self, configured: float, dtype: str,
               measure: Callable[[str], float] | None = None):
    self._dtype = dtype
    self._measure = measure or measure_peak_flops
    self.configured = bool(configured)
    self.value = configured or self._measure(dtype)
    self._raised = False

  def mfu(self, achieved: float) -> tuple[float, str | None]:
    """(MFU of a device that did `achieved` model FLOP/s, a message for the log or None). The
    message comes with the first raise of the peak only."""
    if achieved <= self.value:
      return achieved / self.value, None
    before, note = self.value, None
    if not self._raised:
      self._raised = True
      if self.configured:
        note = (f"jaxformer: MFU came out at {achieved / before:.3g} against train.peak_flops="
                f"{before:.4g}; the devices ran faster than that")
      else:
        again = self._measure(self._dtype)
        self.value = max(self.value, again)
        note = (f"jaxformer: MFU came out at {achieved / before:.3g} against the peak measured at "
                f"start ({before:.4g} FLOP/s per device; a busy machine reads low); measured "
                f"again: {again:.4g}")
      note += "; MFU is reported against the best peak seen from now on, so at most 1"
    self.value = max(self.value, achieved)
    return achieved / self.value, note


class Throughput:
  """Training speed over a window of steps: step time, tokens per second, data wait, and the
  packing efficiency of the batches (the share of their token slots that hold real tokens).

  Only training counts: `paused()` wraps work that is not training (evaluation), and
  `restart()` after the first step of a run drops its compilation from the window.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self.restart()

  def restart(self) -> None:
    """An empty window, starting now."""
    self._start = self._clock()
    self._paused = 0.0
    self.steps = 0
    self._tokens = 0
    self._data_wait = 0.0
    self._non_pad = 0
    self._slots = 0

  def add_step(self, tokens: int, data_wait: float, non_pad: int = 0, slots: int = 0) -> None:
    """One step of `tokens` real target tokens, which waited `data_wait` s for its batch, whose
    rows hold `non_pad` real tokens (source and target) in `slots` token slots."""
    self.steps += 1
    self._tokens += tokens
    self._data_wait += data_wait
    self._non_pad += non_pad
    self._slots += slots

  @contextlib.contextmanager
  def paused(self):
    """The time spent inside `with throughput.paused():` does not count."""
    start = self._clock()
    try:
      yield
    finally:
      self._paused += self._clock() - start

  def report(self, num_processes: int = 1) -> dict[str, float]:
    """step_time (s), tokens_per_second (all processes), data_wait_fraction and (when slots
    were counted) packing_efficiency of the window, then starts a new window. Call it after the
    devices finished the window's steps."""
    elapsed = max(self._clock() - self._start - self._paused, 1e-9)
    metrics = {"step_time": elapsed / max(self.steps, 1),
               "tokens_per_second": self._tokens * num_processes / elapsed,
               "data_wait_fraction": self._data_wait / elapsed}
    if self._slots:
      metrics["packing_efficiency"] = self._non_pad / self._slots
    self.restart()
    return metrics
