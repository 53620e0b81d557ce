"""The wall-time account of benchmarks/train_throughput.py --trace (benchmarks/trace_summary.py),
on made-up op timelines."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "trace_summary", os.path.join(REPO, "benchmarks", "trace_summary.py"))
trace_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_summary)

MS = 1_000_000  # ns


def test_concurrent_ops_share_the_wall_time_they_overlap():
  # Thread 1: a 0-10 ms; thread 2: b 4-8 ms, then c 12-14 ms (nothing runs 10-12 ms).
  events = [(0, 10 * MS, "a"), (4 * MS, 8 * MS, "b"), (12 * MS, 14 * MS, "c")]
  wall = trace_summary.wall_time_by_op(events, steps=1)
  assert wall == pytest.approx({"a": 8.0, "b": 2.0, "c": 2.0})
  # The ops' wall times add up to the time any op ran; busy time would say 16 ms.
  assert sum(wall.values()) == pytest.approx(12.0)


def test_wall_time_is_per_step():
  events = [(0, 6 * MS, "a"), (6 * MS, 9 * MS, "a")]
  assert trace_summary.wall_time_by_op(events, steps=3) == pytest.approx({"a": 3.0})
