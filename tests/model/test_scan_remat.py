"""`model.scan_layers` and `model.remat` change how the model runs, never what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model.transformer import Transformer

from tests.model.model_testing import (SOURCE_SHAPE, TARGET_SHAPE, init_params, random_ids,
                                       stack_layers, tiny_config, unstack_layers)

STEPS = 2
LEARNING_RATE = 0.5


def cross_entropy(logits, targets):
  """Mean negative log-likelihood of the real (non-pad) target tokens."""
  log_probs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = (targets != 0).astype(jnp.float32)
  return (nll * weights).sum() / weights.sum()


def train(config, params, batch):
  """STEPS of plain gradient descent; returns the losses, the gradients and the final params.

  Dropout is off: nn.scan draws each layer's dropout mask from a split key, not from the
  layer's own name, so the masks (not the computation) differ between the two layouts.
  """
  model = Transformer(config)

  def loss_fn(p):
    return cross_entropy(model.apply({"params": p}, *batch), batch[1])

  step = jax.jit(jax.value_and_grad(loss_fn))
  losses, grads = [], []
  for _ in range(STEPS):
    loss, grad = step(params)
    losses.append(loss)
    grads.append(grad)
    params = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grad)
  return losses, grads, params


def assert_trees_close(got, expected):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def baseline():
  """A batch, initial parameters, and STEPS of training with neither scan nor remat."""
  rng = np.random.RandomState(0)
  batch = (random_ids(rng, SOURCE_SHAPE, 40, lengths=[6, 3]),
           random_ids(rng, TARGET_SHAPE, 40, lengths=[3, 5]))
  _, params = init_params(tiny_config())
  return batch, params, train(tiny_config(), params, batch)


@pytest.mark.parametrize("scan_layers,remat", [(False, "full"), (True, "dots")])
def test_same_losses_gradients_and_parameters(baseline, scan_layers, remat):
  batch, params, expected = baseline
  config = tiny_config(scan_layers=scan_layers, remat=remat)
  layers = config.num_layers
  if scan_layers:
    # The scanned model's own layout: one 'layers' module, weights stacked on a leading axis.
    own = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), *batch)["params"]
    params = stack_layers(params, layers)
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(params)
    assert own["encoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (
        layers, config.d_model, config.num_heads, config.d_model // config.num_heads)
  losses, grads, final = train(config, params, batch)
  if scan_layers:
    grads = [unstack_layers(g, layers) for g in grads]
    final = unstack_layers(final, layers)
  np.testing.assert_allclose(losses, expected[0], rtol=1e-5)
  assert_trees_close(grads, expected[1])
  assert_trees_close(final, expected[2])
