"""Shared pieces of the training tests: a tiny model config, random packed batches, and the
per-tensor distance between two parameter trees.

(A plain module, not conftest.py, so that tests import it by a name no other test dir uses.)
"""

import jax
import ml_collections
import numpy as np

from jaxformer import config as config_lib
from jaxformer.tokens import EOS_ID

VOCAB = 32
LENGTH = 8


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A model small enough to compile and train in seconds on a CPU; `overrides` as 'a.b'=v."""
  c = config_lib.get_default_config()
  c.model.update(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=16,
                 dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.max_len = LENGTH
  c.train.update(batch_size=16, warmup_steps=4, learning_rate=1.0, label_smoothing=0.1,
                 seed=0)
  c.eval.batch_size = 16
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  config_lib.validate(c)
  return c


def random_batch(rng: np.random.RandomState, rows: int, length: int = LENGTH,
                 min_tokens: int = 1) -> dict[str, np.ndarray]:
  """Rows of one or two packed (source, target) pairs of random lengths, the rest padding.

  Rows differ in their number of real tokens, so per-device token counts differ too. Pair k of
  a row has segment id k + 1 on both sides; positions restart at 0 in every pair.
  """
  keys = ("inputs", "targets", "inputs_positions", "targets_positions", "inputs_segment_ids",
          "targets_segment_ids")
  batch = {key: np.zeros((rows, length), np.int32) for key in keys}
  for row in range(rows):
    num_pairs = rng.randint(1, 3)
    for side in ("inputs", "targets"):
      start = 0
      for pair in range(num_pairs):
        room = length // num_pairs
        size = rng.randint(min(min_tokens, room), room + 1)
        tokens = rng.randint(EOS_ID + 1, VOCAB, size=size)
        tokens[-1:] = EOS_ID
        batch[side][row, start:start + size] = tokens
        batch[f"{side}_positions"][row, start:start + size] = np.arange(size)
        batch[f"{side}_segment_ids"][row, start:start + size] = pair + 1
        start += size
  return batch


def relative_errors(a, b) -> dict[str, float]:
  """||a - b|| / ||b|| for each array of two pytrees of the same structure, by path.

  Per tensor, not against the largest value of the whole tree: a small tensor (a bias or a
  LayerNorm offset, zero at init, only a few updates big after a few steps) would hide its
  error behind the large ones.
  """
  def error(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))
  return {jax.tree_util.keystr(path): value for path, value in
          jax.tree_util.tree_leaves_with_path(jax.tree.map(error, a, b))}


def worst_relative_error(a, b) -> tuple[str, float]:
  """(path, error) of the tensor farthest from its counterpart (see relative_errors)."""
  return max(relative_errors(a, b).items(), key=lambda item: item[1])
