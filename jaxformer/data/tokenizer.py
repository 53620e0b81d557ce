"""SentencePiece vocabulary: train once per workdir, load, encode and decode.

The ids of the special tokens are defined here and nowhere else.

One vocabulary is shared by source and target (the paper shares it, and so can the embedding
tables). It is trained on a sample of the training split, both sides, shuffled with the run's
seed, and saved as `<workdir>/vocab.model`; every later run and command in that workdir loads
the same file, so ids never change under a checkpoint.
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import Iterable, Sequence

import jax
import numpy as np
import sentencepiece as spm
from etils import epath

from jaxformer.data import sources
from jaxformer.errors import ConfigError, DataError

PAD_ID = 0  # padding; never a real token. Masks and loss weights are `ids != PAD_ID`.
UNK_ID = 1  # a piece the vocabulary does not know.
BOS_ID = 2  # start of a target sequence: the decoder's first input (teacher forcing, decoding).
EOS_ID = 3  # end of a sequence: appended to every source and target.

VOCAB_FILENAME = "vocab.model"
SPM_LOG_LEVEL = 2  # SentencePiece's own log: 0 info, 1 warnings, 2 errors only.

log = logging.getLogger(__name__)


class Tokenizer:
  """Text <-> ids with a SentencePiece model whose pad/unk/bos/eos ids are the ones above."""

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self._model_proto = model_proto
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    found = (self._processor.pad_id(), self._processor.unk_id(), self._processor.bos_id(),
             self._processor.eos_id())
    if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise DataError(f"{path}: special ids pad/unk/bos/eos are {found}, jaxformer needs "
                      f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train a new vocabulary (new workdir)")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece model file (a local or gs:// path). DataError if it is missing or
    not a model."""
    path = str(path)
    try:
      proto = epath.Path(path).read_bytes()
    except FileNotFoundError:
      raise DataError(f"{path}: vocabulary not found") from None
    try:
      return cls(proto, path)
    except RuntimeError as e:
      raise DataError(f"{path}: not a SentencePiece model ({e})") from None

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to `path` (local or gs://) atomically: readers never see a
    half-written file."""
    path = epath.Path(path)
    partial = path.with_name(f"{path.name}.partial.{os.getpid()}")
    partial.write_bytes(self._model_proto)
    partial.replace(path)
    self.path = str(path)

  @property
  def vocab_size(self) -> int:
    """V: the number of ids, special tokens included."""
    return self._processor.get_piece_size()

  def id_to_piece(self, i: int) -> str:
    return self._processor.id_to_piece(int(i))

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS or EOS."""
    return self._processor.encode_as_ids(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS; PAD and BOS are skipped (so a padded row decodes).

    Ids past the vocabulary (a model whose model.vocab_size exceeds vocab_size may predict
    them) decode like UNK_ID, as " ⁇ ".
    """
    pieces = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        pieces.append(i if 0 <= i < self.vocab_size else UNK_ID)
    return self._processor.decode_ids(pieces)


def train(sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
          character_coverage: float = 1.0) -> Tokenizer:
  """Trains a SentencePiece model on `sentences` (kept in memory, not written).

  `vocab_size` is an upper bound: a small corpus (e.g. the digits of the algorithmic tasks)
  gives fewer pieces rather than an error.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        hard_vocab_limit=False, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        minloglevel=SPM_LOG_LEVEL)
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed: {e}") from None
  return Tokenizer(model.getvalue())


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


def load_or_train(config, workdir: str) -> Tokenizer:
  """`<workdir>/vocab.model`, trained from the training split if it does not exist yet.

  On several processes only process 0 trains; the others wait for the file
  (sources.WAIT_TIMEOUT_S) and then load it.
  """
  path = epath.Path(workdir) / VOCAB_FILENAME  # The workdir may be on gs://.
  if not path.exists():
    if jax.process_index() == 0:
      d = config.data
      split = sources.get_split(config, "train", sources.resolve_data_dir(config, workdir))
      sentences = training_sentences(split, d.vocab_sample_size, sources.shuffle_seed(config))
      tokenizer = train(sentences, vocab_size=config.model.vocab_size, model_type=d.vocab_type,
                        character_coverage=d.vocab_character_coverage)
      path.parent.mkdir(parents=True, exist_ok=True)
      tokenizer.save(path)
      log.info("trained a %s vocabulary of %d pieces on %d sentences: %s", d.vocab_type,
               tokenizer.vocab_size, len(sentences), path)
    else:
      sources.wait_until(path.exists, str(path))
  tokenizer = Tokenizer.load(path)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"{path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                      f"{config.model.vocab_size}; raise model.vocab_size or use a new workdir")
  return tokenizer
