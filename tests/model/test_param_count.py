"""Parameter counts of the paper's base and big models, from shapes only (jax.eval_shape)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxformer.config import get_default_config
from jaxformer.model.transformer import Transformer


def paper_config(size: str, **overrides) -> ml_collections.FrozenConfigDict:
  config = get_default_config().model  # the paper's base model with a shared 37,000 vocab
  if size == "big":
    config.update(d_model=1024, d_ff=4096, num_heads=16)
  config.update(overrides)
  return ml_collections.FrozenConfigDict(config)


def closed_form_count(v, n, d, f, *, bias=True, pre_norm=False, learned=False, max_len=0):
  """Parameters of the encoder-decoder Transformer with one shared, tied embedding."""
  attention = 4 * d * d + (4 * d if bias else 0)     # W_Q, W_K, W_V, W_O (+ biases)
  feed_forward = d * f + f + f * d + d               # W_1, b_1, W_2, b_2
  layer_norm = 2 * d                                 # gain and offset
  encoder_layer = attention + feed_forward + 2 * layer_norm
  decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
  total = v * d + n * (encoder_layer + decoder_layer)
  if pre_norm:
    total += 2 * layer_norm                          # a final LayerNorm after each stack
  if learned:
    total += 2 * max_len * d                         # one position table per stack
  return total


def count_and_shapes(config):
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), ids, ids)["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)), shapes


@pytest.mark.parametrize("size,paper_millions", [("base", 65), ("big", 213)])
def test_paper_models_have_the_closed_form_count(size, paper_millions):
  config = paper_config(size)
  count, shapes = count_and_shapes(config)
  assert count == closed_form_count(config.vocab_size, config.num_layers, config.d_model,
                                    config.d_ff)
  assert abs(count - paper_millions * 1e6) <= 0.05 * paper_millions * 1e6
  if size == "base":
    query = shapes["encoder"]["layers_0"]["self_attention"]["query"]["kernel"]
    assert query.shape == (512, 8, 64)
    assert shapes["decoder"]["layers_5"]["cross_attention"]["out"]["kernel"].shape == (8, 64, 512)


def test_variants_change_the_count_as_the_formula_says():
  config = paper_config("base", norm="pre", pos_encoding="learned", attention_bias=False,
                        num_layers=2, max_len=64)
  count, _ = count_and_shapes(config)
  assert count == closed_form_count(37000, 2, 512, 2048, bias=False, pre_norm=True,
                                    learned=True, max_len=64)
