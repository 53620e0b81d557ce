"""Pieces of the training loop: the divergence check.

Whole runs of the loop (learning, metrics, resume, preemption, divergence) are tested through
the command line in tests/test_cli.py and tests/test_resume.py.
"""

import math

import jax.numpy as jnp

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
