"""Pieces of the training loop: the throughput window and the divergence check.

Whole runs of the loop (learning, metrics, resume, preemption, divergence) are tested through
the command line in tests/test_cli.py and tests/test_resume.py.
"""

import math

import jax.numpy as jnp
import pytest

from jaxformer.train import loop


class FakeClock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_throughput_counts_training_time_only():
  clock = FakeClock()
  meter = loop.Throughput(clock)
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
  meter = loop.Throughput(clock)
  assert "packing_efficiency" not in meter.report()  # Nothing counted: not reported.
  for non_pad, slots in ((30, 40), (10, 40)):
    clock.now += 1.0
    meter.add_step(5, 0.0, non_pad=non_pad, slots=slots)
  assert meter.report()["packing_efficiency"] == pytest.approx(40 / 80)


def test_restart_drops_what_came_before():
  clock = FakeClock()
  meter = loop.Throughput(clock)
  clock.now += 30.0  # The first step, compiling.
  meter.add_step(10, 0.0)
  meter.restart()
  clock.now += 1.0
  meter.add_step(10, 0.0)
  assert meter.report()["tokens_per_second"] == pytest.approx(10.0)


def metrics(loss, grad_norm=1.0):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm)}


def test_first_non_finite_names_the_first_diverged_step():
  assert loop._first_non_finite([(5, metrics(2.0)), (6, metrics(1.5))]) is None
  step, name, value = loop._first_non_finite(
      [(5, metrics(2.0)), (6, metrics(math.nan)), (7, metrics(math.inf))])
  assert (step, name) == (6, "loss") and math.isnan(value)
  assert loop._first_non_finite([(5, metrics(2.0, grad_norm=math.inf)),
                                 (6, metrics(math.nan))]) == (5, "gradient norm", math.inf)
