"""SentencePiece, wrapped: train a vocabulary on sentences, load and save it, encode and decode.

A leaf: it knows nothing of datasets or workdirs (jaxformer.data.vocab decides when a run's
vocabulary is trained and on what). Every vocabulary puts the special tokens at the ids of
jaxformer.tokens, which the model, the loss and decoding rely on.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import sentencepiece as spm
from etils import epath

from jaxformer.errors import DataError
from jaxformer.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPM_LOG_LEVEL = 2  # SentencePiece's own log: 0 info, 1 warnings, 2 errors only.


class Tokenizer:
  """Text <-> ids with a SentencePiece model whose pad/unk/bos/eos ids are jaxformer.tokens'."""

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
