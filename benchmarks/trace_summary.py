"""The top ops of a jax.profiler trace: benchmarks/train_throughput.py --trace.

`trace_steps` records a few calls of a step with jax.profiler; `summarize_trace` reads the
trace back and lists the ops by time per step, in two accounts (busy time summed over threads,
and wall time shared between the ops running at each instant: `wall_time_by_op`).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable

import jax
from jax.profiler import ProfileData

TRACE_STEPS = 3          # steps recorded by --trace.
TOP_OPS = 15             # ops listed from a trace.

# Events that contain other events (whole executions, waits) or mark points, not ops.
CONTAINER_EVENT = re.compile(r"ThunkExecutor|Await|PjitFunction|block_until_ready|Execute|"
                             r"^\$|XLA Ops|Steps|TraceContext|ThreadpoolListener|^end: |"
                             r"^Wait for")


def trace_steps(step: Callable[[], Any], log_dir: str) -> dict:
  """Records TRACE_STEPS steps with jax.profiler and summarises the time per op (per step)."""
  with jax.profiler.trace(log_dir):
    for _ in range(TRACE_STEPS):
      jax.block_until_ready(step())
  return summarize_trace(log_dir, TRACE_STEPS)


def summarize_trace(log_dir: str, steps: int) -> dict:
  """The ops of a jax.profiler trace by time per step, and by kind (name sans number).

  Device planes ('/device:...') when the trace has them (GPU, TPU); else the host's XLA
  compute threads (CPU). Two accounts of each op:
  - busy: its events' durations, summed over threads (what the op costs);
  - wall: each instant of the trace split evenly between the ops running at that instant, so
    the ops' wall times add up to the time the step spent running any op (what the step waits
    for; XLA:CPU runs independent ops concurrently, which the busy account counts twice).
  """
  path = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  data = ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:
    planes = [p for p in data.planes if p.name.startswith("/host:")]
  events = []  # (start ns, end ns, op name)
  for plane in planes:
    for line in plane.lines:
      if line.name == "python" or "PjRtCpuClient" in line.name:
        continue
      events += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                 if not CONTAINER_EVENT.search(e.name)]
  busy: dict[str, float] = {}
  for start, end, name in events:
    busy[name] = busy.get(name, 0.0) + (end - start) / 1e6 / steps
  wall = wall_time_by_op(events, steps)
  kind = lambda op: re.sub(r"\.\d+$", "", op)  # noqa: E731
  busy_by_kind: dict[str, float] = {}
  wall_by_kind: dict[str, float] = {}
  for op in busy:
    busy_by_kind[kind(op)] = busy_by_kind.get(kind(op), 0.0) + busy[op]
    wall_by_kind[kind(op)] = wall_by_kind.get(kind(op), 0.0) + wall.get(op, 0.0)
  busy_total, wall_total = sum(busy.values()), sum(wall.values())
  top_kinds = [dict(name=k, ms_per_step=v, share=v / busy_total,
                    wall_ms_per_step=wall_by_kind[k], wall_share=wall_by_kind[k] / wall_total)
               for k, v in sorted(busy_by_kind.items(), key=lambda kv: -kv[1])[:TOP_OPS]]
  top_ops = [dict(name=k, ms_per_step=v, share=v / busy_total, wall_ms_per_step=wall[k])
             for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:TOP_OPS]]
  return dict(path=path, busy_ms_per_step=busy_total, wall_ms_per_step=wall_total,
              top_ops=top_ops, top_kinds=top_kinds)


def wall_time_by_op(events: list[tuple[int, int, str]], steps: int) -> dict[str, float]:
  """Ms per step of wall time of each op: every instant shared evenly by the ops running then."""
  edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(events)]
                 + [(end, -1, i) for i, (_, end, _) in enumerate(events)])
  wall: dict[str, float] = {}
  running: set[int] = set()
  last = edges[0][0] if edges else 0
  for time_ns, change, i in edges:
    for j in running:
      name = events[j][2]
      wall[name] = wall.get(name, 0.0) + (time_ns - last) / len(running) / 1e6 / steps
    last = time_ns
    if change > 0:
      running.add(i)
    else:
      running.discard(i)
  return wall
