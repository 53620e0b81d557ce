"""Pieces of the training loop: the divergence check, and what is due after each step.

Whole runs of the loop (learning, metrics, resume, preemption, divergence) are tested through
the command line in tests/test_cli.py and tests/test_resume.py.
"""

import math
import types

import jax.numpy as jnp
import ml_collections

from jaxformer.train import loop


def metrics(loss, grad_norm=1.0):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm)}


def test_first_non_finite_names_the_first_diverged_step():
  assert loop._first_non_finite([(5, metrics(2.0)), (6, metrics(1.5))]) is None
  step, name, value = loop._first_non_finite(
      [(5, metrics(2.0)), (6, metrics(math.nan)), (7, metrics(math.inf))])
  assert (step, name) == (6, "loss") and math.isnan(value)
  assert loop._first_non_finite([(5, metrics(2.0, grad_norm=math.inf)),
                                 (6, metrics(math.nan))]) == (5, "gradient norm", math.inf)


class Calls:
  """should_stop / should_save of a guard or a checkpointer: records each step asked about."""

  def __init__(self, steps):
    self.steps, self.asked = set(steps), []

  def should_stop(self, step):
    self.asked.append(step)
    return step in self.steps

  should_save = should_stop


def fake_run(checkpointer):
  config = ml_collections.ConfigDict(
      {"train": {"steps": 10, "log_every_steps": 4, "eval_every_steps": 5}})
  return types.SimpleNamespace(config=config, checkpointer=checkpointer)


def test_due_saves_logs_evaluates_and_checks_on_their_steps_and_asks_every_step():
  checkpointer, guard = Calls([3, 6, 9]), Calls([])
  run = fake_run(checkpointer)
  due = {step: loop._due(run, guard, step, unchecked=1) for step in range(1, 11)}
  assert [s for s, d in due.items() if d.save] == [3, 6, 9, 10]  # and the last step
  assert [s for s, d in due.items() if d.log] == [4, 8, 10]
  assert [s for s, d in due.items() if d.evaluate] == [5, 10]
  assert [s for s, d in due.items() if d.check] == [3, 4, 6, 8, 9, 10]
  assert not any(d.preempted for d in due.values())
  # Every process asks both at every step: that is how the hosts agree on a preemption.
  assert guard.asked == checkpointer.asked == list(range(1, 11))


def test_due_after_a_preemption_saves_without_evaluating():
  due = loop._due(fake_run(Calls([])), Calls([5]), 5, unchecked=1)
  assert due.preempted and due.save and due.check and not due.evaluate


def test_due_checks_for_nan_once_enough_steps_are_unchecked():
  run, guard = fake_run(Calls([])), Calls([])
  assert not loop._due(run, guard, 1, unchecked=loop.MAX_UNCHECKED_STEPS - 1).check
  assert loop._due(run, guard, 1, unchecked=loop.MAX_UNCHECKED_STEPS).check
