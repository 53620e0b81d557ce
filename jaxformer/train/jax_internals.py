"""Every use of a private JAX API, and every process-wide hook jaxformer installs, in one place.

Written against jax 0.10.2. Nothing here runs at import: the entry points (`jaxformer` commands,
the benchmarks, the test suite's conftest) call `install()` once, before their first
compilation. If a JAX version moves a private name, each piece falls back to JAX's own behaviour
and says so through the common logger; only speed or noise changes, never a result.

- `use_unrolled_threefry_on_cpu`: faster dropout masks on CPU. Every dropout mask is drawn from
  JAX's threefry2x32 counter-based generator: 20 rounds of add / rotate / xor over every
  element. On GPU and TPU, JAX lowers the rounds as straight-line code, which XLA fuses into one
  pass over the elements. On CPU it lowers them as a loop of 5 iterations instead (to compile
  faster), and each iteration then reads and writes the whole array. This registers the
  straight-line lowering for CPU too, for arrays of at least UNROLL_MIN_ELEMENTS (smaller
  hashes, the key derivations, keep the loop: unrolled, each adds about a hundred operations to
  compile for little speed). It is the same function of the same inputs, so every random bit
  is unchanged (tests/test_perf_numerics.py checks it). benchmarks/RESULTS.md has the figures.
- `hide_closed_event_loop_noise`: when orbax fails to read a damaged checkpoint it closes its
  event loop while other reads are still finishing; their completion callbacks then raise
  `RuntimeError('Event loop is closed')`, which Python prints as unraisable exceptions: a
  screenful of noise around the one clear message. A filter on `sys.unraisablehook` drops
  exactly those and passes every other unraisable exception on to the previous hook.
- `preemption_service_running`: whether jax.distributed runs its preemption sync service (the
  manager is not exposed publicly in jax 0.10).
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator

import jax

from jaxformer.log import log

# Hashes of fewer elements than this keep JAX's rolled loop (see the module docstring).
UNROLL_MIN_ELEMENTS = 1024

_threefry_unrolled = False


def install() -> None:
  """Installs every hook below (once per process). Called by entry points, never at import."""
  use_unrolled_threefry_on_cpu()
  hide_closed_event_loop_noise()


def use_unrolled_threefry_on_cpu() -> bool:
  """Makes CPU compilations use the unrolled threefry lowering; True if it is in effect."""
  global _threefry_unrolled
  if _threefry_unrolled:
    return True
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    unrolled = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    rolled = threefry2x32._threefry2x32_cpu_lowering_rule  # pylint: disable=protected-access
  except (ImportError, AttributeError) as e:  # A JAX version without these names.
    log(f"jax_internals: keeping JAX's rolled threefry lowering on CPU ({e})")
    return False

  def lowering(ctx, *args):
    big = math.prod(ctx.avals_out[0].shape) >= UNROLL_MIN_ELEMENTS
    return (unrolled if big else rolled)(ctx, *args)

  mlir.register_lowering(threefry2x32.threefry2x32_p, lowering, platform="cpu")
  _threefry_unrolled = True
  return True


def hide_closed_event_loop_noise() -> None:
  """Drops the 'Event loop is closed' unraisable exceptions of a failed orbax read.

  Installs the filter in front of the current `sys.unraisablehook`, unless it is already there
  (a test runner may have replaced the hook since an earlier call).
  """
  previous_hook = sys.unraisablehook
  if getattr(previous_hook, "hides_closed_event_loop_noise", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous_hook(unraisable)

  hook.hides_closed_event_loop_noise = True
  sys.unraisablehook = hook


def preemption_service_running() -> bool:
  """Whether jax.distributed runs the preemption sync service (multi-host agreement).

  jax.distributed.initialize() starts it by default (config jax_enable_preemption_service);
  its notifier then catches SIGTERM itself, and every host learns of it.
  """
  if not jax.distributed.is_initialized():
    return False
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    log(f"jax_internals: cannot see jax's preemption service ({e}); stopping on local "
        "signals only")
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


@contextlib.contextmanager
def cudnn_version_assumed(version: int) -> Iterator[None]:
  """jax's cuDNN attention traces as on a GPU machine with cuDNN `version`, on a machine
  without the CUDA plugin: for exporting the GPU program from a CPU
  (tests/test_accelerator_export.py). jax asks the plugin for the version while tracing; the
  lowered program does not depend on it."""
  from jax._src.cudnn import fused_attention_stablehlo
  saved = fused_attention_stablehlo.check_cudnn_version
  fused_attention_stablehlo.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    fused_attention_stablehlo.check_cudnn_version = saved
