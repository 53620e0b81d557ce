"""`model.scan_layers` and `model.remat` change how the model runs, never what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.model.transformer import Transformer, stack_layers, unstack_layers
from model_testing import init_params, random_ids, tiny_config

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
  batch = (random_ids(rng, (3, 6), 40, lengths=[6, 4, 2]),
           random_ids(rng, (3, 5), 40, lengths=[5, 3, 4]))
  _, params = init_params(tiny_config(), *batch)
  return batch, params, train(tiny_config(), params, batch)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_loss_and_gradients(baseline, remat):
  batch, params, expected = baseline
  losses, grads, final = train(tiny_config(remat=remat), params, batch)
  np.testing.assert_allclose(losses, expected[0], rtol=1e-5)
  assert_trees_close(grads, expected[1])
  assert_trees_close(final, expected[2])


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scan_keeps_loss_and_gradients(baseline, remat):
  batch, params, expected = baseline
  layers = tiny_config().num_layers
  scanned = stack_layers(params, layers)
  leaf = scanned["encoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert leaf.shape == (layers,) + params["encoder"]["layers_0"]["self_attention"]["query"][
      "kernel"].shape
  config = tiny_config(scan_layers=True, remat=remat)
  # The scanned model initialises to the stacked layout itself.
  own = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), *batch)["params"]
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(scanned)
  losses, grads, final = train(config, scanned, batch)
  np.testing.assert_allclose(losses, expected[0], rtol=1e-5)
  assert_trees_close([unstack_layers(g, layers) for g in grads], expected[1])
  assert_trees_close(unstack_layers(final, layers), expected[2])
