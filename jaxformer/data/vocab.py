"""The vocabulary of a run: trained once per workdir from its training data, then reused.

One vocabulary is shared by source and target (the paper shares it, and so can the embedding
tables). It is trained on a sample of the training split, both sides, shuffled with the run's
seed, and saved as `<workdir>/vocab.model`; every later run and command in that workdir loads
the same file, so ids never change under a checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import numpy as np

from jaxformer import workdir as workdir_lib
from jaxformer.data import sources
from jaxformer.data import tokenizer as tokenizer_lib
from jaxformer.errors import ConfigError

log = logging.getLogger(__name__)


def training_sentences(source: Sequence[dict[str, str]], sample_size: int, seed: int
                       ) -> list[str]:
  """At most `sample_size` sentences, both sides of a random sample of the pairs of `source`."""
  num_pairs = min(len(source), math.ceil(sample_size / 2))
  indices = np.random.default_rng(seed).permutation(len(source))[:num_pairs]
  sentences = []
  for i in indices:
    pair = source[int(i)]
    sentences.extend((pair["source"], pair["target"]))
  return sentences[:sample_size]


def load_or_train(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """`<workdir>/vocab.model`, trained from the training split if it does not exist yet.

  On several processes only process 0 trains; the others wait for the file
  (sources.WAIT_TIMEOUT_S) and then load it.
  """
  path = workdir_lib.path(workdir, workdir_lib.VOCAB_FILE)  # The workdir may be on gs://.
  if not path.exists():
    if jax.process_index() == 0:
      d = config.data
      split = sources.get_split(config, "train", workdir_lib.resolve_data_dir(config, workdir))
      sentences = training_sentences(split, d.vocab_sample_size, sources.shuffle_seed(config))
      tokenizer = tokenizer_lib.train(sentences, vocab_size=config.model.vocab_size,
                                      model_type=d.vocab_type,
                                      character_coverage=d.vocab_character_coverage)
      path.parent.mkdir(parents=True, exist_ok=True)
      tokenizer.save(path)
      log.info("trained a %s vocabulary of %d pieces on %d sentences: %s", d.vocab_type,
               tokenizer.vocab_size, len(sentences), path)
    else:
      sources.wait_until(path.exists, str(path))
  tokenizer = tokenizer_lib.Tokenizer.load(path)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"{path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                      f"{config.model.vocab_size}; raise model.vocab_size or use a new workdir")
  return tokenizer
