"""Tiny model configs, batches and parameters shared by the model tests, and the conversion of
parameters between unrolled and scanned layer stacks (`stack_layers`, `unstack_layers`).

Speed matters here (two shared CPU cores): parameters are drawn with NumPy into the shapes that
`jax.eval_shape(model.init)` reports, which compiles nothing, and tests use the same few batch
shapes so that JAX's per-operation compilations are reused from test to test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer.config import get_default_config
from jaxformer.model.transformer import LAYERS, Transformer

TINY = dict(vocab_size=40, num_layers=2, d_model=32, num_heads=4, d_ff=48, max_len=16,
            dropout_rate=0.0)
SOURCE_SHAPE = (2, 6)   # [B, S] of most test batches
TARGET_SHAPE = (2, 5)   # [B, T]


def tiny_config(**overrides) -> ml_collections.FrozenConfigDict:
  """The model section of the default config, shrunk to a test size, with `overrides`."""
  config = get_default_config().model
  config.update({**TINY, **overrides})
  return ml_collections.FrozenConfigDict(config)


def random_ids(rng: np.random.RandomState, shape, vocab_size: int, lengths=None) -> jnp.ndarray:
  """Random real token ids (>= 4, never a special id), padded with 0 after `lengths[b]`."""
  ids = rng.randint(4, vocab_size, size=shape)
  if lengths is not None:
    for b, length in enumerate(lengths):
      ids[b, length:] = 0
  return jnp.asarray(ids, jnp.int32)


def random_params(config, seed: int = 0) -> dict:
  """Random float32 parameters of the right tree and shapes, drawn with NumPy.

  Kernels ~ N(0, 1/fan_in); embeddings ~ N(0, 1/D); LayerNorm gains 1 + N(0, 0.1^2); biases and
  offsets N(0, 0.1^2) (non-zero, so that a test also sees a misplaced bias).
  """
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), ids, ids)["params"]
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    names = [getattr(key, "key", "") for key in path]
    shape, noise = leaf.shape, rng.standard_normal(leaf.shape)
    stacked = "layers" in names  # nn.scan: a leading layer axis
    core = shape[1:] if stacked else shape
    if names[-1] == "kernel":
      fan_in = int(np.prod(core[:-1])) if names[-2] == "out" else core[0]
      value = noise / np.sqrt(fan_in)
    elif names[-1] in ("embedding", "pos_embedding"):
      value = noise / np.sqrt(core[-1])
    elif names[-1] == "scale":
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def init_params(config, seed: int = 0):
  """The model of `config` and random parameters for it."""
  return Transformer(config), random_params(config, seed)


# --- Parameter layouts of scanned and unrolled stacks (model.scan_layers). -------------------

STACKS = ("encoder", "decoder")


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Scanned params (`{stack}/layers` with a leading axis N) -> unrolled (`{stack}/layers_i`)."""
  params = dict(params)
  for stack in STACKS:
    tree = dict(params[stack])
    stacked = tree.pop(LAYERS)
    for i in range(num_layers):
      tree[f"{LAYERS}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    params[stack] = tree
  return params


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled params (`{stack}/layers_i`) -> scanned (`{stack}/layers`, leading axis N)."""
  params = dict(params)
  for stack in STACKS:
    tree = dict(params[stack])
    layers = [tree.pop(f"{LAYERS}_{i}") for i in range(num_layers)]
    tree[LAYERS] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    params[stack] = tree
  return params
