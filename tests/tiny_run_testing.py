"""Helpers of the attention-map and inference tests: a tiny model (2 layers, 4 heads), a
vocabulary of number words, and a workdir as training leaves it.

(A plain module, not conftest.py, so that tests import it by a name no other test uses.)
"""

import functools
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections

from jaxformer import checkpoint, inference
from jaxformer import config as config_lib
from jaxformer import workdir as workdir_lib
from jaxformer.data import tasks
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.train import state as state_lib

NUM_LAYERS, NUM_HEADS = 2, 4
MAX_LEN = 16
STEP = 3
TEXT = "three hundred twenty one"


def tiny_config(**model) -> ml_collections.FrozenConfigDict:
  c = config_lib.get_default_config()
  c.model.update(vocab_size=48, num_layers=NUM_LAYERS, d_model=16, num_heads=NUM_HEADS, d_ff=32,
                 max_len=MAX_LEN, dropout_rate=0.0)
  c.model.update(model)
  c.data.max_len = MAX_LEN
  c.decode.update(beam_size=2, max_extra_len=4)
  config_lib.validate(c)
  return ml_collections.FrozenConfigDict(c)


def number_tokenizer() -> tokenizer_lib.Tokenizer:
  """A vocabulary (at most 48 pieces) trained on English and Spanish number words."""
  sentences = [s for n in range(1, 400, 3)
               for s in (tasks.english_number(n), tasks.spanish_number(n))]
  return tokenizer_lib.train(sentences, vocab_size=48)


def init_params(config, seed=0):
  """Fresh parameters (compiled: quicker than op by op), placed as inference places parameters
  for pictures (so that compiled decoders are shared with jaxformer.inference's)."""
  params = jax.jit(functools.partial(state_lib.init_params, config))(jax.random.key(seed))
  return jax.device_put(params, inference.inference_sharding())


def make_run(workdir, config, tokenizer, seed=0):
  """A workdir as training leaves it: config.json, vocab.model, checkpoints/STEP; returns the
  params (fresh from init_state: the plots need a model, not a good one)."""
  os.makedirs(workdir)
  tokenizer.save(os.path.join(workdir, workdir_lib.VOCAB_FILE))
  workdir_lib.write_run_config(workdir, config)
  state = state_lib.init_state(config, jax.random.key(seed)).replace(step=jnp.int32(STEP))
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  with checkpoint.Checkpointer(workdir, every_steps=1, keep=1, async_save=False) as ckpt:
    ckpt.save(STEP, state, data, force=True)
  return jax.device_put(state.params, inference.inference_sharding())


def write_metrics(workdir, lines):
  """`<workdir>/metrics.jsonl` with `lines`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def train_line(step, loss):
  """A metrics.jsonl line of the train split, as the training loop logs it."""
  return json.dumps({"step": step, "split": "train", "loss": loss, "learning_rate": 1e-3 * step,
                     "tokens_per_second": 1000.0 + step})
