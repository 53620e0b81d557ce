"""Faster dropout masks on CPU: the threefry random-bit generator compiled unrolled.

Every dropout mask is drawn from JAX's threefry2x32 counter-based generator: 20 rounds of
add / rotate / xor over every element. On GPU and TPU, JAX lowers the rounds as straight-line
code, which XLA fuses into one pass over the elements. On CPU it lowers them as a loop of 5
iterations instead (to compile faster), and each iteration then reads and writes the whole
array; every key derivation (each dropout layer folds its name into the step's key) also
becomes a small loop. In the default experiment's train step that made random bits about 40%
of the CPU time (benchmarks/RESULTS.md).

`unroll_on_cpu()` registers the straight-line lowering for CPU too. It is the same function
of the same inputs, so every random bit is unchanged (tests/test_perf_numerics.py checks it);
a mask is drawn about 5 times faster and the step compiles no slower. It uses a private JAX
hook, so if a JAX version moves it, nothing changes but the speed.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

# Hashes of fewer elements than this (key derivations) keep the loop: unrolled, each adds about a
# hundred operations to compile (a tiny model's train step took 11.5 s of CPU to compile with
# all of them unrolled, 6.0 s with this threshold, 6.8 s with none), for little speed.
UNROLL_MIN_ELEMENTS = 1024

_done = False


def unroll_on_cpu() -> bool:
  """Makes CPU compilations use the unrolled threefry lowering; True if it is in effect."""
  global _done
  if _done:
    return True
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    unrolled = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    rolled = threefry2x32._threefry2x32_cpu_lowering_rule  # pylint: disable=protected-access

    def lowering(ctx, *args):
      big = math.prod(ctx.avals_out[0].shape) >= UNROLL_MIN_ELEMENTS
      return (unrolled if big else rolled)(ctx, *args)

    mlir.register_lowering(threefry2x32.threefry2x32_p, lowering, platform="cpu")
  except (ImportError, AttributeError) as e:  # A JAX version without these names.
    log.info("threefry: keeping JAX's rolled CPU lowering (%s)", e)
    return False
  _done = True
  return True
